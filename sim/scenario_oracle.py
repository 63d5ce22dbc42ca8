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
marginal work per watt over pricing units (a pace group's GPUs under one lowest node),
each node passing up only what fits it. That greedy is a heuristic, not the dual
minimum: it leaves a gap (larger when a job spans a tight and a slack rack, or a unit
mixes GPUs of very different demand), never an invalid bound. So the reported
``oracle_work`` is a true upper bound along the run's own demand trajectory for any
policy that keeps every node inside its effective envelope at every step (where even
the floors exceed a node's budget, for any policy holding that node at its floors); a
policy that overdraws (``none``) can exceed it, and that shows.

Pricing (the water-filling) is most of the cost; a scenario re-prices once per policy
cycle and whenever a budget changes, and evaluates the dual with those prices every
step. Stale prices still bound; measured, the bound comes out 0.02 % above every-step
pricing on the 1,024-GPU speed hall and 0.3-3 % above it on the shipped 256-GPU
scenarios, where a few jobs' phases move the binding nodes between pricings.

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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree
from controller.policy.index import TreeIndex
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


@dataclass(frozen=True)
class _Units:
    """Pricing units of one placement (see :meth:`WorkOracle._unit_prices`)."""

    unit_of: IntArray  # per GPU in a group (in ``at`` order): its unit
    n: int
    seg: tuple[IntArray, ...]  # per level: each unit's node position there, -1 if none


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
        # Node prices to duals, duals to GPU prices: ancestor tables padded with a zero.
        self._ancestors = _ancestor_table(index, with_self=False)
        self._ancestors_and_self = _ancestor_table(index, with_self=True)
        owner = index.server_owner[index.gpu_server]  # each GPU's lowest constraint node
        self._lowest = np.where(owner >= 0, owner, index.n_nodes)
        self._lam: FloatArray = np.zeros(index.n_nodes)  # in use: binding nodes only
        self._lam_mask = np.zeros(index.n_nodes, dtype=bool)
        self._lam_seen: FloatArray = np.zeros(index.n_nodes)  # last price while binding
        self._pi: FloatArray | None = None
        self._priced_budget_w: FloatArray | None = None  # the budgets of the last pricing
        self._floor_sum_w = index.seg_sum(self.floor_w)
        self._group_src: IntArray | None = None
        empty = np.zeros(0, np.intp)
        self._units = _Units(empty, 0, tuple(empty for _ in index.levels))
        self._group_val: tuple[IntArray, IntArray, int] = (empty, empty, 0)

    def budgets_w(self, envelope_w: FloatArray, base_w: FloatArray) -> FloatArray:
        """GPU-watt budget per constraint node (see module docstring, relaxation 3)."""
        out: FloatArray = envelope_w * self.eta - base_w
        return out

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
        ``reprice`` False the node prices of the last pricing are reused unless the
        budgets changed: any prices give a bound, fresh ones usually a tighter one, and
        pricing is most of the cost.
        """
        index = self.index
        given_budget_w = budget_w
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
        u_sum = index.seg_sum(u)
        over = u_sum > budget_w  # nodes that cannot take their GPUs uncapped
        if not over.any():
            return float(counted_at.sum())  # everything fits uncapped: all at 1
        # Between pricings, only the nodes that bind in this step keep a price: a node
        # that fits its GPUs uncapped has a redundant constraint and the bound only rises
        # with its price (no GPU draws past its demand). A node that starts to bind takes
        # the price it had the last time it was priced binding (any price >= 0 bounds).
        priced = self._priced_budget_w
        if (
            reprice
            or self._pi is None
            or priced is None
            or not np.array_equal(priced, given_budget_w)
        ):
            lam_priced = self._duals(self._unit_prices(u, lo, counted_at, budget_w))
            self._lam_seen = np.where(over, lam_priced, self._lam_seen)
            self._priced_budget_w = given_budget_w.copy()
            self._pi = None
        if self._pi is None or not np.array_equal(over, self._lam_mask):
            self._lam = np.where(over, self._lam_seen, 0.0)
            self._lam_mask = over
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
        dual = float(lam @ budget_w + terms.max(axis=1).sum() - fixed)
        return min(dual, float(counted_at.sum()))  # nobody runs faster than uncapped

    def _slots(self, group: IntArray) -> tuple[IntArray, IntArray, int]:
        """The GPUs in a pace group, each one's group, and how many group ids there are.

        Groups change only when a job starts, ends or moves, so the last answer is reused
        while the array is equal to the last one; a read-only array (the simulated
        scheduler hands out the same one until placement changes) is trusted by identity.
        Group ids may be sparse: they are renumbered densely. The pricing units (a
        group's GPUs under one lowest constraint node) are rebuilt with them.
        """
        src = self._group_src
        if src is not None and (
            (src is group and not group.flags.writeable) or np.array_equal(src, group)
        ):
            return self._group_val
        index = self.index
        at = np.flatnonzero(group >= 0)
        _, dense = np.unique(group[at], return_inverse=True)
        slot = dense.reshape(-1).astype(np.intp)
        lowest = index.server_owner[index.gpu_server[at]]
        key = slot * (index.n_nodes + 1) + (lowest + 1)
        _, first, unit_of = np.unique(key, return_index=True, return_inverse=True)
        rep = at[first]  # one GPU of each unit: every level puts the unit where it is
        self._units = _Units(
            unit_of=unit_of.reshape(-1),
            n=int(first.size),
            seg=tuple(level.seg_of_gpu[rep] for level in index.levels),
        )
        self._group_src = group if not group.flags.writeable else group.copy()
        self._group_val = (at, slot, int(slot.max()) + 1 if slot.size else 0)
        return self._group_val

    def _unit_prices(
        self, u: FloatArray, lo: FloatArray, counted_at: FloatArray, budget_w: FloatArray
    ) -> FloatArray:
        """Node prices from the pricing units' hull segments above their floors.

        A unit is what one ratio ``x`` drives in one lowest node: the counted GPUs of
        one pace group there with demand above their floor, ``N`` of them drawing
        ``U = sum(u)`` uncapped. Its segment k holds ``(x_hi - x_lo) U`` watts at
        ``N slope_k / U`` work per watt. Pricing units instead of GPUs is 10-20 times
        fewer pairs to sort; any prices bound.
        """
        units = self._units
        at = self._group_val[0]
        # A GPU whose demand is at or below its floor runs at full speed at its floor:
        # it has no segment to price, and mixed into a unit it would shift the unit's.
        counted_at = counted_at * (u[at] > lo[at])
        n_u = np.bincount(units.unit_of, weights=counted_at, minlength=units.n)
        u_u = np.bincount(units.unit_of, weights=u[at] * counted_at, minlength=units.n)
        lo_u = np.bincount(units.unit_of, weights=lo[at] * counted_at, minlength=units.n)
        safe = np.where(u_u > 0, u_u, 1.0)
        lo_x = np.where(u_u > 0, lo_u / safe, 1.0)
        start = np.maximum(self.seg_lo[None, :], lo_x[:, None])
        cap = np.where(
            (n_u > 0)[:, None], np.maximum(self.seg_hi[None, :] - start, 0.0) * u_u[:, None], 0.0
        )
        density = np.where(cap > 0, self.slope[None, :] * (n_u / safe)[:, None], 0.0)
        return self._prices(units.seg, lo, cap, density, budget_w)

    def _prices(
        self,
        unit_seg: tuple[IntArray, ...],
        lo: FloatArray,
        cap: FloatArray,
        density: FloatArray,
        budget_w: FloatArray,
    ) -> FloatArray:
        """Work-per-watt price of each node: the density of its marginal segment.

        ``cap`` and ``density`` are per (unit, hull segment), ``unit_seg`` per level each
        unit's node there (-1 if none). The pairs are sorted by density once; each level
        that binds re-sorts them by node with a stable radix sort, which keeps the density
        order within a node. Ties in density need no order: the price is the density where a
        node's running sum first passes its room, the same whichever tied pair comes first.
        """
        index = self.index
        price = np.zeros(index.n_nodes)
        lo_sum = index.seg_sum(lo)
        u_idx, k_idx = np.nonzero(cap > 0)
        d = density[u_idx, k_idx]
        order = np.argsort(-d)
        u_s, d_s = u_idx[order], d[order]
        c_s = cap[u_idx, k_idx][order]  # what each pair may still take (a node cuts it)
        alive = np.ones(d_s.size, dtype=bool)
        for level, seg in zip(index.levels, unit_seg, strict=True):
            nodes = level.nodes
            room = budget_w[nodes] - lo_sum[nodes]
            node_of = seg[u_s]
            avail = alive & (node_of >= 0)
            # Most levels fit whatever the nodes below let through: no price.
            taken = np.bincount(node_of[avail], weights=c_s[avail], minlength=nodes.size)
            if not (taken > room + 1e-9).any():
                continue
            idx = np.flatnonzero(avail)
            # 16-bit keys (up to 32,767 nodes a level) make the stable sort a radix sort.
            key = np.int16 if nodes.size < 2**15 else np.int32
            sel = idx[np.argsort(node_of[idx].astype(key), kind="stable")]
            node_s = node_of[sel]
            cum = np.cumsum(c_s[sel])
            first = np.searchsorted(node_s, np.arange(nodes.size), side="left")
            before = np.where(first > 0, cum[np.maximum(first - 1, 0)] if cum.size else 0.0, 0.0)
            used = cum - before[node_s]  # running sum within the node, by falling density
            over = used > room[node_s] + 1e-9
            lvl = np.zeros(nodes.size)
            if over.any():
                pos = np.flatnonzero(over)
                hit = node_s[pos]
                head = np.concatenate(([True], hit[1:] != hit[:-1]))
                marginal = pos[head]  # the first pair of each node that does not fit
                lvl[hit[head]] = d_s[sel[marginal]]
                # What the node lets through to the levels above: the pairs before the
                # marginal one, and of that one the part that fits.
                c_s[sel[marginal]] = np.maximum(
                    room[hit[head]] - (used[marginal] - c_s[sel[marginal]]), 0.0
                )
                cut = over.copy()
                cut[marginal] = False
                alive[sel[cut]] = False
            price[nodes] = lvl
        return price

    def _duals(self, price: FloatArray) -> FloatArray:
        """lambda_n = price_n above the highest price of its ancestors (never negative)."""
        padded = np.append(price, 0.0)
        out: FloatArray = np.maximum(price - padded[self._ancestors].max(axis=1), 0.0)
        return out

    def _gpu_price(self, lam: FloatArray) -> FloatArray:
        """Sum of the duals of every node above each GPU."""
        above = np.append(lam, 0.0)[self._ancestors_and_self].sum(axis=1)
        out: FloatArray = np.append(above, 0.0)[self._lowest]
        return out


def _ancestor_table(index: TreeIndex, with_self: bool) -> IntArray:
    """Per constraint node its constraint ancestors (and itself), padded with n_nodes."""
    n = index.n_nodes
    rows: list[list[int]] = []
    for k in range(n):
        chain = [k] if with_self else []
        p = int(index.parent[k])
        while p >= 0:
            chain.append(p)
            p = int(index.parent[p])
        rows.append(chain)
    width = max((len(r) for r in rows), default=0) + 1  # at least one pad column
    table = np.full((n, width), n, dtype=np.intp)
    for k, chain in enumerate(rows):
        table[k, : len(chain)] = chain
    return table
