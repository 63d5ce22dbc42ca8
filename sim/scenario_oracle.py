"""The work bound of a scenario step: no policy inside the envelopes can deliver more.

Per step the scheduler knows each GPU's uncapped demand ``u`` (capped at its maximum),
whether its power turns into counted work (``w`` = 1: a training job iterating, an
inference replica with a request in flight) and the floor no cap may go below. Delivered
work in the step is ``dt * sum over jobs of n_j * rate(min over the job's GPUs of p/u)``.

The bound relaxes that problem three ways, each of which can only raise the optimum:

1. a pace group (a synchronous job, or an inference replica) runs all its GPUs at one
   ratio ``x = p/u`` (more power to some GPUs of a group adds no work), and the floors
   of counted GPUs are dropped;
2. ``rate`` is replaced by its upper concave hull;
3. conversion losses are taken at each converter's best efficiency: a node's GPU
   budget is ``envelope * eta - baselines`` with ``eta`` the product of the peak
   efficiencies down its most efficient chain, so any allocation whose real input fits
   the envelope fits this budget too.

What remains is a concave maximisation over the tree's nested (laminar) budgets. Its
Lagrangian dual gives, for ANY prices ``lambda >= 0`` on the nodes, a value at least the
optimum (weak duality); the prices come from water-filling each level bottom-up by
marginal work per watt, GPU by GPU (exact greedy per level), which leaves a small gap
when a job spans a tight and a slack rack. So the reported ``oracle_work`` is a true
upper bound along the run's own demand trajectory for any policy that keeps every node
inside its effective envelope at every step (where even the floors exceed a node's
budget, for any policy holding that node at its floors); a policy that overdraws
(``none``) can exceed it, and that shows.

Pricing (the water-filling) is most of the cost; a scenario re-prices once per policy
cycle and whenever an envelope or a baseline changes, and evaluates the dual with those
prices every step (stale prices still bound, about 0.7 % above fresh ones).

The bound is clairvoyant: it is evaluated every 100 ms step with that step's demand, so
it moves power to a job in its compute phase from a neighbour in its communication
phase within the same rack. No causal controller can do that (a limit lands 0.2-2 s
after it is asked for, and telemetry is a cycle old); a policy that holds each job's
cap over its iterations, as static caps and rackpower do, stays some percent below it
wherever jobs with unaligned phases share a constrained node. That part of the gap is
the price of causality, not of the policy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from controller.policy.index import TreeIndex
from controller.topology import PowerTree
from sim.workloads import ThroughputCurve

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
Curve = tuple[tuple[float, float], ...]


def concave_hull(points: Curve) -> tuple[FloatArray, FloatArray]:
    """Upper concave hull of a rising curve through (0, 0) and (1, 1): breakpoints x, y."""
    pts = sorted(points)
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or below the chord to p.
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return np.array([x for x, _ in hull]), np.array([y for _, y in hull])


def chain_efficiency(tree: PowerTree, index: TreeIndex, curves: Mapping[str, Curve]) -> FloatArray:
    """Per constraint node: product of peak efficiencies down its most efficient chain."""
    eta = dict.fromkeys(tree.order, 1.0)
    for nid in reversed(tree.order):
        node = tree.node(nid)
        if node.kind in ("gpu", "node"):
            continue
        best_child = max((eta[c] for c in tree.children(nid)), default=1.0)
        curve = curves.get(nid)
        peak = max(e for _, e in curve) if curve else 1.0
        eta[nid] = peak * best_child
    return np.array([eta[nid] for nid in index.node_ids], dtype=np.float64)


class WorkOracle:
    """Per-step upper bound on GPU-seconds of work, vectorised over GPUs and hull segments."""

    def __init__(self, index: TreeIndex, eta: FloatArray, curve: ThroughputCurve) -> None:
        self.index = index
        self.eta = eta
        hx, hy = concave_hull(curve.points)
        self.hull_x = hx
        self.hull_y = hy
        self.seg_lo = hx[:-1]
        self.seg_hi = hx[1:]
        self.slope = np.diff(hy) / np.diff(hx)  # falling: concave
        self.floor_w = index.gpu_floor_w
        self.max_w = index.gpu_max_w
        # Top-down order of levels (feed first) for turning node prices into duals.
        self._levels_down = tuple(reversed(index.levels))
        self._lam: FloatArray = np.zeros(index.n_nodes)
        self._pi: FloatArray | None = None
        self._floor_sum_w = index.seg_sum(self.floor_w)
        self._budget_key: tuple[FloatArray, FloatArray] | None = None
        self._budget_w: FloatArray = np.zeros(index.n_nodes)
        self._group_src: IntArray | None = None
        empty = np.zeros(0, np.intp)
        self._group_val: tuple[IntArray, IntArray, int] = (empty, empty, 0)

    def budgets_w(self, envelope_w: FloatArray, base_w: FloatArray) -> FloatArray:
        """GPU-watt budget per constraint node (see module docstring, relaxation 3).

        The last answer is kept for the same two arrays (a scenario makes new ones when
        an envelope or a baseline changes, and never changes one in place).
        """
        last = self._budget_key
        if last is not None and last[0] is envelope_w and last[1] is base_w:
            return self._budget_w
        self._budget_key = (envelope_w, base_w)
        self._budget_w = envelope_w * self.eta - base_w
        return self._budget_w

    def bound(
        self,
        demand_w: FloatArray,
        weight: FloatArray,
        group: IntArray,
        budget_w: FloatArray,
        reprice: bool = True,
    ) -> float:
        """Upper bound of the step's work rate (GPU-seconds per second).

        ``weight`` is 1 where a GPU's power turns into counted work this step, ``group``
        its pace group (a synchronous job or an inference replica, -1 for none). With
        ``reprice`` False the node prices of the last repriced step are reused: any
        prices give a bound, fresh ones a tighter one, and pricing is most of the cost.
        """
        index = self.index
        u = np.minimum(np.maximum(demand_w, 0.0), self.max_w)
        lo = np.minimum(u, self.floor_w)
        # Where even the floors do not fit (load no cap reaches: only moving work helps),
        # no policy is inside the envelope; bound those that hold such a node at its
        # floors. Without this the node's price is "infinite" and the bound meaningless.
        # (Only where a budget is below the node's floors at full demand can that be.)
        if (budget_w < self._floor_sum_w).any():
            budget_w = np.maximum(budget_w, index.seg_sum(lo))
        at, slot, n_slots = self._slots(group)
        counted_at = (weight[at] > 0).astype(np.float64)  # of the GPUs in a group
        if not (index.seg_sum(u) > budget_w).any():
            return float(counted_at.sum())  # everything fits uncapped: all at 1
        if reprice or self._pi is None:
            counted = np.zeros(index.n_gpus, dtype=bool)
            counted[at] = counted_at > 0
            safe_u = np.where(u > 0, u, 1.0)
            lo_x = np.where(u > 0, lo / safe_u, 1.0)
            # Per-GPU segments above the floor, for the prices only (any prices bound).
            start = np.maximum(self.seg_lo[None, :], lo_x[:, None])
            cap = np.where(
                counted[:, None], np.maximum(self.seg_hi[None, :] - start, 0.0) * u[:, None], 0.0
            )
            density = np.where(cap > 0, self.slope[None, :] / safe_u[:, None], 0.0)
            price = self._prices(lo, cap, density, budget_w)
            self._lam = self._duals(price)
            self._pi = self._gpu_price(self._lam)
        lam, pi = self._lam, self._pi
        # Dual value. A counted group takes one ratio x for all its GPUs (p_g = x u_g; the
        # floors of counted GPUs are dropped, which only loosens): its best term is
        # max over the hull's breakpoints of N r(x) - x sum(pi u), a concave piecewise
        # linear function of x (0 for a group with no counted GPU). Everything else sits
        # at its floor: -pi lo.
        n_in = np.bincount(slot, weights=counted_at, minlength=n_slots)
        cost = np.bincount(slot, weights=(pi * u)[at] * counted_at, minlength=n_slots)
        terms = n_in[:, None] * self.hull_y[None, :] - cost[:, None] * self.hull_x[None, :]
        pi_lo = pi * lo
        fixed = float(pi_lo.sum() - pi_lo[at] @ counted_at)
        return float(lam @ budget_w + terms.max(axis=1).sum() - fixed)

    def _slots(self, group: IntArray) -> tuple[IntArray, IntArray, int]:
        """The GPUs in a pace group, each one's group, and how many group ids there are.

        Groups change only when a job starts, ends or moves; the simulated scheduler
        hands out the same array until then, so the last answer is reused.
        """
        src = self._group_src
        if src is not None and (src is group or np.array_equal(src, group)):
            self._group_src = group
            return self._group_val
        at = np.flatnonzero(group >= 0)
        slot = group[at]
        self._group_src = group
        self._group_val = (at, slot, int(slot.max()) + 1 if slot.size else 0)
        return self._group_val

    def _prices(
        self, lo: FloatArray, cap: FloatArray, density: FloatArray, budget_w: FloatArray
    ) -> FloatArray:
        """Work-per-watt price of each node: the density of its marginal segment.

        The (GPU, segment) pairs are sorted by density once; each level that binds
        re-sorts them by node with a stable radix sort, which keeps the density order
        within a node. Ties in density need no order: the price is the density where a
        node's running sum first passes its room, the same whichever tied pair comes first.
        """
        index = self.index
        price = np.zeros(index.n_nodes)
        below = np.zeros(index.n_gpus)  # the highest price a node below already set
        top = float(density.max(initial=0.0)) * 2.0 + 1.0
        lo_sum = index.seg_sum(lo)
        g_idx, k_idx = np.nonzero(cap > 0)
        d = density[g_idx, k_idx]
        order = np.argsort(-d)
        g_s, d_s, c_s = g_idx[order], d[order], cap[g_idx, k_idx][order]
        for level in index.levels:
            seg = level.seg_of_gpu
            nodes = level.nodes
            room = budget_w[nodes] - lo_sum[nodes]
            node_of = seg[g_s]
            avail = (d_s > below[g_s]) & (node_of >= 0)
            # Most levels fit whatever the GPUs take at the prices set below: no price.
            taken = np.bincount(node_of[avail], weights=c_s[avail], minlength=nodes.size)
            if not (taken > room + 1e-9).any():
                continue
            idx = np.flatnonzero(avail)
            # 16-bit keys (up to 32,767 nodes a level) make the stable sort a radix sort.
            key = np.int16 if nodes.size < 2**15 else np.int32
            by_node = np.argsort(node_of[idx].astype(key), kind="stable")
            sel = idx[by_node]
            node_s, d_n = node_of[sel], d_s[sel]
            cum = np.cumsum(c_s[sel])
            first = np.searchsorted(node_s, np.arange(nodes.size), side="left")
            before = np.where(first > 0, cum[np.maximum(first - 1, 0)] if cum.size else 0.0, 0.0)
            over = cum - before[node_s] > room[node_s] + 1e-9
            lvl = np.zeros(nodes.size)
            if over.any():
                pos = np.flatnonzero(over)
                # First over-budget pair of each node (sorted by density within a node).
                hit = node_s[pos]
                head = np.concatenate(([True], hit[1:] != hit[:-1]))
                lvl[hit[head]] = d_n[pos[head]]
            lvl = np.where(room < 0, top, lvl)
            price[nodes] = lvl
            below = np.where(seg >= 0, np.maximum(below, lvl[np.maximum(seg, 0)]), below)
        return price

    def _duals(self, price: FloatArray) -> FloatArray:
        """lambda_n = price_n above the highest price of its ancestors (never negative)."""
        index = self.index
        lam = np.zeros(index.n_nodes)
        anc_max = np.zeros(index.n_nodes)  # highest price among each node's ancestors
        for level in self._levels_down:
            nodes = level.nodes
            parent = index.parent[nodes]
            above = np.where(
                parent >= 0,
                np.maximum(anc_max[np.maximum(parent, 0)], price[np.maximum(parent, 0)]),
                0.0,
            )
            above = np.where(parent >= 0, above, 0.0)
            anc_max[nodes] = above
            lam[nodes] = np.maximum(price[nodes] - above, 0.0)
        return lam

    def _gpu_price(self, lam: FloatArray) -> FloatArray:
        """Sum of the duals of every node above each GPU."""
        index = self.index
        pi = np.zeros(index.n_gpus)
        for level in index.levels:
            seg = level.seg_of_gpu
            pi += np.where(seg >= 0, lam[level.nodes][np.maximum(seg, 0)], 0.0)
        return pi
