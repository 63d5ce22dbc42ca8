"""Turn raw readings into snapshot fields, the same way for the daemon and the simulator.

The daemon has a readings store of ``Reading`` objects keyed by (device, point); the
scenario runner has the plant's arrays. Both end up here so that "what counts as a
usable reading" is decided in one place: fresh and GOOD, else worst case.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from controller.model.topology import PowerTree
from drivers.reading import Reading

from .types import FloatArray


def node_power_from_readings(
    tree: PowerTree,
    readings: Mapping[tuple[str, str], Reading],
    now_s: float,
) -> dict[str, float | None]:
    """Measured power of every metered node: the sum of its meters, or None if any is unusable.

    A node's meters are summed (a rack with two PDUs). A feed without meters of its own but
    with metered A/B sources reads as the sum of its sources. Stale limits come from each
    device's config (three missed polls unless ``stale_s`` is set).
    """
    stale_s = {d.id: d.effective_stale_s for d in tree.site.devices}
    out: dict[str, float | None] = {}
    for nid in tree.order:
        node = tree.node(nid)
        meters = list(node.meters)
        if not meters:
            meters = [m for src in node.sources for m in src.meters]
        if not meters or node.kind == "gpu":
            continue
        total = 0.0
        for meter in meters:
            reading = readings.get((meter.device, meter.point))
            if reading is None or not reading.usable(now_s, stale_s.get(meter.device, 0.0)):
                total = float("nan")
                break
            total += reading.value
        out[nid] = total if np.isfinite(total) else None
    return out


def gpu_vector(tree: PowerTree, values: Mapping[str, float], fill: float = np.nan) -> FloatArray:
    """A per-GPU array in ``tree.gpus`` order from values keyed by GPU id (``node-g3``)."""
    out = np.full(len(tree.gpus), fill, dtype=np.float64)
    index = tree.gpu_index
    for gid, value in values.items():
        k = index.get(gid)
        if k is not None:
            out[k] = float(value)
    return out
