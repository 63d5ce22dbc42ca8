"""Top-down budgets as one water-filling over every constrained level.

Each GPU gets a cap ``clip(level - shift, floor, max)`` from a common water level. The
shift separates priority classes by more than any GPU's range, so as the level rises
the highest class fills from its floors to its demand before the next class moves off
its floors: priorities at a node come out of the same single number, and an inversion
is impossible by construction.

Nodes of one kind are disjoint subtrees, so a level of the tree is solved for all its
nodes at once, exactly, from the sorted breakpoints of their sums (a bisection only
where rounding puts that answer a hair over budget). Solving racks first and then each
level above with the GPUs held to the level their lower nodes allow is progressive
filling on a tree: a rack that binds early frees its row's budget for the other racks.
The result is then the same as splitting each node's budget among its children
top-down, non-cappable load first, then by class, then job-wide.

Each node n imposes two constraints on the GPUs under it (in GPU watts, after the caller
has taken out losses, baselines, reservations and unattributed power):

- band:   sum(min(cap, demand)) <= a1[n]
- margin: min(sum(cap), sum(min(cap, demand)) + margin[n]) <= a2[n]

or, instead of both, ``sum(cap) <= a3[n]`` (the caller passes the node's aim,
whatever its mode): caps that alone keep the node at its aim need neither a plan nor a
margin. Both exist because a plan built on demand can be wrong (a GPU rises past what
was seen); a GPU cannot draw past its cap. Without this branch a node whose GPUs all
sit at their caps, a little below the aim (the loss ratio moved since it capped), is
in the hold band for good: the zero-sum hold never gives back the gap, which is power
left unused for no risk. Raising such caps to the aim cannot make the node oscillate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .index import IntArray, TreeIndex
from .types import FloatArray

ITERATIONS = 15  # the level range is under 4 kW; 2^-15 of it is a tenth of a watt
TOLERANCE_W = 1e-6


@dataclass(frozen=True, eq=False)
class GpuTerms:
    """Per-GPU inputs of the water-filling."""

    shift: FloatArray  # class rank x class spacing
    floor_w: FloatArray
    max_w: FloatArray
    use_lo_w: FloatArray  # planned draw at the floor: min(floor, demand)
    use_hi_w: FloatArray  # planned draw uncapped: min(demand, max)


@dataclass(frozen=True, eq=False)
class Allocation:
    level: FloatArray  # per GPU water level (+inf where nothing binds)
    binding: IntArray  # per GPU the node that set its level, -1 where none
    infeasible: npt.NDArray[np.bool_]  # per node: over budget even with every GPU at floor

    def caps(self, terms: GpuTerms) -> FloatArray:
        out: FloatArray = np.minimum(
            np.maximum(self.level - terms.shift, terms.floor_w), terms.max_w
        )
        return out


def class_spacing(max_w: FloatArray) -> float:
    """A spacing wider than any GPU's range, so classes never overlap."""
    return float(max_w.max(initial=0.0)) + 1.0


def allocate(
    index: TreeIndex,
    terms: GpuTerms,
    a1_w: FloatArray,
    a2_w: FloatArray,
    margin_w: FloatArray,
    level_cap: FloatArray | None = None,
    n_classes: int = 1,
    a3_w: FloatArray | None = None,
) -> Allocation:
    """Water levels bottom-up over the tree; ``level_cap`` pre-limits some GPUs (jobs)."""
    n = index.n_gpus
    lam = np.full(n, np.inf) if level_cap is None else level_cap.copy()
    binding = np.full(n, -1, dtype=np.intp)
    infeasible = np.zeros(index.n_nodes, dtype=bool)
    spacing = class_spacing(terms.max_w)
    lam_lo = float(terms.floor_w.min(initial=0.0)) - 1.0
    lam_hi = float(terms.max_w.max(initial=0.0)) + (n_classes - 1) * spacing + 1.0

    def caps_uses(gpu_level: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Each GPU's cap and planned use at these water levels."""
        lv = gpu_level - terms.shift
        cap = np.minimum(np.maximum(lv, terms.floor_w), terms.max_w)
        use = np.minimum(np.maximum(lv, terms.use_lo_w), terms.use_hi_w)
        return cap, use

    def node_sums(gpu_level: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Sums of caps and of planned use under every node at these water levels."""
        cap, use = caps_uses(gpu_level)
        return index.seg_sum(cap), index.seg_sum(use)

    # At the floor level every GPU sits at its floor whatever the levels below say
    # (shifts are >= 0 and floors <= maxima, as build_job_index makes them).
    floor_cap, floor_use = index.seg_sum(terms.floor_w), index.seg_sum(terms.use_lo_w)
    s_cap, s_use = node_sums(lam)  # as the GPUs stand: updated after each level that binds
    for level in index.levels:
        nodes = level.nodes
        seg = level.seg_of_gpu
        covered = seg >= 0
        start = index.start[nodes]
        stop = index.stop[nodes]
        a1 = a1_w[nodes] + TOLERANCE_W
        a2 = a2_w[nodes] + TOLERANCE_W
        mm = margin_w[nodes]
        a3 = (np.full(nodes.size, -np.inf) if a3_w is None else a3_w[nodes]) + TOLERANCE_W

        def sums_fit(
            s_cap: FloatArray,
            s_use: FloatArray,
            a1: FloatArray = a1,
            a2: FloatArray = a2,
            mm: FloatArray = mm,
            a3: FloatArray = a3,
        ) -> npt.NDArray[np.bool_]:
            planned = (s_use <= a1) & (np.minimum(s_cap, s_use + mm) <= a2)
            ok: npt.NDArray[np.bool_] = planned | (s_cap <= a3)
            return ok

        def fits(
            node_level: FloatArray,
            start: IntArray = start,
            stop: IntArray = stop,
            seg: IntArray = seg,
            below: FloatArray = lam,
        ) -> npt.NDArray[np.bool_]:
            cap, use = caps_uses(np.minimum(node_level[seg], below))
            cs_cap = np.concatenate(([0.0], np.cumsum(cap)))
            cs_use = np.concatenate(([0.0], np.cumsum(use)))
            return sums_fit(cs_cap[stop] - cs_cap[start], cs_use[stop] - cs_use[start])

        k = nodes.size
        free = sums_fit(s_cap[nodes], s_use[nodes])
        if free.all():
            continue
        floor_ok = sums_fit(floor_cap[nodes], floor_use[nodes])
        infeasible[nodes[~floor_ok]] = True
        active = ~free & floor_ok
        lo = np.full(k, lam_lo)
        if active.any():
            exact = _exact_levels(terms, seg, k, lam, a1, a2, mm, a3)
            exact = np.where(active, np.clip(exact, lam_lo, lam_hi), lam_lo)
            # Rounding can put a level a hair over its budget: those (rare) nodes are
            # bisected instead, so what is returned always fits.
            ok = fits(exact)
            lo = np.where(active & ok, exact, lo)
            active &= ~ok
        hi = np.full(k, lam_hi)
        for _ in range(ITERATIONS):
            if not active.any():
                break
            mid = np.where(active, 0.5 * (lo + hi), lo)
            ok = fits(mid)
            lo = np.where(active & ok, mid, lo)
            hi = np.where(active & ~ok, mid, hi)
        node_level = np.where(free, np.inf, lo)
        proposed = np.where(covered, node_level[seg], np.inf)
        lower = proposed < lam
        binding[lower] = nodes[seg[lower]]
        lam = np.minimum(lam, proposed)
        if lower.any():
            s_cap, s_use = node_sums(lam)
    return Allocation(level=lam, binding=binding, infeasible=infeasible)


def _exact_levels(
    terms: GpuTerms,
    seg: IntArray,
    k: int,
    below: FloatArray,
    a1: FloatArray,
    a2: FloatArray,
    mm: FloatArray,
    a3: FloatArray,
) -> FloatArray:
    """Per node of a level the highest water level that fits, solved exactly.

    At level L a GPU's cap is ``floor + clamp(L, P, Q) - P`` with ``P = shift + floor``
    and ``Q = max(P, min(shift + max, below))`` (its planned use likewise, between
    ``use_lo`` and ``use_hi``): a node's sums are ramps added up, piecewise linear and
    rising, so each constraint has one highest level, read off the sorted breakpoints.
    A node fits when (band and margin) or aim hold (see the module docstring):
    ``max(min(L_band, max(L_cap<=a2, L_use+margin<=a2)), L_aim)``. One sort instead of
    fifteen bisection steps over every GPU.
    """
    covered = seg >= 0
    sg = seg[covered]
    shift = terms.shift[covered]
    b = below[covered]
    # Two sums per node, as 2k segments: caps (0..k-1), then planned use (k..2k-1).
    lo_w = np.concatenate((terms.floor_w[covered], terms.use_lo_w[covered]))
    hi_w = np.concatenate((terms.max_w[covered], terms.use_hi_w[covered]))
    sid = np.concatenate((sg, sg + k))
    p = np.concatenate((shift, shift)) + lo_w
    q = np.maximum(p, np.minimum(np.concatenate((shift, shift)) + hi_w, np.concatenate((b, b))))
    base = np.bincount(sid, weights=lo_w, minlength=2 * k)
    # The limits each sum must stay under, as (segment, watts the ramps may add).
    q_sid = np.concatenate((np.arange(k), np.arange(k), np.arange(k) + k, np.arange(k) + k))
    q_t = np.concatenate((a2 - base[:k], a3 - base[:k], a1 - base[k:], a2 - mm - base[k:]))
    lv = np.where(q_t < 0, -np.inf, np.inf)

    ramp = q > p
    if ramp.any():
        n = int(ramp.sum())
        node = np.concatenate((sid[ramp], sid[ramp]))
        pos = np.concatenate((p[ramp], q[ramp]))
        span = float(pos.max() - pos.min()) + 1.0
        order = np.argsort(node * span + (pos - pos.min()), kind="stable")
        node, pos = node[order], pos[order]
        slope = np.cumsum(np.concatenate((np.ones(n), -np.ones(n)))[order])
        rise = np.concatenate(([0.0], np.cumsum(slope[:-1] * np.diff(pos))))
        segs = np.arange(2 * k)
        first = np.searchsorted(node, segs, side="left")
        last = np.searchsorted(node, segs, side="right") - 1
        has = last >= first
        at_first = np.where(has, rise[np.minimum(first, pos.size - 1)], 0.0)
        total = np.where(has, rise[np.maximum(last, 0)] - at_first, 0.0)
        local = rise - at_first[node]  # a segment's ramp sum at each of its breakpoints
        big = 2.0 * (float(total.max()) + 1.0)  # one sorted key over all segments
        key = node * big + local
        inside = np.flatnonzero((lv > 0) & (q_t < total[q_sid]))
        if inside.size:
            # The last breakpoint at or under the limit, so a sum flat at exactly the
            # limit (a plateau) is crossed to its end: every level on it fits. Only
            # then land a little inside, along that breakpoint's rising stretch and
            # never back past it, so rounding rarely puts the level over. Shrinking
            # the limit itself instead stopped at a plateau's start: a GPU's whole
            # range between the two was left unused (a rack's caps at its planned
            # use instead of with the headroom its budget allowed).
            t = q_t[inside]
            j = np.searchsorted(key, q_sid[inside] * big + t, side="right") - 1
            room = np.maximum(t - local[j] - 2 * TOLERANCE_W, 0.0)
            rising = slope[j] > 0  # not where a limit a hair under the total finds the last
            lv[inside] = pos[j] + np.where(rising, room, 0.0) / np.where(rising, slope[j], 1.0)
    l_cap2, l_aim, l_band, l_use2 = lv[:k], lv[k : 2 * k], lv[2 * k : 3 * k], lv[3 * k :]
    out: FloatArray = np.maximum(np.minimum(l_band, np.maximum(l_cap2, l_use2)), l_aim)
    return out
