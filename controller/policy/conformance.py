"""Does each GPU server obey the caps we leased it? (pure: no I/O, no clock)

A tenant with root on a node can raise its GPU limits by hand, or kill the agent with
its GPUs at their maximum. Leases then change nothing, and a policy that plans the node
at its caps leaves its rack over the envelope. This module says which nodes do not obey;
the daemon plans those at their maximum (``Snapshot.uncappable``), so the rack's budget
goes to the neighbours, and raises the alarm and the drain.

The rule, per GPU server with an agent:

- **Allowed**: what WE leased, never what the agent says is enforced (a rogue node's
  agent may say anything). Per GPU the highest lease sent within ``lag_s``, summed, plus
  the node's ``baseline_w``. A cap just lowered is not held against the node until it
  has had ``lag_s`` to land (lease, NVML set, the 1 s power average, the meter's poll),
  so normal lag cannot look like disobedience. A GPU never leased counts at its maximum.
- **Seen**, from each source there is, any one of which may convict:
  1. the node's own meter (a PDU outlet or server meter), fresh: it reads input power,
     so the allowance is raised by ``loss_fraction`` (PSU and conversion losses) and the
     reading lowered by ``meter_accuracy``;
  2. the agent's own report, fresh: GPU power plus baseline. A node that says it draws
     more than its caps convicts itself (the fake NVML's ``ignore_set_limit``);
  3. the nearest metered level above it (the rack's PDU) minus every other server under
     that level, only when this node is the ONE server there that nothing accounts for
     (its agent is silent, it has no meter) while every other has a fresh meter or report.
     The others are counted at the most they may be drawing (reading plus accuracy and
     losses), the level's reading at the least, so an honest neighbour never convicts
     this node. A live agent that under-reports is not named this way: the rack's excess
     cannot be pinned on one of several live nodes (the policy counts it as unexplained,
     uncappable load, so the rack stays inside anyway).
- **Over**: seen above allowed by more than ``slack_w`` plus ``report_fraction`` of it.
- **Back from silence**: an agent that was silent and reports again (a broker outage, a
  restart) sat at its own failsafe cap, which we do not know; it gets ``lag_s`` for our
  lease to land (``quiet``: the daemon names such nodes), during which it is not judged.
  Quiet is not conforming: its timers hold, so restarting the agent does not clear a
  flag nor reset a case being built.
- **Hysteresis**: a node is flagged once some source has said over on every cycle for
  ``raise_s`` on end, and cleared once it has conformed (a source spoke, none said over)
  for ``clear_s`` on end. Cycles with no source leave both timers as they are: silence is
  never taken as conforming.

While a node is flagged the daemon keeps leasing it the caps it was flagged against
(``probe_w``), so that conforming again means obeying them, not obeying the maximum the
policy now plans it at.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree

from .index import tree_index
from .types import FloatArray
from .window import WindowMax

LAG_BUCKETS = 4


@dataclass(frozen=True)
class ConformanceLimits:
    """Tolerances and timers (seconds, watts, fractions of the figure they scale)."""

    # lease -> agent -> NVML set -> its 1 s power average -> the meter's next poll
    lag_s: float = 4.0
    raise_s: float = 2.0  # "a few cycles": one odd sample is not a case
    clear_s: float = 30.0  # a tenant toggling the limit must not flap the alarm and caps
    slack_w: float = 50.0  # baseline_w is an estimate (fans ramp with inlet temperature)
    report_fraction: float = 0.05  # NVML holds the average to the limit, not every sample
    meter_accuracy: float = 0.02  # PDU outlet and rack meters: class 1-2
    loss_fraction: float = 0.10  # a meter reads input power; server PSUs are >= 90 % efficient


@dataclass(frozen=True)
class Evidence:
    """One node's verdict this cycle, with the figures that made it (audit, alarm)."""

    node_id: str
    allowed_w: float
    seen_w: float  # the highest figure any source gave (NaN: none spoke)
    source: str  # "node meter", "agent report", "<level> meter minus the other servers"
    over: bool


@dataclass(frozen=True, eq=False)
class ConformanceState:
    """What the judge carries between cycles; start with :meth:`empty`."""

    leased: WindowMax
    over_since_s: Mapping[str, float] = field(default_factory=dict)
    ok_since_s: Mapping[str, float] = field(default_factory=dict)
    flagged: frozenset[str] = frozenset()
    probe_w: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    evidence: Mapping[str, Evidence] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_gpus: int, limits: ConformanceLimits) -> ConformanceState:
        # One bucket more than the lag: the window then holds a lease at least lag_s.
        bucket_s = limits.lag_s / LAG_BUCKETS
        return cls(leased=WindowMax.empty(n_gpus, limits.lag_s + bucket_s, LAG_BUCKETS + 1))


@dataclass(frozen=True)
class Verdict:
    """This cycle's outcome: who is flagged, who just became so or stopped being so."""

    flagged: frozenset[str]
    raised: tuple[str, ...]
    cleared: tuple[str, ...]
    evidence: Mapping[str, Evidence]


def judge(
    tree: PowerTree,
    now_s: float,
    state: ConformanceState,
    *,
    leased_w: FloatArray | None,
    gpu_power_w: FloatArray,
    node_power_w: Mapping[str, float | None],
    limits: ConformanceLimits,
    quiet: frozenset[str] = frozenset(),
) -> tuple[Verdict, ConformanceState]:
    """One cycle: fold in the leases last sent (``leased_w``, per GPU, NaN unknown), judge
    every GPU server with an agent, update the hysteresis.

    ``gpu_power_w`` is what the agents reported (NaN where an agent is silent or a GPU
    unreadable); ``node_power_w`` the fresh meter readings as the snapshot has them;
    ``quiet`` the servers not judged this cycle (module docstring).
    """
    table = _servers(tree)
    max_w = tree_index(tree).gpu_max_w
    leased = state.leased
    if leased_w is not None:
        leased = leased.push(now_s, np.where(np.isfinite(leased_w), leased_w, max_w))
    per_gpu = leased.maximum()
    per_gpu = np.where(np.isfinite(per_gpu), per_gpu, max_w)

    servers = table.ids
    lease_cs = np.concatenate(([0.0], np.cumsum(per_gpu)))
    finite = np.isfinite(gpu_power_w)
    power_cs = np.concatenate(([0.0], np.cumsum(np.where(finite, gpu_power_w, 0.0))))
    bad_cs = np.concatenate(([0], np.cumsum(~finite)))
    first, stop = table.first, table.stop
    allowed_v = lease_cs[stop] - lease_cs[first] + table.base_w
    reported_v = power_cs[stop] - power_cs[first] + table.base_w
    whole = (bad_cs[stop] - bad_cs[first] == 0) & (stop > first)
    allowed = dict(zip(servers, allowed_v.tolist(), strict=True))
    reported = {
        n: v for n, v, ok in zip(servers, reported_v.tolist(), whole.tolist(), strict=True) if ok
    }
    metered: dict[str, float] = {}
    for nid in servers:
        value = node_power_w.get(nid)
        if value is not None and math.isfinite(value):
            metered[nid] = float(value)

    evidence: dict[str, Evidence] = {}
    for nid in servers:
        evidence[nid] = _evidence(tree, nid, allowed, reported, metered, node_power_w, limits)

    over_since = dict(state.over_since_s)
    ok_since = dict(state.ok_since_s)
    flagged = set(state.flagged)
    probe = dict(state.probe_w)
    raised: list[str] = []
    cleared: list[str] = []
    for nid, ev in evidence.items():
        if math.isnan(ev.seen_w) or nid in quiet:
            continue  # nobody spoke (or may not yet): neither over nor conforming
        if ev.over:
            over_since.setdefault(nid, now_s)
            ok_since.pop(nid, None)
            if nid not in flagged and now_s - over_since[nid] >= limits.raise_s:
                flagged.add(nid)
                lo, hi = tree.gpu_range(nid)
                probe[nid] = tuple(float(v) for v in per_gpu[lo:hi])
                raised.append(nid)
        else:
            ok_since.setdefault(nid, now_s)
            over_since.pop(nid, None)
            if nid in flagged and now_s - ok_since[nid] >= limits.clear_s:
                flagged.discard(nid)
                probe.pop(nid, None)
                cleared.append(nid)
    for nid in list(flagged):
        if nid not in evidence:  # gone from the config
            flagged.discard(nid)
            probe.pop(nid, None)
            cleared.append(nid)
    new_state = ConformanceState(
        leased=leased,
        over_since_s=MappingProxyType(over_since),
        ok_since_s=MappingProxyType(ok_since),
        flagged=frozenset(flagged),
        probe_w=MappingProxyType(probe),
        evidence=MappingProxyType(evidence),
    )
    verdict = Verdict(
        frozenset(flagged), tuple(sorted(raised)), tuple(sorted(cleared)), new_state.evidence
    )
    return verdict, new_state


@dataclass(frozen=True, eq=False)
class _Servers:
    """GPU servers with an agent, in tree order, and their GPU ranges and baselines."""

    ids: tuple[str, ...]
    first: npt.NDArray[np.intp]
    stop: npt.NDArray[np.intp]
    base_w: FloatArray


_CACHE: weakref.WeakKeyDictionary[PowerTree, _Servers] = weakref.WeakKeyDictionary()


def _servers(tree: PowerTree) -> _Servers:
    """Built once per tree (cached while it lives, like the policy's tree index)."""
    table = _CACHE.get(tree)
    if table is None:
        ids = tuple(n for n in tree.of_kind("node") if tree.node(n).agent is not None)
        ranges = [tree.gpu_range(n) for n in ids]
        table = _Servers(
            ids,
            np.array([r[0] for r in ranges], dtype=np.intp),
            np.array([r[1] for r in ranges], dtype=np.intp),
            np.array([tree.node(n).baseline_w for n in ids], dtype=np.float64),
        )
        _CACHE[tree] = table
    return table


def _evidence(
    tree: PowerTree,
    nid: str,
    allowed: Mapping[str, float],
    reported: Mapping[str, float],
    metered: Mapping[str, float],
    node_power_w: Mapping[str, float | None],
    limits: ConformanceLimits,
) -> Evidence:
    """The strongest case against one node from the sources there are (module docstring)."""
    allow = allowed[nid]
    threshold = allow + limits.slack_w + limits.report_fraction * allow
    meter_threshold = allow * (1.0 + limits.loss_fraction) + limits.slack_w
    cases: list[tuple[bool, float, str]] = []
    if nid in metered:
        low = metered[nid] * (1.0 - limits.meter_accuracy)
        cases.append((low > meter_threshold, metered[nid], "node meter"))
    if nid in reported:
        cases.append((reported[nid] > threshold, reported[nid], "agent report"))
    if not cases:
        residual = _residual(tree, nid, reported, metered, node_power_w, limits)
        if residual is not None:
            level, low = residual
            cases.append(
                (low > meter_threshold, low, f"{level} meter minus the other servers under it")
            )
    if not cases:
        return Evidence(nid, allow, math.nan, "", False)
    convicting = [c for c in cases if c[0]]
    over, seen, source = max(convicting or cases, key=lambda c: c[1])
    return Evidence(nid, allow, seen, source, over)


def _residual(
    tree: PowerTree,
    nid: str,
    reported: Mapping[str, float],
    metered: Mapping[str, float],
    node_power_w: Mapping[str, float | None],
    limits: ConformanceLimits,
) -> tuple[str, float] | None:
    """(level, the least this node can be drawing) from the nearest metered level above,
    or None when that level is silent or another server under it is unaccounted for."""
    for level in tree.ancestors(nid):
        if level not in node_power_w:
            continue
        value = node_power_w[level]
        if value is None or not math.isfinite(value):
            return None
        others = 0.0
        for other in tree.subtree(level):
            node = tree.node(other)
            if node.kind != "node" or other == nid:
                continue
            if other in metered:
                figure = metered[other] * (1.0 + limits.meter_accuracy)
            elif other in reported:
                figure = reported[other] * (1.0 + limits.loss_fraction) + limits.slack_w
            else:
                return None  # two unknowns: the excess cannot be pinned on this node
            others += figure
        return level, value * (1.0 - limits.meter_accuracy) - others
    return None
