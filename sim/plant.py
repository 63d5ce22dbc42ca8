"""The electrical plant: a vectorised discrete-time model of a site's power tree.

``Plant.step(state, setpoints, dt_s) -> state`` advances every GPU, converter and breaker
of a :class:`~controller.model.topology.PowerTree` by one time step with a handful of NumPy
operations per tree level, so an hour of a 1,024-GPU site at 100 ms steps runs in
seconds. The state is an immutable snapshot: ``step`` never mutates its input, which is
what lets a scenario runner keep the previous state for ramp and overshoot figures.

What each node *measures* (the quantity its rating, envelope and trip curve apply to)
is its **input power**: the power drawn from its parent, upstream of any converter
the node stands for. With ``out(n)`` = the sum of the children's input power (plus, for
a GPU server, its GPUs and its baseline) and ``eff(n)`` its efficiency at load fraction
``out(n) / rating(n)``::

    in(n) = out(n) / eff(n)

So a rack with PSU shelves reads ``(sum of its servers' draw) / eff(rack)``, as its PDU
does; an SST reads what it takes from the feed. Nodes without an efficiency curve in the
config use :data:`DEFAULT_EFFICIENCY` for their kind (1.0 for kinds that convert
nothing). ``state.node_output_w`` keeps ``out(n)`` for frontends that serve a
converter's output point. Energy balance, exactly: feed input = GPUs + baselines +
extra loads (``Setpoints.extra_load_w``) + sum over nodes of ``in(n) - out(n)``.

Breakers integrate heat against their trip curve (see :meth:`Plant.step`); a trip
darkens everything below it until :meth:`Plant.reclose`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from controller.model.config import TripCurve
from controller.model.topology import PowerTree

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

Curve = tuple[tuple[float, float], ...]

#: Load fraction of rating -> efficiency, for nodes whose config gives no curve.
#: SSTs, HVDC rectifier rows and in-rack PSU shelves peak at 97-98 % around half load;
#: feeds, buses and GPU servers (whose PSU loss is in their baseline) convert nothing.
DEFAULT_EFFICIENCY: Mapping[str, Curve] = {
    "sst": ((0.05, 0.90), (0.2, 0.965), (0.5, 0.98), (1.0, 0.975)),
    "row": ((0.05, 0.90), (0.2, 0.96), (0.5, 0.975), (1.0, 0.97)),
    "rack": ((0.05, 0.86), (0.2, 0.94), (0.5, 0.97), (1.0, 0.965)),
}


@dataclass(frozen=True)
class PlantConfig:
    """Physical constants of the model; the defaults are NVML in-band capping."""

    actuation_delay_s: float = 0.2  # a requested limit lands this long after it is asked for
    response_tau_s: float = 0.05  # then the GPU settles to it with this time constant
    cool_tau_s: float = 300.0  # breaker heat decays with this time constant when unloaded
    power_window_s: float = 1.0  # nvmlDeviceGetPowerUsage averages over this window
    default_efficiency: Mapping[str, Curve] = field(
        default_factory=lambda: dict(DEFAULT_EFFICIENCY)
    )


@dataclass(frozen=True)
class Setpoints:
    """What the outside world asks of the plant for one step.

    ``demand_w`` is what each GPU would draw uncapped (the workloads'); a GPU without work
    should be given its idle draw, not zero. ``limit_request_w`` is the power-limit
    vector the actuators have asked for (``None`` keeps the last one); requests are
    clamped to each GPU's [min_w, max_w] as NVML does.
    """

    demand_w: FloatArray
    limit_request_w: FloatArray | None = None
    lost_sources: frozenset[str] = frozenset()
    actuation_delay_s: float | None = None  # None: PlantConfig.actuation_delay_s
    # Per node (Plant.node_ids): load no cap reaches and the config does not know, drawn
    # at that node's output (a cooling fault running fans flat out, kit plugged in
    # unmetered). It is what makes a node infeasible for caps alone. None: nothing.
    extra_load_w: FloatArray | None = None


@dataclass(frozen=True)
class TripEvent:
    t_s: float
    element_id: str  # a tree node id or a feed source id
    cause: Literal["overload", "instant"]
    load_ratio: float  # input power / rating at the moment it tripped


@dataclass(frozen=True, slots=True)
class PlantState:
    """One instant of the plant. Arrays are never written after the state is built.

    Per-GPU arrays are indexed like ``tree.gpus``; per-node arrays like
    :attr:`Plant.node_ids` (the tree's non-GPU nodes in depth-first order); per-element
    arrays like :attr:`Plant.element_ids` (those nodes, then every feed source).
    """

    t_s: float
    gpu_demand_w: FloatArray
    gpu_power_w: FloatArray  # instantaneous (NVML_FI_DEV_POWER_INSTANT)
    gpu_power_1s_w: FloatArray  # boxcar over the last power_window_s (nvmlDeviceGetPowerUsage)
    gpu_limit_w: FloatArray  # enforced limit, after actuation delay and response
    gpu_target_w: FloatArray  # the last request that has landed
    last_request_w: FloatArray  # the last request asked for (landed or not)
    pending: tuple[tuple[float, FloatArray], ...]  # (issued at, request), oldest first
    window: tuple[tuple[float, FloatArray], ...]  # (dt, power * dt) inside the power window
    window_energy_j: FloatArray
    window_s: float
    node_power_w: FloatArray  # input power: what the node measures
    node_output_w: FloatArray
    source_power_w: FloatArray
    heat: FloatArray  # per element, 0..1; 1 = trip
    tripped: BoolArray  # per element
    dark_node: BoolArray
    dark_gpu: BoolArray
    lost_sources: frozenset[str]
    trips: tuple[TripEvent, ...]
    feed_power_w: float  # sum of the roots' input power
    gpu_total_w: float
    baseline_total_w: float
    losses_w: float
    extra_total_w: float = 0.0  # Setpoints.extra_load_w drawn (0 where dark)

    @property
    def heat_pct(self) -> FloatArray:
        """Trip-integrator fill per element in percent (100 = tripped)."""
        return self.heat * 100.0


@dataclass(frozen=True)
class _CurveTable:
    """A trip curve in log-log form, for the vectorised allowed-time lookup."""

    log_ratio: FloatArray
    log_seconds: FloatArray
    tail_slope: float  # d log t / d log r beyond the last point
    first_ratio: float
    instant_ratio: float

    @classmethod
    def of(cls, curve: TripCurve) -> _CurveTable:
        lr = np.log(np.array([r for r, _ in curve.points], dtype=np.float64))
        ls = np.log(np.array([s for _, s in curve.points], dtype=np.float64))
        # One point: breakers are I^2 t devices, so t ~ 1 / r^2 beyond it.
        slope = float((ls[-1] - ls[-2]) / (lr[-1] - lr[-2])) if len(lr) > 1 else -2.0
        return cls(lr, ls, slope, curve.points[0][0], curve.instant_ratio)

    def allowed_s(self, ratio: FloatArray) -> FloatArray:
        """Seconds a constant overload ``ratio`` may last: log-log interpolation of the points."""
        lr = np.log(ratio)
        ls = np.interp(lr, self.log_ratio, self.log_seconds)
        beyond = lr > self.log_ratio[-1]
        if beyond.any():
            tail = self.log_seconds[-1] + self.tail_slope * (lr - self.log_ratio[-1])
            ls = np.where(beyond, tail, ls)
        out: FloatArray = np.exp(ls)
        return out


@dataclass(frozen=True)
class _Level:
    """The nodes at one depth, their parents and their efficiency groups."""

    idx: IntArray
    parent: IntArray  # parent node index per entry of idx (-1 for roots)
    groups: tuple[tuple[IntArray, FloatArray, FloatArray, FloatArray], ...]
    # (positions within idx, 1/rating, curve load fractions, curve efficiencies)
    whole: tuple[FloatArray, FloatArray, FloatArray] | None = None  # one group covering idx


class Plant:
    """Static description of the plant built once from a tree; ``step`` does the physics."""

    def __init__(self, tree: PowerTree, config: PlantConfig | None = None) -> None:
        self.tree = tree
        self.config = config or PlantConfig()
        nodes = [tree.node(nid) for nid in tree.order if tree.node(nid).kind != "gpu"]
        self.node_ids: tuple[str, ...] = tuple(n.id for n in nodes)
        self.node_index: Mapping[str, int] = {nid: i for i, nid in enumerate(self.node_ids)}
        n_nodes = len(nodes)
        self.n_nodes = n_nodes
        self.n_gpus = len(tree.gpus)
        self.gpu_min_w: FloatArray = np.array([g.min_w for g in tree.gpus], dtype=np.float64)
        self.gpu_max_w: FloatArray = np.array([g.max_w for g in tree.gpus], dtype=np.float64)
        self.gpu_default_w: FloatArray = np.array(
            [g.default_w for g in tree.gpus], dtype=np.float64
        )

        parent = np.array(
            [self.node_index[n.parent] if n.parent is not None else -1 for n in nodes],
            dtype=np.intp,
        )
        depth = np.zeros(n_nodes, dtype=np.intp)
        for i, p in enumerate(parent):  # parents come first in depth-first order
            if p >= 0:
                depth[i] = depth[p] + 1
        self.node_parent = parent
        self.node_rating_w: FloatArray = np.array([n.rating_w for n in nodes], dtype=np.float64)
        self.node_envelope_w: FloatArray = np.array([n.envelope_w for n in nodes], dtype=np.float64)

        # Servers: their GPUs are a contiguous run, so a cumsum difference sums them.
        servers = [i for i, n in enumerate(nodes) if n.kind == "node"]
        self._server_idx = np.array(servers, dtype=np.intp)
        ranges = [tree.gpu_range(nodes[i].id) for i in servers]
        self._server_gpu_start = np.array([a for a, _ in ranges], dtype=np.intp)
        self._server_gpu_stop = np.array([b for _, b in ranges], dtype=np.intp)
        self._server_baseline_w: FloatArray = np.array(
            [nodes[i].baseline_w for i in servers], dtype=np.float64
        )

        # Subtree spans in node order and GPU ranges, for darkening what a trip drops.
        size = np.ones(n_nodes, dtype=np.intp)
        for i in range(n_nodes - 1, -1, -1):
            if parent[i] >= 0:
                size[parent[i]] += size[i]
        self._span = [(i, i + int(size[i])) for i in range(n_nodes)]
        self._gpu_span = [tree.gpu_range(nid) for nid in self.node_ids]
        self.roots: IntArray = np.flatnonzero(parent < 0).astype(np.intp)

        self._levels = self._build_levels(nodes, parent, depth)

        # Elements: every node, then every feed source (each has its own breaker).
        src_ids: list[str] = []
        src_feed: list[int] = []
        src_share: list[float] = []
        src_rating: list[float] = []
        src_curve: list[TripCurve | None] = []
        for i, n in enumerate(nodes):
            for s in n.sources:
                src_ids.append(s.id)
                src_feed.append(i)
                src_share.append(s.share)
                src_rating.append(s.rating_w)
                curve = s.trip_curve
                if isinstance(curve, str):
                    curve = tree.site.spec.trip_curves.get(curve)
                src_curve.append(curve)
        self.source_ids: tuple[str, ...] = tuple(src_ids)
        self.source_index: Mapping[str, int] = {s: i for i, s in enumerate(src_ids)}
        self._src_feed = np.array(src_feed, dtype=np.intp)
        self._src_share: FloatArray = np.array(src_share, dtype=np.float64)
        self._split_key: tuple[bytes, frozenset[str]] | None = None
        self._split: FloatArray = np.zeros(len(src_ids))
        self.element_ids: tuple[str, ...] = self.node_ids + self.source_ids
        self.element_index: Mapping[str, int] = {e: i for i, e in enumerate(self.element_ids)}
        self.element_rating_w: FloatArray = np.concatenate(
            (self.node_rating_w, np.array(src_rating, dtype=np.float64))
        )
        curves: list[TripCurve | None] = [n.trip_curve for n in nodes] + src_curve
        self._build_protection(curves)

    # -- construction -----------------------------------------------------------------

    def _curve_for(self, kind: str, own: Curve | None) -> Curve | None:
        if own is not None:
            return own
        return self.config.default_efficiency.get(kind)

    def _build_levels(
        self, nodes: Sequence[object], parent: IntArray, depth: IntArray
    ) -> tuple[_Level, ...]:
        levels: list[_Level] = []
        for d in range(int(depth.max()) if len(depth) else -1, -1, -1):
            idx = np.flatnonzero(depth == d).astype(np.intp)
            by_curve: dict[Curve, list[int]] = {}
            for pos, i in enumerate(idx):
                n = self.tree.node(self.node_ids[i])
                own = tuple(n.efficiency.points) if n.efficiency is not None else None
                curve = self._curve_for(n.kind, own)
                if curve is not None and any(e != 1.0 for _, e in curve):
                    by_curve.setdefault(curve, []).append(pos)
            groups = []
            for curve, positions in by_curve.items():
                pos_arr = np.array(positions, dtype=np.intp)
                inv_rating = 1.0 / self.node_rating_w[idx[pos_arr]]
                xp = np.array([x for x, _ in curve], dtype=np.float64)
                fp = np.array([e for _, e in curve], dtype=np.float64)
                groups.append((pos_arr, inv_rating, xp, fp))
            whole = None
            if len(groups) == 1 and len(groups[0][0]) == len(idx):
                whole = groups[0][1:]
            levels.append(_Level(idx, parent[idx], tuple(groups), whole))
        return tuple(levels)

    def _build_protection(self, curves: Sequence[TripCurve | None]) -> None:
        tables: list[_CurveTable] = []
        keyed: dict[tuple[tuple[tuple[float, float], ...], float], int] = {}
        prot: list[int] = []
        prot_curve: list[int] = []
        for e, c in enumerate(curves):
            if c is None:
                continue
            key = (tuple(c.points), c.instant_ratio)
            if key not in keyed:
                keyed[key] = len(tables)
                tables.append(_CurveTable.of(c))
            prot.append(e)
            prot_curve.append(keyed[key])
        self._tables = tuple(tables)
        self._prot = np.array(prot, dtype=np.intp)
        pc = np.array(prot_curve, dtype=np.intp)
        self._prot_groups = tuple(np.flatnonzero(pc == k) for k in range(len(tables)))
        self._prot_first = np.array([tables[k].first_ratio for k in pc], dtype=np.float64)
        self._prot_instant = np.array([tables[k].instant_ratio for k in pc], dtype=np.float64)
        self._prot_inv_rating = 1.0 / self.element_rating_w[self._prot]
        self.protected_ids: tuple[str, ...] = tuple(self.element_ids[e] for e in prot)

    # -- state ------------------------------------------------------------------------

    def initial_state(
        self, limit_w: FloatArray | None = None, demand_w: FloatArray | None = None
    ) -> PlantState:
        """Everything energised and cold, limits settled at ``limit_w`` (default: NVML default)."""
        limit = np.clip(
            self.gpu_default_w if limit_w is None else np.asarray(limit_w, dtype=np.float64),
            self.gpu_min_w,
            self.gpu_max_w,
        )
        zeros_g = np.zeros(self.n_gpus)
        n_el = len(self.element_ids)
        state = PlantState(
            t_s=0.0,
            gpu_demand_w=zeros_g,
            gpu_power_w=zeros_g,
            gpu_power_1s_w=zeros_g,
            gpu_limit_w=limit,
            gpu_target_w=limit,
            last_request_w=limit,
            pending=(),
            window=(),
            window_energy_j=zeros_g,
            window_s=0.0,
            node_power_w=np.zeros(self.n_nodes),
            node_output_w=np.zeros(self.n_nodes),
            source_power_w=np.zeros(len(self.source_ids)),
            heat=np.zeros(n_el),
            tripped=np.zeros(n_el, dtype=bool),
            dark_node=np.zeros(self.n_nodes, dtype=bool),
            dark_gpu=np.zeros(self.n_gpus, dtype=bool),
            lost_sources=frozenset(),
            trips=(),
            feed_power_w=0.0,
            gpu_total_w=0.0,
            baseline_total_w=0.0,
            losses_w=0.0,
        )
        if demand_w is not None:
            # Settle the meters on the initial load without advancing time or heat.
            state = self.step(state, Setpoints(demand_w=demand_w), 0.0)
        return state

    def reclose(self, state: PlantState, element_ids: Sequence[str]) -> PlantState:
        """Reset tripped breakers (an operator action); their heat starts from cold."""
        tripped = state.tripped.copy()
        heat = state.heat.copy()
        for eid in element_ids:
            e = self.element_index[eid]
            tripped[e] = False
            heat[e] = 0.0
        dark_node, dark_gpu = self._darkness(tripped, state.lost_sources)
        return replace(state, tripped=tripped, heat=heat, dark_node=dark_node, dark_gpu=dark_gpu)

    # -- physics ------------------------------------------------------------------------

    def step(self, state: PlantState, setpoints: Setpoints, dt_s: float) -> PlantState:
        """Advance ``dt_s`` seconds: limits, GPU power, losses up the tree, breakers.

        Breakers: each protected element keeps a heat fraction ``h``. While its load ratio
        ``r`` (input / rating) is at or above the curve's first point, ``h`` grows by
        ``dt / allowed_s(r)`` (log-log interpolation of the curve), so a constant overload
        trips after exactly the curve's time; below it, ``h`` decays with ``cool_tau_s``
        scaled by ``1 - (r / r_first)^2`` (a loaded breaker cools slower). It trips when
        ``h`` reaches 1, or at once when ``r`` reaches ``instant_ratio``.
        """
        cfg = self.config
        t0 = state.t_s
        t1 = t0 + dt_s
        delay = setpoints.actuation_delay_s
        if delay is None:
            delay = cfg.actuation_delay_s

        # 1. Limits: queue a changed request, land the ones whose delay has passed.
        pending = state.pending
        last_request = state.last_request_w
        req = setpoints.limit_request_w
        if req is not None and not np.array_equal(req, last_request):
            last_request = np.clip(
                np.asarray(req, dtype=np.float64), self.gpu_min_w, self.gpu_max_w
            )
            pending = (*pending, (t0, last_request))
        target = state.gpu_target_w
        limit = state.gpu_limit_w
        tau = cfg.response_tau_s
        due = t1 + 1e-9  # times are sums of steps: forgive their rounding
        if pending and pending[0][0] + delay <= due:
            while pending and pending[0][0] + delay <= due:
                landed_at = min(max(pending[0][0] + delay, t0), t1)
                new_target = pending[0][1]
                pending = pending[1:]
            # Settle toward the old target until the landing, then toward the new one.
            limit = _approach(limit, target, landed_at - t0, tau)
            target = new_target
            limit = _approach(limit, target, t1 - landed_at, tau)
        else:
            limit = _approach(limit, target, dt_s, tau)

        # 2. Darkness changes with lost sources (trips are handled at the end of the step).
        tripped = state.tripped
        dark_node, dark_gpu = state.dark_node, state.dark_gpu
        if setpoints.lost_sources != state.lost_sources:
            dark_node, dark_gpu = self._darkness(tripped, setpoints.lost_sources)
        any_dark = bool(dark_gpu.any()) or bool(dark_node.any())

        # 3. GPU power and the 1-s average.
        demand = np.asarray(setpoints.demand_w, dtype=np.float64)
        power = np.minimum(demand, limit)
        if any_dark:
            power = np.where(dark_gpu, 0.0, power)
        window, energy, window_s = state.window, state.window_energy_j, state.window_s
        if dt_s > 0:
            pdt = power * dt_s
            window = (*window, (dt_s, pdt))
            energy = energy + pdt
            window_s += dt_s
            while window_s - window[0][0] >= cfg.power_window_s - 1e-9:
                energy = energy - window[0][1]
                window_s -= window[0][0]
                window = window[1:]
            power_1s = energy / window_s
        else:
            power_1s = power if window_s <= 0 else state.gpu_power_1s_w

        # 4. Up the tree: servers, then each level's converters, deepest first.
        cs = np.concatenate(([0.0], np.cumsum(power)))
        baseline = self._server_baseline_w
        if any_dark:
            baseline = np.where(dark_node[self._server_idx], 0.0, baseline)
        extra = setpoints.extra_load_w
        if extra is None:
            out = np.zeros(self.n_nodes)
        else:
            out = np.where(dark_node, 0.0, extra) if any_dark else np.array(extra, dtype=float)
        extra_total = float(out.sum())
        out[self._server_idx] += cs[self._server_gpu_stop] - cs[self._server_gpu_start] + baseline
        inp = np.empty(self.n_nodes)
        for level in self._levels:
            o = out[level.idx]
            if level.whole is not None:  # one curve for the whole level: the usual case
                inv_rating, xp, fp = level.whole
                i = o / np.interp(o * inv_rating, xp, fp)
            else:
                i = o.copy()
                for pos, inv_rating, xp, fp in level.groups:
                    osub = o[pos]
                    i[pos] = osub / np.interp(osub * inv_rating, xp, fp)
            inp[level.idx] = i
            if level.parent[0] >= 0:
                out += np.bincount(level.parent, weights=i, minlength=self.n_nodes)

        # 5. Feed sources share their feed's input among the live ones.
        lost = setpoints.lost_sources
        if self.source_ids:
            src_power = inp[self._src_feed] * self._source_split(tripped, lost)
            elem_power = np.concatenate((inp, src_power))
        else:
            src_power = state.source_power_w
            elem_power = inp

        # 6. Breakers.
        heat = state.heat
        trips = state.trips
        if len(self._prot) and dt_s > 0:
            ratio = elem_power[self._prot] * self._prot_inv_rating
            over = ratio >= self._prot_first
            h = heat[self._prot]
            cool = np.exp(
                (-dt_s / cfg.cool_tau_s) * np.maximum(0.0, 1.0 - (ratio / self._prot_first) ** 2)
            )
            h_new = h * cool
            if over.any():
                fill = np.zeros(len(h))
                for k, members in enumerate(self._prot_groups):
                    sel = members[over[members]]
                    if len(sel):
                        fill[sel] = dt_s / self._tables[k].allowed_s(ratio[sel])
                h_new = np.where(over, h + fill, h_new)
            # A tripped breaker shows full until reclosed.
            h_new = np.where(tripped[self._prot], np.maximum(h, 1.0), h_new)
            heat = heat.copy()
            heat[self._prot] = h_new
            instant = ratio >= self._prot_instant
            new_trip = ((h_new >= 1.0) | instant) & ~tripped[self._prot]
            if new_trip.any():
                tripped = tripped.copy()
                events = []
                for j in np.flatnonzero(new_trip):
                    e = int(self._prot[j])
                    tripped[e] = True
                    heat[e] = max(heat[e], 1.0)
                    cause: Literal["overload", "instant"] = "instant" if instant[j] else "overload"
                    events.append(TripEvent(t1, self.element_ids[e], cause, float(ratio[j])))
                trips = (*trips, *events)
                dark_node, dark_gpu = self._darkness(tripped, lost)

        gpu_total = float(cs[-1])
        feed_total = float(inp[self.roots].sum())
        return PlantState(
            t_s=t1,
            gpu_demand_w=demand,
            gpu_power_w=power,
            gpu_power_1s_w=power_1s,
            gpu_limit_w=limit,
            gpu_target_w=target,
            last_request_w=last_request,
            pending=pending,
            window=window,
            window_energy_j=energy,
            window_s=window_s,
            node_power_w=inp,
            node_output_w=out,
            source_power_w=src_power,
            heat=heat,
            tripped=tripped,
            dark_node=dark_node,
            dark_gpu=dark_gpu,
            lost_sources=lost,
            trips=trips,
            feed_power_w=feed_total,
            gpu_total_w=gpu_total,
            baseline_total_w=float(baseline.sum()),
            losses_w=float((inp - out).sum()) + 0.0,
            extra_total_w=extra_total,
        )

    def _source_split(self, tripped: BoolArray, lost: frozenset[str]) -> FloatArray:
        """Share of its feed's input each source carries; cached until a source changes."""
        key = (tripped[self.n_nodes :].tobytes(), lost)
        if self._split_key != key:
            alive = ~tripped[self.n_nodes :] & np.array([s not in lost for s in self.source_ids])
            share = self._src_share * alive
            denom = np.bincount(self._src_feed, weights=share, minlength=self.n_nodes)
            denom_src = denom[self._src_feed]
            self._split = np.where(alive, share / np.where(denom_src > 0, denom_src, 1.0), 0.0)
            self._split_key = key
        return self._split

    def _darkness(self, tripped: BoolArray, lost: frozenset[str]) -> tuple[BoolArray, BoolArray]:
        """Nodes and GPUs without power: below a tripped node or a feed with no live source."""
        dark_node = np.zeros(self.n_nodes, dtype=bool)
        dark_gpu = np.zeros(self.n_gpus, dtype=bool)
        roots = [int(e) for e in np.flatnonzero(tripped[: self.n_nodes])]
        if self.source_ids:
            live = np.zeros(self.n_nodes, dtype=bool)
            for s, sid in enumerate(self.source_ids):
                if not tripped[self.n_nodes + s] and sid not in lost:
                    live[self._src_feed[s]] = True
            roots += [int(f) for f in set(self._src_feed.tolist()) if not live[f]]
        for r in roots:
            a, b = self._span[r]
            dark_node[a:b] = True
            g0, g1 = self._gpu_span[r]
            dark_gpu[g0:g1] = True
        return dark_node, dark_gpu

    def node_vector(self, by_node_w: Mapping[str, float]) -> FloatArray | None:
        """A per-node array (``node_ids`` order) from ``{node id: watts}``, as
        ``Setpoints.extra_load_w`` takes it; None when there is nothing in it."""
        if not by_node_w:
            return None
        vec = np.zeros(self.n_nodes)
        for nid, w in by_node_w.items():
            vec[self.node_index[nid]] = w
        return vec

    # -- readouts (slow path: dicts for frontends and reports) ---------------------------

    def power_w(self, state: PlantState, node_id: str) -> float:
        """Input power of a tree node, a feed source or (by GPU id) a GPU."""
        if node_id in self.node_index:
            return float(state.node_power_w[self.node_index[node_id]])
        if node_id in self.source_index:
            return float(state.source_power_w[self.source_index[node_id]])
        return float(state.gpu_power_w[self.tree.gpu_index[node_id]])

    def node_power(self, state: PlantState) -> dict[str, float]:
        """Input power of every node and feed source, by id."""
        out = dict(zip(self.node_ids, state.node_power_w.tolist(), strict=True))
        out.update(zip(self.source_ids, state.source_power_w.tolist(), strict=True))
        return out

    def heat_pct(self, state: PlantState) -> dict[str, float]:
        """Trip-integrator fill of every protected element, percent."""
        pct = state.heat[self._prot] * 100.0
        return dict(zip(self.protected_ids, pct.tolist(), strict=True))

    def tripped_ids(self, state: PlantState) -> frozenset[str]:
        return frozenset(self.element_ids[e] for e in np.flatnonzero(state.tripped))

    def dark_ids(self, state: PlantState) -> frozenset[str]:
        """Every tree node without power (tripped or below a trip or a dead feed)."""
        return frozenset(self.node_ids[i] for i in np.flatnonzero(state.dark_node))


def _approach(value: FloatArray, target: FloatArray, elapsed_s: float, tau_s: float) -> FloatArray:
    """First-order response of ``value`` toward ``target`` over ``elapsed_s``."""
    if elapsed_s <= 0:
        return value
    alpha = 1.0 - math.exp(-elapsed_s / tau_s) if tau_s > 0 else 1.0
    out: FloatArray = value + (target - value) * alpha
    return out
