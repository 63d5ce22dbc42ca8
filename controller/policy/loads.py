"""How much each constraint node draws, as far as the policy can tell.

The estimate of a node is max(measured, sum of its children's estimates): a meter that
reads low (or sits after a converter) cannot hide load the GPUs report, and a meter that
went silent counts as the node's rating, the worst case a breaker could see.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree

from .index import TreeIndex, tree_index
from .types import FloatArray, Snapshot

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Loads:
    """Per constraint node (index order) estimates for one snapshot."""

    load_w: FloatArray  # max(measured, children), stale meters at rating
    attributed_w: FloatArray  # GPU power + baselines under the node (no losses)
    stale_meter: BoolArray  # the node's own meter has no usable reading
    stale_below: BoolArray  # a stale meter at or below the node, or a stale GPU under it


def gpu_power_worst_case(index: TreeIndex, power_w: FloatArray) -> tuple[FloatArray, BoolArray]:
    """GPU power with unusable readings at the GPU's maximum, and which ones those were."""
    stale = ~np.isfinite(power_w)
    return np.where(stale, index.gpu_max_w, np.maximum(power_w, 0.0)), stale


def effective_envelopes(
    index: TreeIndex,
    lost_sources: frozenset[str],
    overrides: Mapping[str, float],
) -> FloatArray:
    """Configured envelopes, shrunk by lost feed sources and BMS demand response."""
    env = index.envelope_w
    if lost_sources or overrides:
        env = env.copy()
        if lost_sources:
            for k in np.flatnonzero(index.has_sources).tolist():
                env[k] = index.tree.effective_envelope_w(index.node_ids[k], lost_sources)
        for nid, value in overrides.items():
            pos = index.pos.get(nid)
            if pos is not None:
                env[pos] = min(env[pos], float(value))
    return env


def estimate_loads(
    index: TreeIndex, snapshot: Snapshot, power_w: FloatArray, stale_gpu: BoolArray
) -> Loads:
    """Bottom-up estimate over the constraint nodes (children before parents)."""
    n = index.n_nodes
    measured = np.full(n, np.nan)
    stale_meter = np.zeros(n, dtype=bool)
    server_meas: dict[int, float] = {}
    rating = index.effective_rating_w(snapshot.lost_sources)
    for nid, value in snapshot.node_power_w.items():
        k = index.pos.get(nid)
        if k is None:
            s = index.server_pos.get(nid)
            if s is not None and value is not None and np.isfinite(value):
                server_meas[s] = float(value)
            continue
        if value is None or not np.isfinite(value):
            stale_meter[k] = True
        else:
            measured[k] = float(value)
    # A node the config gives meters but the snapshot does not mention is missing too.
    missing = index.metered & np.isnan(measured) & ~stale_meter
    stale_meter |= missing
    measured = np.where(stale_meter, rating, measured)

    cs = np.concatenate(([0.0], np.cumsum(power_w)))
    server_stop = np.append(index.server_start[1:], index.n_gpus)
    server_load = cs[server_stop] - cs[index.server_start] + index.server_base_w
    for s, value in server_meas.items():
        server_load[s] = max(server_load[s], value)
    direct = np.bincount(
        index.server_owner[index.server_owner >= 0],
        weights=server_load[index.server_owner >= 0],
        minlength=n,
    )
    stale_cs = np.concatenate(([0], np.cumsum(stale_gpu)))
    stale_below = (stale_cs[index.stop] - stale_cs[index.start]) > 0

    load = direct.tolist()
    meas = measured.tolist()
    below = (stale_below | stale_meter).tolist()
    parent = index.parent.tolist()
    for k in range(n - 1, -1, -1):
        if meas[k] == meas[k] and meas[k] > load[k]:  # not NaN
            load[k] = meas[k]
        p = parent[k]
        if p >= 0:
            load[p] += load[k]
            below[p] = below[p] or below[k]
    attributed = cs[index.stop] - cs[index.start] + index.base_w
    return Loads(
        load_w=np.array(load, dtype=np.float64),
        attributed_w=attributed,
        stale_meter=stale_meter,
        stale_below=np.array(below, dtype=bool),
    )


def headroom_w(snapshot: Snapshot, tree: PowerTree) -> dict[str, float]:
    """Per constraint node: envelope - max(measured, estimated) - reservations.

    What a scheduler may still place under the node right now; negative means the node
    is over its envelope (or its meter is silent and counts at its rating).
    """
    index = tree_index(tree)
    power, stale = gpu_power_worst_case(index, snapshot.gpu_power_w)
    loads = estimate_loads(index, snapshot, power, stale)
    env = effective_envelopes(index, snapshot.lost_sources, snapshot.envelope_override_w)
    res = reservations(index, snapshot.reservations_w)
    room = env - loads.load_w - res
    return {nid: float(room[k]) for k, nid in enumerate(index.node_ids)}


def reservations(index: TreeIndex, reservations_w: Mapping[str, float]) -> FloatArray:
    """Reserved power per node, including reservations made at nodes below it."""
    out = np.zeros(index.n_nodes)
    if not reservations_w:
        return out
    for nid, value in reservations_w.items():
        k = index.pos.get(nid, -1)
        while k >= 0:
            out[k] += float(value)
            k = int(index.parent[k])
    return out


_CHAIN: weakref.WeakKeyDictionary[TreeIndex, FloatArray] = weakref.WeakKeyDictionary()


def nameplate_efficiency(index: TreeIndex) -> FloatArray:
    """Per node: what reaches the servers of a watt at its input, from the config's curves.

    A static cap is worked out once from nameplate data: an envelope is measured at the
    node's input (the PDU, the shelf input), so the GPUs' share is what is left after
    each converter on the way down, taken at the envelope's load and, where children
    differ, at the least efficient child. Without curves in the config it is 1.
    """
    cached = _CHAIN.get(index)
    if cached is not None:
        return cached
    tree = index.tree
    own = np.ones(index.n_nodes)
    for k, nid in enumerate(index.node_ids):
        curve = tree.node(nid).efficiency
        if curve is not None:
            xp = [x for x, _ in curve.points]
            fp = [e for _, e in curve.points]
            own[k] = float(np.interp(index.envelope_w[k] / index.rating_w[k], xp, fp))
    chain = own.copy()
    worst_child = np.full(index.n_nodes, np.inf)  # inf: no constraint node below
    for k in range(index.n_nodes - 1, -1, -1):  # children come after their parents
        chain[k] = own[k] * (worst_child[k] if np.isfinite(worst_child[k]) else 1.0)
        p = int(index.parent[k])
        if p >= 0:
            worst_child[p] = min(worst_child[p], chain[k])
    _CHAIN[index] = chain
    return chain
