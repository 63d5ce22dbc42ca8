"""Top-down budgets as one water-filling over every constrained level.

Each GPU gets a cap ``clip(level - shift, floor, max)`` from a common water level. The
shift separates priority classes by more than any GPU's range, so as the level rises
the highest class fills from its floors to its maximum before the next class moves off
its floors: priorities at a node come out of the same single number, and an inversion
is impossible by construction.

Each node n imposes one constraint on the GPUs under it: ``sum(cap) <= budget[n]``, in
GPU watts, after the caller has taken out losses, baselines, reservations and the
margin for what no cap reaches. Only the cap sum, because that is the guarantee
(controller/policy/capsum.py): a GPU cannot draw past its cap, so caps that fit the
budget keep the node inside its envelope whatever the demand does and however slowly a
cap lands. Demand only shapes the tiers the caller fills (its floors and maxima); a
constraint on planned use would be a plan that can be wrong, and a margin on it would
strand power the caps already make safe.

Nodes of one kind are disjoint subtrees, so a level of the tree is solved for all its
nodes at once, exactly, from the sorted breakpoints of their cap sums (a bisection only
where rounding puts that answer a hair over budget). Solving racks first and then each
level above with the GPUs held to the level their lower nodes allow is progressive
filling on a tree: a rack that binds early frees its row's budget for the other racks.
The result is then the same as splitting each node's budget among its children
top-down, by class, then job-wide.
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


@dataclass(frozen=True, eq=False)
class Allocation:
    level: FloatArray  # per GPU water level (+inf where nothing binds)
    binding: IntArray  # per GPU the node that set its level, -1 where none
    infeasible: npt.NDArray[np.bool_]  # per node: over budget even with every GPU at floor

    def caps(self, terms: GpuTerms) -> FloatArray:
        return _caps(terms, self.level)


def _caps(terms: GpuTerms, gpu_level: FloatArray) -> FloatArray:
    """Each GPU's cap at these water levels."""
    out: FloatArray = np.minimum(np.maximum(gpu_level - terms.shift, terms.floor_w), terms.max_w)
    return out


def class_spacing(max_w: FloatArray) -> float:
    """A spacing wider than any GPU's range, so classes never overlap."""
    return float(max_w.max(initial=0.0)) + 1.0


def allocate(
    index: TreeIndex,
    terms: GpuTerms,
    budget_w: FloatArray,
    level_cap: FloatArray | None = None,
    n_classes: int = 1,
) -> Allocation:
    """Water levels bottom-up over the tree, each node's caps summing to at most its budget.

    ``level_cap`` pre-limits some GPUs (the levels their jobs allow elsewhere).
    """
    n = index.n_gpus
    lam = np.full(n, np.inf) if level_cap is None else level_cap.copy()
    binding = np.full(n, -1, dtype=np.intp)
    infeasible = np.zeros(index.n_nodes, dtype=bool)
    spacing = class_spacing(terms.max_w)
    lam_lo = float(terms.floor_w.min(initial=0.0)) - 1.0
    lam_hi = float(terms.max_w.max(initial=0.0)) + (n_classes - 1) * spacing + 1.0

    # At the floor level every GPU sits at its floor whatever the levels below say
    # (shifts are >= 0 and floors <= maxima, as build_job_index makes them).
    floor_cap = index.seg_sum(terms.floor_w)
    s_cap = index.seg_sum(_caps(terms, lam))  # as the GPUs stand: updated after a level binds
    last_level = len(index.levels) - 1
    for li, level in enumerate(index.levels):
        nodes = level.nodes
        limit = budget_w[nodes] + TOLERANCE_W
        free = s_cap[nodes] <= limit
        if free.all():
            continue
        seg = level.seg_of_gpu
        covered = seg >= 0
        start = index.start[nodes]
        stop = index.stop[nodes]

        def fits(
            node_level: FloatArray,
            start: IntArray = start,
            stop: IntArray = stop,
            seg: IntArray = seg,
            below: FloatArray = lam,
            limit: FloatArray = limit,
        ) -> npt.NDArray[np.bool_]:
            cap = _caps(terms, np.minimum(node_level[seg], below))
            cs = np.concatenate(([0.0], np.cumsum(cap)))
            ok: npt.NDArray[np.bool_] = cs[stop] - cs[start] <= limit
            return ok

        k = nodes.size
        floor_ok = floor_cap[nodes] <= limit
        infeasible[nodes[~floor_ok]] = True
        active = ~free & floor_ok
        lo = np.full(k, lam_lo)
        if active.any():
            exact = _exact_levels(terms, seg, k, lam, limit)
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
        if lower.any() and li < last_level:  # only the levels above read it
            s_cap = index.seg_sum(_caps(terms, lam))
    return Allocation(level=lam, binding=binding, infeasible=infeasible)


def _exact_levels(
    terms: GpuTerms,
    seg: IntArray,
    k: int,
    below: FloatArray,
    limit_w: FloatArray,
) -> FloatArray:
    """Per node of a level the highest water level whose cap sum fits, solved exactly.

    At level L a GPU's cap is ``floor + clamp(L, P, Q) - P`` with ``P = shift + floor``
    and ``Q = max(P, min(shift + max, below))``: a node's cap sum is ramps added up,
    piecewise linear and rising, so its highest level under ``limit_w`` is read off the
    sorted breakpoints. One sort instead of fifteen bisection steps over every GPU.
    """
    covered = seg >= 0
    if covered.all():  # the usual case: no copies
        sg, shift, lo_w, hi_w, b = seg, terms.shift, terms.floor_w, terms.max_w, below
    else:
        sg, shift, b = seg[covered], terms.shift[covered], below[covered]
        lo_w, hi_w = terms.floor_w[covered], terms.max_w[covered]
    p = shift + lo_w
    q = np.maximum(p, np.minimum(shift + hi_w, b))
    # What the ramps may add on top of the floors before each node's sum is at its limit.
    q_t = limit_w - np.bincount(sg, weights=lo_w, minlength=k)
    lv = np.where(q_t < 0, -np.inf, np.inf)

    ramp = q > p
    if ramp.any():
        if not ramp.all():
            sg, p, q = sg[ramp], p[ramp], q[ramp]
        n = sg.size
        node = np.concatenate((sg, sg))
        pos = np.concatenate((p, q))
        low = float(p.min())  # q >= p, so the lowest breakpoint is a p
        span = float(q.max()) - low + 1.0
        order = np.argsort(node * span + (pos - low), kind="stable")
        node, pos = node[order], pos[order]
        slope = np.cumsum(np.where(order < n, 1.0, -1.0))  # +1 at a p, -1 at a q
        rise = np.empty(2 * n)
        rise[0] = 0.0
        np.cumsum(slope[:-1] * np.diff(pos), out=rise[1:])
        # ``node`` is sorted (the key sorts by node first): each node's run of
        # breakpoints is [first, last], read off the counts instead of searching.
        count = np.bincount(node, minlength=k)
        first = np.cumsum(count) - count
        last = first + count - 1
        has = count > 0
        at_first = np.where(has, rise[np.minimum(first, 2 * n - 1)], 0.0)
        total = np.where(has, rise[np.maximum(last, 0)] - at_first, 0.0)
        local = rise - at_first[node]  # a node's ramp sum at each of its breakpoints
        big = 2.0 * (float(total.max()) + 1.0)  # one sorted key over all nodes
        key = node * big + local
        inside = np.flatnonzero((lv > 0) & (q_t < total))
        if inside.size:
            # The last breakpoint at or under the limit, so a sum flat at exactly the
            # limit (a plateau) is crossed to its end: every level on it fits. Only
            # then land a little inside, along that breakpoint's rising stretch and
            # never back past it, so rounding rarely puts the level over. Shrinking
            # the limit itself instead stopped at a plateau's start: a GPU's whole
            # range between the two was left unused (a rack's caps at its planned
            # use instead of with the headroom its budget allowed).
            t = q_t[inside]
            j = np.searchsorted(key, inside * big + t, side="right") - 1
            room = np.maximum(t - local[j] - 2 * TOLERANCE_W, 0.0)
            rising = slope[j] > 0  # not where a limit a hair under the total finds the last
            lv[inside] = pos[j] + np.where(rising, room, 0.0) / np.where(rising, slope[j], 1.0)
    return lv
