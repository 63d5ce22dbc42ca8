"""What operators run today, as real policies with the same signature as rackpower.

They exist so the scenario benchmark compares against honest practice, not strawmen:

- ``none``: no power management; breakers are the only protection.
- ``static``: every GPU permanently capped at its share of the tightest envelope above
  it (the envelope, less the conversion losses the config's efficiency curves give at
  that load, less baselines, split evenly); recomputed only when an envelope itself
  changes (lost feed, demand response), never from load.
- ``three-band``: Dynamo-like per-GPU capping on 3 s samples; caps the lowest priority
  and highest draw first when a node is above its cap threshold, releases in steps when
  it is below the release threshold. Not job-aware: a job's GPUs get different caps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.model.topology import PowerTree

from .actions import cap_actions
from .index import TreeIndex, tree_index
from .jobs import JobIndex, build_job_index
from .loads import effective_envelopes, estimate_loads, gpu_power_worst_case, nameplate_efficiency
from .types import Action, FloatArray, PolicyState, Snapshot, frozen_array

THREE_BAND_PERIOD_S = 3.0


def _start(
    snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
) -> tuple[TreeIndex, FloatArray, bool]:
    """Index, the limits in force (last command, or what the snapshot says), fresh start?"""
    index = tree_index(tree)
    fresh = state is None or state.tree_id != id(tree) or state.target_w.shape != (index.n_gpus,)
    if fresh:
        return index, np.asarray(snapshot.gpu_limit_w, dtype=np.float64), True
    assert state is not None
    return index, state.target_w, False


def _jobs(index: TreeIndex, snapshot: Snapshot, tree: PowerTree, memory: object) -> JobIndex:
    if isinstance(memory, _BaselineMemory) and memory.jobs.jobs == snapshot.jobs:
        return memory.jobs
    return build_job_index(index, snapshot.jobs, tree.site.policy)


@dataclass(frozen=True, eq=False)
class _BaselineMemory:
    jobs: JobIndex
    last_acted_s: float = -np.inf


def none_policy(
    snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
) -> tuple[tuple[Action, ...], PolicyState]:
    """Never caps: the target vector is every GPU's maximum and no action is ever sent."""
    index = tree_index(tree)
    return (), PolicyState(
        tree_id=id(tree), now_s=snapshot.now_s, target_w=frozen_array(index.gpu_max_w)
    )


def static_policy(
    snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
) -> tuple[tuple[Action, ...], PolicyState]:
    """Every GPU at its even share of the tightest envelope above it, whatever the load."""
    index, previous, _ = _start(snapshot, tree, state)
    jobs = _jobs(index, snapshot, tree, None if state is None else state.memory)
    envelope = effective_envelopes(index, snapshot.lost_sources, snapshot.envelope_override_w)
    count = np.maximum(index.stop - index.start, 1)
    share = (envelope * nameplate_efficiency(index) - index.base_w) / count
    caps = np.full(index.n_gpus, np.inf)
    for level in index.levels:
        covered = level.seg_of_gpu >= 0
        per_gpu = np.where(covered, share[level.nodes][level.seg_of_gpu], np.inf)
        caps = np.minimum(caps, per_gpu)
    caps = np.minimum(np.maximum(np.floor(caps), jobs.floor_w), index.gpu_max_w)
    leaf = index.server_owner[index.gpu_server]

    def explain(k: int, label: str, old_w: float, new_w: float) -> str:
        nid = index.node_ids[k]
        return (
            f"{nid}: static share of envelope {envelope[k] / 1e3:.1f} kW less baselines"
            f" {index.base_w[k] / 1e3:.1f} kW over {count[k]} GPUs: {label} -> {new_w:.0f} W"
        )

    actions = cap_actions(index, jobs, caps, previous, leaf, explain)
    return tuple(actions), PolicyState(
        tree_id=id(tree),
        now_s=snapshot.now_s,
        target_w=frozen_array(caps),
        memory=_BaselineMemory(jobs=jobs),
    )


def three_band_policy(
    snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
) -> tuple[tuple[Action, ...], PolicyState]:
    """Dynamo-like per-GPU bands, acting on 3 s samples of snapshot time."""
    index, previous, fresh = _start(snapshot, tree, state)
    memory = None if state is None else state.memory
    jobs = _jobs(index, snapshot, tree, memory)
    last = memory.last_acted_s if isinstance(memory, _BaselineMemory) else -np.inf
    max_w = index.gpu_max_w
    caps = np.minimum(
        np.maximum(np.where(np.isfinite(previous), previous, max_w), jobs.floor_w), max_w
    )
    if snapshot.now_s - last < THREE_BAND_PERIOD_S and not fresh:
        return (), PolicyState(
            tree_id=id(tree),
            now_s=snapshot.now_s,
            target_w=frozen_array(caps),
            memory=_BaselineMemory(jobs=jobs, last_acted_s=last),
        )
    cfg = tree.site.policy.bands
    power, stale = gpu_power_worst_case(index, snapshot.gpu_power_w)
    loads = estimate_loads(index, snapshot, power, stale)
    envelope = effective_envelopes(index, snapshot.lost_sources, snapshot.envelope_override_w)
    ratio = np.maximum(loads.load_w / np.maximum(loads.attributed_w, 1.0), 1.0)
    new = caps.copy()
    cut = np.zeros(index.n_gpus, dtype=bool)  # under a node that cut this sample
    why: dict[int, str] = {}
    # Lower levels first: a rack's cut also counts toward its row, and a row's release
    # never undoes it.
    for level in index.levels:
        for k in level.nodes.tolist():
            first, stop = int(index.start[k]), int(index.stop[k])
            drawn = np.minimum(power[first:stop], new[first:stop])
            cut_so_far = float((np.minimum(power[first:stop], caps[first:stop]) - drawn).sum())
            load = loads.load_w[k] - ratio[k] * cut_so_far
            before = new[first:stop].copy()
            if load > cfg.cap_above * envelope[k]:
                need = (load - cfg.target * envelope[k]) / ratio[k]
                new[first:stop] = _cut(
                    need,
                    new[first:stop],
                    drawn,
                    jobs.floor_w[first:stop],
                    jobs.gpu_rank[first:stop],
                )
                cut[first:stop] = True
                label = f"above cap threshold {cfg.cap_above * envelope[k] / 1e3:.1f} kW"
            elif load < cfg.uncap_below * envelope[k] and not loads.stale_below[k]:
                room = (cfg.target * envelope[k] - load) / ratio[k]
                new[first:stop] = _release(
                    room,
                    new[first:stop],
                    max_w[first:stop],
                    jobs.gpu_rank[first:stop],
                    stale[first:stop] | cut[first:stop],
                    cfg.uncap_step_fraction,
                )
                label = f"below release threshold {cfg.uncap_below * envelope[k] / 1e3:.1f} kW"
            else:
                continue
            if np.any(new[first:stop] != before):
                why[k] = label
    new = np.minimum(np.maximum(np.floor(new), jobs.floor_w), max_w)
    leaf = index.server_owner[index.gpu_server]

    def explain(k: int, label: str, old_w: float, new_w: float) -> str:
        nid = index.node_ids[k]
        return (
            f"{nid}: load {loads.load_w[k] / 1e3:.1f} kW, envelope {envelope[k] / 1e3:.1f} kW,"
            f" {why.get(k, 'a node above it moved')} (3 s bands, per GPU): {label}"
            f" {old_w:.0f} W -> {new_w:.0f} W"
        )

    deciding = _deciding_node(index, why, leaf)
    actions = cap_actions(index, jobs, new, previous, deciding, explain)
    return tuple(actions), PolicyState(
        tree_id=id(tree),
        now_s=snapshot.now_s,
        target_w=frozen_array(new),
        memory=_BaselineMemory(jobs=jobs, last_acted_s=snapshot.now_s),
    )


def _cut(
    need_w: float,
    caps_w: FloatArray,
    drawn_w: FloatArray,
    floor_w: FloatArray,
    rank: np.ndarray,
) -> FloatArray:
    """Take ``need_w`` off, lowest priority first, highest draw first, down to floors.

    A GPU that gives something is capped below what it draws now; the others keep their cap.
    """
    order = np.lexsort((-drawn_w, -rank))
    avail = np.maximum(drawn_w - floor_w, 0.0)[order]
    before = np.cumsum(avail) - avail
    take = np.zeros_like(drawn_w)
    take[order] = np.clip(need_w - before, 0.0, avail)
    out: FloatArray = np.where(take > 0, np.maximum(drawn_w - take, floor_w), caps_w)
    return out


def _release(
    room_w: float,
    caps_w: FloatArray,
    max_w: FloatArray,
    rank: np.ndarray,
    keep: np.ndarray,
    step: float,
) -> FloatArray:
    """Give back up to ``room_w``, highest priority first, a step of each gap at a time.

    ``keep`` GPUs (unseen, or just cut by a node below) are not raised.
    """
    order = np.lexsort((caps_w, rank))
    want = np.where(keep, 0.0, step * (max_w - caps_w))[order]
    before = np.cumsum(want) - want
    give = np.clip(room_w - before, 0.0, want)
    out = caps_w.copy()
    out[order] += give
    return out


def _deciding_node(
    index: TreeIndex,
    why: dict[int, str],
    leaf: np.ndarray,
) -> np.ndarray:
    """Per GPU the lowest node that moved its cap (its reason is the one printed)."""
    out = leaf.copy()
    for k in sorted(why):
        out[index.start[k] : index.stop[k]] = k
    return out
