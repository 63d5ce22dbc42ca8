"""Which TSDB points one control cycle writes, at which rate (``docs/tsdb-schema.md``).

Kept out of the daemon so the schema's rates live in one place with the counters they
carry. Two rates: the constraint levels, the cycle, the action counters every cycle (what
a decision is about); the detail below a rack (GPU servers, GPUs, jobs, devices) every
``DETAIL_PERIOD_S``. At hall scale (32,768 GPUs at a 0.5 s cycle) GPU points every cycle
would be 65,536 points/s, and building plus serialising them would take most of a core
on the controller's own interpreter; the doc gives the figures.

The detail is spread: a series (a server with its GPUs, a job, a device) is written in
the cycles where ``crc32(id) % N == cycle % N``, so each cycle builds about 1/N of it
instead of one cycle in N building all of it and overrunning. crc32, not ``hash()``: it
is the same in every process, so a restart or reload keeps each series on its phase.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from controller.core.cycle import CycleStats
from controller.core.points import (
    Point,
    actions_point,
    cycle_point,
    device_point,
    gpu_point,
    job_point,
    node_point,
)
from controller.model.config import Site
from controller.model.topology import PowerTree
from controller.policy import NodeStatus, Snapshot
from drivers.base import DeviceStats

FloatArray = npt.NDArray[np.float64]

DETAIL_PERIOD_S: Final = 5.0
# The kinds of ``rackpower_actions_total`` on /metrics: the policy's, then the API's.
# Written every cycle, zeros included, so a counter's series starts at 0.
ACTION_KINDS: Final = ("cap", "uncap", "migrate", "requeue", "refusal", "reservation", "release")


def detail_every(cycle_s: float, period_s: float = DETAIL_PERIOD_S) -> int:
    """Cycles between two points of one detail series."""
    return max(1, round(period_s / cycle_s))


def phase_of(series_id: str, every: int) -> int:
    """The cycle (mod ``every``) on which a detail series is written; stable across runs."""
    return zlib.crc32(series_id.encode()) % every


class CyclePoints:
    """Builds one cycle's points and keeps what must count across cycles and reloads.

    ``violations`` counts cycles above the envelope per constraint node since start; it
    is kept here, not in the tree, so a config reload does not reset it.
    """

    def __init__(self, detail_period_s: float = DETAIL_PERIOD_S) -> None:
        self.detail_period_s = detail_period_s
        self.cycles = 0
        self.violations: dict[str, int] = {}

    def build(
        self,
        *,
        site: Site,
        tree: PowerTree,
        status: NodeStatus,
        snap: Snapshot,
        target_w: FloatArray,
        gpu_max_w: FloatArray,
        estimated_w: Mapping[str, float],
        reserved_w: Mapping[str, float],
        mode: str,
        cycle_stats: CycleStats,
        action_counts: Mapping[str, float],
        devices: Mapping[str, DeviceStats],
        device_stale: Mapping[str, bool],
        ts_ns: int,
        count_violations: bool = True,
    ) -> list[Point]:
        """The cycle's points: every constraint level, and the detail series due now.

        ``count_violations`` is False during the controller's start-up grace, when every
        node sits at its worst case (no readings yet): not a violation, as for alarms.
        """
        name = site.name
        every = detail_every(site.policy.cycle_s, self.detail_period_s)
        phase = self.cycles % every
        self.cycles += 1

        def due(series_id: str) -> bool:
            return phase_of(series_id, every) == phase

        points: list[Point] = []
        # Prefix sums: a node's GPUs are one contiguous range, so its sums are two lookups
        # instead of a numpy call per node (thousands of nodes at hall scale).
        set_sum = np.concatenate(([0.0], np.cumsum(target_w))).tolist()
        capped_sum = np.concatenate(([0], np.cumsum(target_w < gpu_max_w - 0.5))).tolist()
        for k, nid in enumerate(status.node_ids):
            first, stop = tree.gpu_range(nid)
            envelope = float(status.envelope_w[k])
            # As the envelope_exceeded alarm: the load the policy acted on, above the envelope.
            over = float(status.load_w[k]) > envelope
            if over and count_violations:
                self.violations[nid] = self.violations.get(nid, 0) + 1
            measured = snap.node_power_w.get(nid)
            points.append(
                node_point(
                    name,
                    nid,
                    tree.node(nid).kind,
                    power_w=math.nan if measured is None else measured,
                    envelope_w=envelope,
                    headroom_w=float(status.headroom_w[k]),
                    estimated_w=estimated_w.get(nid, math.nan),
                    reserved_w=reserved_w.get(nid, 0.0),
                    cap_w=set_sum[stop] - set_sum[first],
                    capped_gpus=capped_sum[stop] - capped_sum[first],
                    over_envelope=over,
                    violations=self.violations.get(nid, 0),
                    ts_ns=ts_ns,
                )
            )

        # Plain lists: indexing a numpy array per GPU costs more than converting it once.
        power_w, limit_w, set_w = (
            snap.gpu_power_w.tolist(),
            snap.gpu_limit_w.tolist(),
            target_w.tolist(),
        )
        job_of: dict[int, str] = {}
        for job in snap.jobs:
            for g in job.gpus:
                job_of[g] = job.id
        for nid in tree.of_kind("node"):
            if not due(nid):
                continue
            first, stop = tree.gpu_range(nid)
            measured = snap.node_power_w.get(nid)
            points.append(
                node_point(
                    name,
                    nid,
                    "node",
                    power_w=math.nan if measured is None else measured,
                    envelope_w=tree.node(nid).envelope_w,
                    headroom_w=None,
                    estimated_w=estimated_w.get(nid, math.nan),
                    reserved_w=reserved_w.get(nid, 0.0),
                    cap_w=set_sum[stop] - set_sum[first],
                    capped_gpus=capped_sum[stop] - capped_sum[first],
                    ts_ns=ts_ns,
                )
            )
            for g in range(first, stop):
                points.append(
                    gpu_point(
                        name,
                        nid,
                        g - first,
                        power_w=power_w[g],
                        limit_w=limit_w[g],
                        target_w=set_w[g],
                        job=job_of.get(g),
                        ts_ns=ts_ns,
                    )
                )

        for job in snap.jobs:
            if not job.gpus or not due(job.id):
                continue
            idx = np.asarray(job.gpus, dtype=np.intp)
            points.append(
                job_point(
                    name,
                    job.id,
                    cap_w=float(target_w[idx].min()),
                    gpus=len(job.gpus),
                    priority=job.priority_class,
                    # NaN (left out) when any of its GPUs cannot be seen: not a partial sum.
                    power_w=float(snap.gpu_power_w[idx].sum()),
                    ts_ns=ts_ns,
                )
            )

        for dev in site.devices:
            if not due(dev.id):
                continue
            st = devices.get(dev.id)
            stale = device_stale.get(dev.id)
            points.append(
                device_point(
                    name,
                    dev.id,
                    dev.driver,
                    poll_duration_s=None if st is None else st.last_poll_duration_s,
                    errors=None if st is None else st.errors,
                    retries=None if st is None else st.retries,
                    stale=stale,
                    ts_ns=ts_ns,
                )
            )

        points.append(
            cycle_point(
                name,
                # The last finished cycle's; before the first there is none (NaN: left out).
                duration_s=cycle_stats.last_duration_s if cycle_stats.cycles else math.nan,
                overruns=cycle_stats.overruns,
                ts_ns=ts_ns,
                mode=mode,
                period_s=site.policy.cycle_s,
            )
        )
        for kind in ACTION_KINDS:
            points.append(
                actions_point(name, kind, count=int(action_counts.get(kind, 0)), ts_ns=ts_ns)
            )
        return points


def counter_values(collect: Callable[[], Iterable[Any]], label: str) -> dict[str, float]:
    """``{label value: total}`` of a labelled prometheus Counter, read through ``collect()``.

    The TSDB then carries the same number as ``/metrics`` instead of a second count kept
    beside it that could disagree.
    """
    out: dict[str, float] = {}
    for family in collect():
        for sample in getattr(family, "samples", ()):
            if sample.name.endswith("_total") and label in sample.labels:
                out[sample.labels[label]] = float(sample.value)
    return out
