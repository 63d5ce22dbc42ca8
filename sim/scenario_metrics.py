"""What a scenario run is judged by, measured on the plant's true state (not the snapshot).

Definitions (also in docs printed by ``rackpower scenario run --help``):

- ``max_overshoot_pct``: the highest ``input / effective envelope - 1`` of any constraint
  node (feed to rack) at any step, in percent; the effective envelope is the configured
  one shrunk by lost feed sources and demand response.
- ``seconds_over_envelope``: simulated time during which at least one constraint node
  was above its effective envelope.
- ``worst_i2t_pct``: the highest trip-integrator fill of any breaker (100 = trip).
- ``peak_ramp_w_per_s``: the largest change of the feed input over any 1 s, per second.
- ``cap_changes_per_gpu_min``: changed GPU limits (>= 0.5 W) per GPU per minute, the
  first cycle's caps included.
- ``priority_inversions``: seconds (sampled once per simulated second) in which some job
  H is capped below its demand while a job L of a lower class runs above its floor, and
  every *constraining* node holding H back also holds L: moving power from L to H was
  possible and the policy did not. Demand counts up to the GPU's maximum: no limit can
  give a GPU more than that. A node constrains when the power its limits allow
  (every GPU under it at its enforced limit, plus baselines, times the node's measured
  loss ratio) reaches 90 % of its effective envelope: its budget is committed, so H
  can only gain there at the expense of someone under the same node. The last clause
  is what keeps a cross-rack synchronous job honest: when H is held to its tightest
  rack A, a batch job running above its floor in rack B is no inversion, because the
  power it could give up cannot reach H in A. "Capped below demand" and "above its
  floor" need a gap of 2 % of the GPU's maximum (actuation noise), and demand is the
  GPU's peak over the last second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.policy.index import TreeIndex
from controller.policy.types import Job
from sim.plant import Plant, PlantState

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

BINDING_FRACTION = 0.90
TOLERANCE_FRACTION = 0.02  # of a GPU's max: smaller gaps are actuation noise
RAMP_WINDOW_S = 1.0
INVERSION_SAMPLE_S = 1.0


@dataclass
class InversionCheck:
    """Finds priority inversions in one sample (see the module docstring)."""

    index: TreeIndex
    class_rank: Mapping[str, int]

    def count(
        self,
        jobs: Sequence[Job],
        peak_demand_w: FloatArray,
        limit_w: FloatArray,
        floor_w: FloatArray,
        node_loss_ratio: FloatArray,
        envelope_w: FloatArray,
        base_w: FloatArray,
    ) -> int:
        """Number of (higher job, lower job) pairs inverted in this sample."""
        index = self.index
        n = index.n_gpus
        tol = TOLERANCE_FRACTION * index.gpu_max_w
        gpu_job = np.full(n, -1, dtype=np.intp)
        rank = np.zeros(len(jobs), dtype=np.intp)
        for j, job in enumerate(jobs):
            gpu_job[list(job.gpus)] = j
            rank[j] = self.class_rank.get(job.priority_class, len(self.class_rank))
        # Demand above a GPU's maximum (an inference prefill burst past TDP) is not a
        # cap any policy could lift: a GPU at its maximum is not held back.
        wants = np.minimum(peak_demand_w, index.gpu_max_w)
        capped = (wants > limit_w + tol) & (gpu_job >= 0)
        if not capped.any():
            return 0
        above = (limit_w > floor_w + tol) & (peak_demand_w > floor_w + tol) & (gpu_job >= 0)
        allowed = index.seg_sum(limit_w) + base_w
        binding = allowed * node_loss_ratio >= BINDING_FRACTION * envelope_w
        # Per capped job: the lowest "highest class rank running above floor" over its
        # constraining nodes; an inversion when that is still a lower class than the job.
        worst: dict[int, int] = {}
        for k in np.flatnonzero(binding).tolist():
            a, b = int(index.start[k]), int(index.stop[k])
            held = np.unique(gpu_job[a:b][capped[a:b]])
            if held.size == 0:
                continue
            lower = gpu_job[a:b][above[a:b]]
            max_rank = int(rank[lower].max()) if lower.size else -1
            for j in held.tolist():
                worst[j] = min(worst.get(j, max_rank), max_rank)
        pairs = 0
        for j, r in worst.items():
            if r > rank[j]:
                pairs += 1
        return pairs


class RunMetrics:
    """Accumulates a run's figures step by step; cheap enough for every 100 ms step."""

    def __init__(self, plant: Plant, index: TreeIndex, class_rank: Mapping[str, int]) -> None:
        self.plant = plant
        self.index = index
        self.node_at = np.array([plant.node_index[nid] for nid in index.node_ids], dtype=np.intp)
        self.inversions = InversionCheck(index, class_rank)
        self.max_overshoot = 0.0
        self.over_s = 0.0
        self.worst_heat = 0.0
        self.peak_ramp = 0.0
        self.cap_changes = 0
        self.oracle_gpu_s = 0.0
        self.inverted_s = 0
        self.inverted_pairs = 0
        self._feed_hist: list[tuple[float, float]] = []
        self._peak_demand = np.zeros(index.n_gpus)
        self._next_sample_s = INVERSION_SAMPLE_S

    def step(self, state: PlantState, envelope_w: FloatArray, dt_s: float) -> None:
        node_w = state.node_power_w[self.node_at]
        ratio = float((node_w / envelope_w).max())
        if ratio > 1.0:
            self.over_s += dt_s
            self.max_overshoot = max(self.max_overshoot, (ratio - 1.0) * 100.0)
        if state.heat.size:
            self.worst_heat = max(self.worst_heat, float(state.heat.max()))
        t = state.t_s
        hist = self._feed_hist
        hist.append((t, state.feed_power_w))
        while hist and hist[0][0] < t - RAMP_WINDOW_S - 1e-9:
            hist.pop(0)
        if hist and t - hist[0][0] >= RAMP_WINDOW_S - 1e-9:
            ramp = abs(state.feed_power_w - hist[0][1]) / (t - hist[0][0])
            self.peak_ramp = max(self.peak_ramp, ramp)
        np.maximum(self._peak_demand, state.gpu_demand_w, out=self._peak_demand)

    def sample_due(self, t_s: float) -> bool:
        return t_s + 1e-9 >= self._next_sample_s

    def sample(
        self,
        state: PlantState,
        jobs: Sequence[Job],
        floor_w: FloatArray,
        envelope_w: FloatArray,
        base_w: FloatArray,
    ) -> None:
        """Once a simulated second: inversions on the true state, then reset the peak."""
        index = self.index
        node_in = state.node_power_w[self.node_at]
        attributed = index.seg_sum(state.gpu_power_w) + base_w
        loss = np.where(attributed > 0, node_in / np.maximum(attributed, 1.0), 1.0)
        pairs = self.inversions.count(
            jobs, self._peak_demand, state.gpu_limit_w, floor_w, loss, envelope_w, base_w
        )
        if pairs:
            self.inverted_s += 1
            self.inverted_pairs += pairs
        self._peak_demand = np.zeros(index.n_gpus)
        self._next_sample_s += INVERSION_SAMPLE_S
