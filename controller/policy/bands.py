"""Dynamo-style bands: when a node caps, holds or releases, and how caps move.

Per node, on the planned draw (GPU demand under current caps, plus baselines, losses
and what cannot be attributed):

- cap     plan above ``cap_above`` x envelope, or plan + margin above the envelope:
          caps drop at once to the allocation that aims at ``target``;
- release measured load and plan below ``uncap_below`` x envelope: caps rise toward the
          allocation that aims at ``target``, by ``uncap_step_fraction`` of the gap per
          cycle, so the rebound cannot overshoot;
- hold    in between: the total stays where it is, but it may be shifted between
          classes (a higher class takes from a lower one) beyond a small deadband.

A GPU follows the strictest node above it: any node capping makes it cap; it may rise
only when no node above it is capping and, for a hold, only as far as the zero-sum
shift allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import Bands

from .index import TreeIndex
from .types import FloatArray

BoolArray = npt.NDArray[np.bool_]

DEADBAND_FRACTION = 0.02  # of a GPU's max: smaller moves are not worth an actuation
SNAP_FRACTION = 0.02  # a ramp this close to its goal finishes in one step
SETTLE_FRACTION = 0.005  # a persistent gap this wide is closed below the deadband


@dataclass(frozen=True, eq=False)
class NodeBands:
    """Per-node thresholds and this cycle's decision (arrays in node index order)."""

    cap_above_w: FloatArray
    target_w: FloatArray
    uncap_below_w: FloatArray
    capping: BoolArray
    releasing: BoolArray
    band_budget_w: FloatArray  # budget for the plan, node currency
    margin_budget_w: FloatArray  # budget for plan + margin (or sum of caps)

    def mode(self) -> tuple[str, ...]:
        return tuple(
            "cap" if c else ("release" if r else "hold")
            for c, r in zip(self.capping.tolist(), self.releasing.tolist(), strict=True)
        )


def node_bands(
    cfg: Bands,
    envelope_w: FloatArray,
    load_w: FloatArray,
    plan_w: FloatArray,
    margin_plan_w: FloatArray,
) -> NodeBands:
    """Classify each node and give it its budgets for the allocation."""
    hi = cfg.cap_above * envelope_w
    tgt = cfg.target * envelope_w
    lo = cfg.uncap_below * envelope_w
    # The load counts too: a silent meter reads as its rating and must not let the node
    # relax, even when the GPUs' own telemetry says the plan is fine.
    capping = (plan_w > hi) | (margin_plan_w > envelope_w) | (load_w > hi)
    # Release on the plan as well as the measured load: a synchronous job's load dips in
    # every communication phase, and releasing on a dip re-caps it at the next compute
    # phase (cap, release, cap: the oscillation the bands exist to prevent).
    releasing = ~capping & (load_w < lo) & (plan_w < lo)
    moving = capping | releasing
    # The margin constraint keeps the same hysteresis as the band, measured from the envelope.
    return NodeBands(
        cap_above_w=hi,
        target_w=tgt,
        uncap_below_w=lo,
        capping=capping,
        releasing=releasing,
        band_budget_w=np.where(moving, tgt, plan_w),
        margin_budget_w=np.where(moving, envelope_w - (hi - tgt), margin_plan_w),
    )


def covered(index: TreeIndex, node_mask: BoolArray) -> BoolArray:
    """Per GPU: is it under any node in ``node_mask``?"""
    if not node_mask.any():
        return np.zeros(index.n_gpus, dtype=bool)
    size = index.n_gpus + 1
    marks = np.bincount(index.start[node_mask], minlength=size) - np.bincount(
        index.stop[node_mask], minlength=size
    )
    out: BoolArray = np.cumsum(marks[:-1]) > 0
    return out


def move_caps(
    index: TreeIndex,
    cfg: Bands,
    bands: NodeBands,
    prev_w: FloatArray,
    alloc_w: FloatArray,
    floor_w: FloatArray,
    blocked: BoolArray,
    settled: BoolArray | None = None,
) -> FloatArray:
    """New caps from the previous ones and the allocation, by the band rules.

    ``blocked`` GPUs (stale readings, or under a silent meter) never rise: not knowing
    is no reason to uncap. ``settled`` GPUs have had their allocation above their cap
    for a while: they rise even by less than the deadband, since a gap that persists
    is power a node leaves unused for good, and one actuation closes it. Not by less
    than ``SETTLE_FRACTION``: a node at its aim trims its caps by a watt or two when
    noise crosses its cap threshold, and closing that again would be an oscillation.
    """
    max_w = index.gpu_max_w
    cap_gpu = covered(index, bands.capping)
    deadband = DEADBAND_FRACTION * max_w
    new = prev_w.copy()
    down = (alloc_w < prev_w) & (cap_gpu | (alloc_w < prev_w - deadband))
    new[down] = alloc_w[down]
    up = (alloc_w > prev_w + deadband) & ~blocked
    if settled is not None:
        up |= settled & (alloc_w >= prev_w + SETTLE_FRACTION * max_w) & ~blocked
    ramp = prev_w + cfg.uncap_step_fraction * (alloc_w - prev_w)
    ramp = np.where(alloc_w - ramp < SNAP_FRACTION * max_w, alloc_w, ramp)
    new[up] = ramp[up]
    # Whole watts (NVML takes milliwatts, nobody needs them), never outside the GPU's range.
    out: FloatArray = np.minimum(np.maximum(np.floor(new), floor_w), max_w)
    return out
