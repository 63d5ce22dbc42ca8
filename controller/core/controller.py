"""The controller: readings in, one policy decision per cycle, caps out as leases.

:class:`Controller` holds the live state and runs one cycle at a time; it is also the
:class:`~controller.core.view.ControllerView` the HTTP API reads. Each cycle returns a
frozen :class:`~controller.core.result.CycleResult`; ``controller/service.py`` hands it to
every integration (controller/core/integration.py). The cycle itself never awaits the
network: integrations take what it hands them into bounded queues, so a dead broker or
TSDB never delays a cap.

Safety rules that live here rather than in the policy:
- ``advisory`` mode computes, audits and publishes what it would do, and leases every GPU
  its NVML default limit, so agents stay out of failsafe and nothing is constrained.
- A GPU whose agent is silent counts at its maximum (the store turns it NaN).
- A feed source whose meter is silent or reads nearly nothing while the feed carries
  load counts as lost: the feed's envelope shrinks to what the other side can carry.
- A GPU server that draws more than we leased it (policy/conformance.py) is planned at
  its maximum from then on, alarmed, and drained through the scheduler; it keeps being
  leased the caps it ignored, so that obeying them again clears it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

from controller.agentlink.lease import Lease, LeaseSequence, Telemetry
from controller.agentlink.transport import ControllerLink
from controller.core.alarms import (
    Alarm,
    agent_alarms,
    device_alarms,
    node_alarms,
    out_of_band_text,
    uncappable_alarms,
)
from controller.core.audit import AuditLog
from controller.core.cycle import CycleStats
from controller.core.cycle_points import CyclePoints, counter_values
from controller.core.metrics import Metrics
from controller.core.overrides import EnvelopeOverrides, ModeHold
from controller.core.phases import PhaseRunner
from controller.core.points import Point
from controller.core.readings import ReadingsStore
from controller.core.reservations import ReservationStore
from controller.core.result import CycleResult, Drain
from controller.core.setpoints import ModeSwitch
from controller.core.view import CapRow, Health, NodeLive, NodeTelemetry
from controller.model.config import Site
from controller.model.topology import PowerTree
from controller.policy import Action, Job, PolicyState, SetCap, Snapshot, get_policy
from controller.policy.conformance import ConformanceLimits, ConformanceState, Evidence, judge
from drivers.base import DeviceStats
from drivers.reading import Quality, Reading

log = logging.getLogger(__name__)

Mode = Literal["enforce", "advisory"]
SOURCE_LOST_FRACTION = 0.02  # a source reading under 2 % of its envelope while the feed is loaded


@dataclass(frozen=True)
class AgentInfo:
    """A node agent as the site config knows it: which server, which GPU index range."""

    agent_id: str
    node_id: str
    first: int
    stop: int
    stale_s: float


@dataclass(frozen=True)
class _Outputs:
    """What the publish phase built, for the CycleResult (empty when it did not run)."""

    alarms: tuple[Alarm, ...] = ()
    raised: tuple[Alarm, ...] = ()
    cleared: tuple[str, ...] = ()
    telemetry: tuple[NodeTelemetry, ...] = ()
    points: tuple[Point, ...] = ()


@dataclass
class _CapSince:
    limit_w: float
    since_s: float
    reason: str
    node_id: str
    job_id: str | None
    gpus: tuple[int, ...] = field(default_factory=tuple)


def _names(ids: Sequence[str], shown: int = 5) -> str:
    """The first few ids and how many more: a hall loses agents by the hundred."""
    head = ", ".join(ids[:shown])
    return head if len(ids) <= shown else f"{head} (+{len(ids) - shown} more)"


def default_controller_id(site: Site) -> str:
    """``rackpower-<site>``: what agents are configured to obey unless told otherwise."""
    return f"rackpower-{site.name}"


def agents_of(tree: PowerTree) -> dict[str, AgentInfo]:
    """Agents by id from the GPU servers' ``agent`` references."""
    stale = {d.id: d.effective_stale_s for d in tree.site.devices}
    out: dict[str, AgentInfo] = {}
    for nid in tree.of_kind("node"):
        node = tree.node(nid)
        if node.agent is None:
            continue
        first, stop = tree.gpu_range(nid)
        out[node.agent] = AgentInfo(node.agent, nid, first, stop, stale.get(node.agent, 3.0))
    return out


class Controller:
    """Live state of one site's controller and its control cycle (see module docstring)."""

    def __init__(
        self,
        site: Site,
        *,
        mode: Mode = "enforce",
        link: ControllerLink | None = None,
        controller_id: str | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
        reservations: ReservationStore | None = None,
        jobs: Callable[[], Sequence[Job]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        points: bool = True,
    ) -> None:
        self.mode: Mode = mode
        self.mode_hold: ModeHold | None = None  # a BMS advisory window, with its expiry
        self.link = link
        # Agents obey one configured controller id, so the default must be stable (not the
        # host's name: a standby on another host is the same controller) and a valid lease
        # id (letters, digits, ``_ . : -``).
        self.controller_id = controller_id or default_controller_id(site)
        self.audit = audit if audit is not None else AuditLog()
        self.metrics = metrics if metrics is not None else Metrics(site.name)
        self.reservations = reservations if reservations is not None else ReservationStore()
        self.jobs_provider = jobs
        self.clock = clock
        self.wall_clock = wall_clock
        self.cycle_stats = CycleStats()
        self.lease_seq = LeaseSequence()
        self.started_at_s = wall_clock()
        self.stopping = False
        self._first_cycle_s: float | None = None  # monotonic; the start-up grace counts from it
        # Inputs from outside the core, read by the cycle (set by the service); the
        # cycle's outputs leave only in the CycleResult that run_cycle returns.
        self.device_health: Callable[[], Mapping[str, tuple[bool, str | None]]] | None = None
        self.device_stats: Callable[[], Mapping[str, DeviceStats]] | None = None  # for the TSDB
        # More alarms in force from integrations (e.g. an unreachable scheduler).
        self.alarm_sources: list[Callable[[float], list[Alarm]]] = []
        # A scheduler is configured that can drain a node which ignores its caps.
        self.can_drain = False
        self._notices: list[Alarm] = []  # one-off alarms for the next result (notify)
        # TSDB points cost a fifth of a large site's cycle: built only if something
        # writes them (the service: only with a TSDB configured).
        self.build_points = points
        self.phases = PhaseRunner(self.metrics)
        self._install(site)

    # -- configuration ---------------------------------------------------------------

    def _install(self, site: Site) -> None:
        self.site = site
        self._tree = PowerTree(site)
        # Per-GPU constants as vectors once per config, not rebuilt every cycle.
        self._gpu_max_w = np.array([g.max_w for g in self._tree.gpus])
        self._gpu_default_w = np.array([g.default_w for g in self._tree.gpus])
        old = getattr(self, "store", None)
        self.store = ReadingsStore(self._tree)
        if old is not None:  # keep what the meters said; GPU arrays restart (indices move)
            self.store.put_many(old._latest.values())
        self.policy = get_policy(site.policy.name)
        self.policy_state: PolicyState | None = None
        old_agents: dict[str, AgentInfo] = getattr(self, "agents", {})
        old_seen: dict[str, float] = getattr(self, "_agent_seen_s", {})
        old_failsafe: dict[str, str] = getattr(self, "_agent_failsafe", {})
        self.agents = agents_of(self._tree)
        self._agent_of_node = {a.node_id: a for a in self.agents.values()}
        self._agent_seen_s: dict[str, float] = {}
        self._agent_failsafe: dict[str, str] = {}
        if old is not None:
            # An agent still on the same server with as many GPUs keeps its last report
            # (moved to its new indices): a reload must not make every GPU count at its
            # maximum until the next report, nor every agent look lost.
            for aid, info in self.agents.items():
                was = old_agents.get(aid)
                if was is None or aid not in old_seen or was.node_id != info.node_id:
                    continue
                if was.stop - was.first != info.stop - info.first:
                    continue
                src, dst = slice(was.first, was.stop), slice(info.first, info.stop)
                self.store.gpu_power_w[dst] = old.gpu_power_w[src]
                self.store.gpu_limit_w[dst] = old.gpu_limit_w[src]
                self.store.gpu_ts_s[dst] = old.gpu_ts_s[src]
                self._agent_seen_s[aid] = old_seen[aid]
                if aid in old_failsafe:
                    self._agent_failsafe[aid] = old_failsafe[aid]
        if not hasattr(self, "overrides"):
            self.overrides = EnvelopeOverrides(self._tree)
        else:
            self.overrides.replace_tree(self._tree)
        self._live: dict[str, NodeLive] = {}
        self._caps: dict[str, _CapSince] = {}
        # Alarms in force stay known across a reload, so the next cycle clears those that no
        # longer hold (on the BMS they are retained until cleared).
        self._alarms: dict[str, Alarm] = getattr(self, "_alarms", {})
        self._last_cycle_wall_s: float | None = None
        self._failed_phases: tuple[str, ...] = ()  # of the last cycle, for health
        self._gpu_stale_s = max((a.stale_s for a in self.agents.values()), default=3.0)
        # Until every meter and agent has had its stale limit to report, silence is not yet
        # a fault: no alarm is raised for it (caps still treat it as worst case).
        self._startup_grace_s = max((d.effective_stale_s for d in site.devices), default=0.0)
        # TSDB points and their counters (violations since start) survive a reload.
        self._points: CyclePoints = getattr(self, "_points", None) or CyclePoints()
        # Conformance: a lowered cap gets a few cycles and the slowest meter's stale limit
        # to land before it is held against a node (GPU indices may move: start afresh).
        cycle_s = site.policy.cycle_s
        self._conformance_limits = ConformanceLimits(
            lag_s=max(4.0, 4 * cycle_s, self._startup_grace_s),
            raise_s=max(2.0, 4 * cycle_s),
            clear_s=max(30.0, 20 * cycle_s),
        )
        was = getattr(self, "_conformance", None)
        self._conformance = ConformanceState.empty(len(self._tree.gpus), self._conformance_limits)
        if was is not None and was.flagged:
            self._conformance = self._carry_flags(was)
        self._leased_w: np.ndarray | None = None  # the leases sent last cycle
        self._silent_nodes: set[str] = set()  # servers whose agent was lost last cycle
        self._back_until_s: dict[str, float] = {}  # agent back: not judged until then

    def reload(self, site: Site) -> None:
        """Replace the running config by one already validated (SIGHUP)."""
        self.audit.record(
            "config_reload",
            f"configuration reloaded from {site.source}",
            now_s=self.wall_clock(),
        )
        self._install(site)

    # -- ControllerView ----------------------------------------------------------------

    @property
    def tree(self) -> PowerTree:
        return self._tree

    def health(self) -> Health:
        """``ok`` only while the loop keeps time and every meter and agent reports.

        ``degraded`` (the API still answers 200, the body says why) when the cycle is
        late, a device is stale, an agent is lost (its GPUs count at their maximum) or
        an agent runs on its failsafe cap (our leases do not reach it): each is a reason
        naming what. Within the start-up grace, before every device and agent had the
        time to report once, it is ``starting`` instead.
        """
        devices = self.device_health() if self.device_health else {}
        stale_devices = sorted(d for d, (is_stale, _) in devices.items() if is_stale)
        now = self.clock()
        lost = sorted(self.lost_agents(now))
        failsafe = sorted(a for a in self._agent_failsafe if a not in lost)
        late = (
            self._last_cycle_wall_s is None
            or self.wall_clock() - self._last_cycle_wall_s > 5 * self.site.policy.cycle_s
        )
        reasons: list[str] = []
        if late and self._last_cycle_wall_s is not None:
            reasons.append("control cycle is late")
        if self._failed_phases:
            # A failed read or decide sends no lease: the agents run out to failsafe.
            reasons.append(f"last cycle's {', '.join(self._failed_phases)} phase failed")
        if lost:
            reasons.append(f"{len(lost)} of {len(self.agents)} agents lost: {_names(lost)}")
        if failsafe:
            reasons.append(f"{len(failsafe)} agents on their failsafe cap: {_names(failsafe)}")
        if stale_devices:
            reasons.append(
                f"{len(stale_devices)} of {len(devices)} devices stale: {_names(stale_devices)}"
            )
        settling = (
            self._first_cycle_s is not None
            and now - self._first_cycle_s < self._startup_grace_s
            and (bool(stale_devices) or len(self._agent_seen_s) < len(self.agents))
        )
        status: Literal["starting", "ok", "degraded", "stopping"]
        if self.stopping:
            status = "stopping"
        elif self._last_cycle_wall_s is None or (settling and not late):
            status = "starting"
        elif reasons:
            status = "degraded"
        else:
            status = "ok"
        return Health(
            status=status,
            mode=self.mode,
            started_at_s=self.started_at_s,
            last_cycle_at_s=self._last_cycle_wall_s,
            cycle_s=self.site.policy.cycle_s,
            cycles=self.cycle_stats.cycles,
            overruns=self.cycle_stats.overruns,
            devices_total=len(devices),
            devices_stale=len(stale_devices),
            agents_total=len(self.agents),
            agents_lost=len(lost),
            agents_failsafe=len(failsafe),
            reasons=tuple(reasons),
            message="; ".join(reasons),
        )

    def nodes(self) -> Mapping[str, NodeLive]:
        return self._live

    def caps(self) -> Sequence[CapRow]:
        lease_s = self.site.policy.lease_s
        rows = []
        for cap in self._caps.values():
            servers = tuple(sorted({self._tree.gpus[g].node for g in cap.gpus}))
            rows.append(
                CapRow(
                    job_id=cap.job_id,
                    node_id=cap.node_id,
                    servers=servers,
                    gpu_count=len(cap.gpus),
                    limit_w=cap.limit_w,
                    reason=cap.reason,
                    since_s=cap.since_s,
                    lease_expires_s=(self._last_cycle_wall_s or cap.since_s) + lease_s,
                )
            )
        return rows

    # -- inputs --------------------------------------------------------------------------

    def accept_readings(self, readings: Sequence[Reading]) -> None:
        """The drivers' sink."""
        self.store.put_many(readings)

    def accept_telemetry(self, t: Telemetry, received_s: float | None = None) -> None:
        """An agent's report; staleness is judged by arrival time, not the agent's clock."""
        info = self.agents.get(t.agent_id)
        if info is None or info.node_id != t.node_id:
            log.warning("telemetry from unknown agent %s (node %s) ignored", t.agent_id, t.node_id)
            return
        now = self.clock() if received_s is None else received_s
        n = info.stop - info.first
        if t.gpu_count != n:
            log.warning("agent %s reports %d GPUs, config says %d", t.agent_id, t.gpu_count, n)
            return
        good = [q is Quality.GOOD for q in t.q]
        power = np.array(
            [
                p if (p is not None and ok) else math.nan
                for p, ok in zip(t.power_w, good, strict=True)
            ]
        )
        limit = np.array([v if v is not None else math.nan for v in t.limit_w])
        self.store.put_gpus(np.arange(info.first, info.stop), power, limit, now)
        self._agent_seen_s[t.agent_id] = now
        if t.failsafe:
            self._agent_failsafe[t.agent_id] = t.failsafe_reason or "lease expired"
        else:
            self._agent_failsafe.pop(t.agent_id, None)

    def lost_sources(self, node_power: Mapping[str, float | None], now_s: float) -> frozenset[str]:
        """Feed sources that are gone, or that we cannot see: worst case, they are gone."""
        lost: set[str] = set()
        for nid in self._tree.of_kind("feed"):
            node = self._tree.node(nid)
            for src in node.sources:
                if not src.meters:
                    continue
                total = 0.0
                for m in src.meters:
                    v = self.store.value(m.device, m.point, now_s)
                    if v is None:
                        total = math.nan
                        break
                    total += v
                feed_w = node_power.get(nid)
                loaded = feed_w is not None and feed_w > 0.1 * node.envelope_w
                if math.isnan(total) or (loaded and total < SOURCE_LOST_FRACTION * src.envelope_w):
                    lost.add(src.id)
        return frozenset(lost)

    # -- the cycle ------------------------------------------------------------------------

    def snapshot(self, now_s: float) -> Snapshot:
        wall = self.wall_clock()
        node_power = self.store.metered_power_w(now_s)
        gpu_power, gpu_limit = self._gpu_view(now_s)
        jobs = tuple(self.jobs_provider()) if self.jobs_provider else ()
        return Snapshot.build(
            self._tree,
            now_s,
            gpu_power_w=gpu_power,
            gpu_limit_w=gpu_limit,
            node_power_w=node_power,
            jobs=jobs,
            reservations_w=self.reservations.own_w(wall),  # the policy sums up the tree itself
            envelope_override_w=self.overrides.active(wall),
            lost_sources=self.lost_sources(node_power, now_s),
        )

    def _gpu_view(self, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        power = np.full(len(self._tree.gpus), math.nan)
        limit = np.full(len(self._tree.gpus), math.nan)
        for info in self.agents.values():
            seen = self._agent_seen_s.get(info.agent_id)
            if seen is None or now_s - seen > info.stale_s:
                continue
            sl = slice(info.first, info.stop)
            power[sl] = self.store.gpu_power_w[sl]
            limit[sl] = self.store.gpu_limit_w[sl]
        return power, limit

    def lost_agents(self, now_s: float) -> list[str]:
        return [
            a.agent_id
            for a in self.agents.values()
            if (seen := self._agent_seen_s.get(a.agent_id)) is None or now_s - seen > a.stale_s
        ]

    def apply_mode_command(self, cmd: ModeSwitch) -> None:
        """A checked BMS mode command (its expiry already absolute, bounded by the config).

        ``advisory`` holds until its expiry, then the mode from before comes back (see
        :meth:`_expire_mode_hold`); ``enforce`` ends any hold at once.
        """
        wall = self.wall_clock()
        if cmd.mode == "enforce":
            self.mode_hold = None
            self.mode = "enforce"
            return
        revert_to: Mode = self.mode_hold.revert_to if self.mode_hold is not None else self.mode
        self.mode_hold = ModeHold(
            "advisory", cmd.expires_at_s(wall), cmd.command_id, revert_to, wall
        )
        self.mode = "advisory"

    def _expire_mode_hold(self, wall_s: float) -> None:
        hold = self.mode_hold
        if hold is None or not hold.expired(wall_s):
            return
        self.mode_hold = None
        self.mode = hold.revert_to
        self.audit.record(
            "mode_expired",
            f"BMS {hold.mode} mode from command {hold.command_id} lapsed at its expiry; "
            f"back to {hold.revert_to}",
            now_s=wall_s,
            details={"command_id": hold.command_id, "until_s": hold.until_s},
        )

    def run_cycle(self, now_s: float) -> CycleResult:
        """One control cycle, in named phases: read -> decide -> act -> lease -> publish.

        Each phase is timed and isolated (controller/core/phases.py): a failure is counted,
        logged and the cycle goes on where that is safe. A failed ``read`` or ``decide``
        leaves no new targets, so no lease is sent: the agents keep the lease they hold
        (``lease_s`` covers a few missed cycles) and fall into their failsafe cap if the
        failures go on; never a lease computed from garbage. A failed ``act`` (the audit,
        a metric) never stops the leases. The outputs are returned as one frozen
        :class:`CycleResult` for the integrations, after the leases are sent.
        """
        wall = self.wall_clock()
        ph = self.phases
        ph.start_cycle()
        drains: list[Drain] = []
        snap: Snapshot | None = None
        actions: tuple[Action, ...] = ()
        decided = False
        with ph.run("read"):
            self._expire_mode_hold(wall)
            snap = self._check_conformance(self.snapshot(now_s), now_s, wall, drains)
        if snap is not None:
            with ph.run("decide"):
                acts, self.policy_state = self.policy(snap, self._tree, self.policy_state)
                actions = tuple(acts)
                decided = True
        advisory = self.mode == "advisory"
        with ph.run("act"):
            status = self.policy_state.nodes.as_dict() if actions and self.policy_state else {}
            for action in actions:
                with ph.run("act", "action"):  # one action failing to audit skips no other
                    self._act(action, snap, status, wall, advisory=advisory)
        leased = False
        with ph.run("lease"):
            if decided:
                assert self.policy_state is not None
                self._leased_w = (
                    self._gpu_default_w
                    if advisory
                    else self._probe_leases(self.policy_state.target_w)
                )
                leased = self._send_leases(self._leased_w)
        self._last_cycle_wall_s = wall
        self._failed_phases = tuple(dict.fromkeys(ph.failed))
        out = _Outputs()
        if decided and snap is not None:
            with ph.run("publish"):
                out = self._publish(snap, now_s, wall)
        return CycleResult(
            now_s=now_s,
            wall_s=wall,
            mode=self.mode,
            snapshot=snap,
            actions=actions if decided else (),
            drains=tuple(drains),
            leased=leased,
            nodes=MappingProxyType(dict(self._live)),
            alarms=out.alarms,
            raised=out.raised,
            notices=tuple(self._take_notices()),
            cleared=out.cleared,
            telemetry=out.telemetry,
            points=out.points,
            failed_phases=tuple(ph.failed),
        )

    def _act(
        self,
        action: Action,
        snap: Snapshot | None,
        status: Mapping[str, Mapping[str, float | str]],
        wall: float,
        *,
        advisory: bool,
    ) -> None:
        """Audit and count one action, and note a cap in force (for /v1/caps)."""
        assert snap is not None
        node = action.node_id
        readings: dict[str, float | None] = {}
        if node in status:
            readings = {
                "measured_w": snap.node_power_w.get(node),
                "load_w": float(status[node]["load_w"]),
                "envelope_w": float(status[node]["envelope_w"]),
                "margin_w": float(status[node]["margin_w"]),
            }
        event = self.audit.record_action(
            action, self._tree, now_s=wall, readings=readings, advisory=advisory
        )
        self.metrics.count_action(event.kind)
        if isinstance(action, SetCap):
            self._note_cap(action, wall)

    def notify(self, alarm: Alarm) -> None:
        """A one-off alarm from an integration (an escalation's outcome): it goes out with
        the next cycle's result (``raised``), not into the alarms in force."""
        self._notices.append(alarm)

    def _take_notices(self) -> list[Alarm]:
        taken, self._notices = self._notices, []
        return taken

    # -- nodes that ignore their caps (policy/conformance.py) --------------------------------

    def _check_conformance(
        self, snap: Snapshot, now_s: float, wall: float, drains: list[Drain]
    ) -> Snapshot:
        """Judge every GPU server against what we leased it; the snapshot names those that
        do not obey (``uncappable``), and each newly flagged one is audited and drained."""
        silent = {self.agents[a].node_id for a in self.lost_agents(now_s)}
        for nid in self._silent_nodes - silent:  # back: it sat at its own failsafe cap
            self._back_until_s[nid] = now_s + self._conformance_limits.lag_s
        self._silent_nodes = silent
        self._back_until_s = {n: t for n, t in self._back_until_s.items() if t > now_s}
        verdict, self._conformance = judge(
            self._tree,
            now_s,
            self._conformance,
            leased_w=self._leased_w,
            gpu_power_w=snap.gpu_power_w,
            node_power_w=snap.node_power_w,
            limits=self._conformance_limits,
            quiet=frozenset(self._back_until_s),
        )
        self._leased_w = None  # folded in
        for nid in verdict.raised:
            self._act_on_uncappable(nid, verdict.evidence[nid], wall, drains)
        for nid in verdict.cleared:
            log.warning("%s obeys its caps again: planned at its caps from now on", nid)
            self.audit.record(
                "node_conforms",
                f"{nid} has kept to its leased caps for"
                f" {self._conformance_limits.clear_s:.0f} s: planned at its caps again"
                " (a drain stays until an operator resumes the node)",
                now_s=wall,
                node=nid,
            )
        if not verdict.flagged:
            return snap
        return dataclasses.replace(snap, uncappable=verdict.flagged)

    def _act_on_uncappable(self, nid: str, ev: Evidence, wall: float, drains: list[Drain]) -> None:
        reason = (
            f"{nid}: {ev.source} reads {ev.seen_w:.0f} W, its leased caps and baseline allow"
            f" {ev.allowed_w:.0f} W: counted at its maximum, its rack neighbours capped instead"
        )
        if self.mode != "enforce":
            done = "advisory: not drained"
        elif not self.can_drain:
            done = "no scheduler configured: cannot drain it"
        else:
            drains.append(Drain(nid, reason))  # the scheduler integration carries it out
            done = "drain requested through the scheduler"
        text = f"{reason}; {done}; {out_of_band_text(nid)}"
        log.error("node ignores its caps: %s", text)
        self.audit.record(
            "node_uncappable",
            text,
            now_s=wall,
            node=nid,
            details={"seen_w": round(ev.seen_w, 1), "allowed_w": round(ev.allowed_w, 1)},
            advisory=self.mode != "enforce",
        )

    def _carry_flags(self, was: ConformanceState) -> ConformanceState:
        """A reload keeps the servers flagged that are still there with as many GPUs (the
        alarm must not clear and the drain be asked again just because of a SIGHUP)."""
        keep = {
            nid: caps
            for nid, caps in was.probe_w.items()
            if nid in self._tree
            and self._tree.node(nid).kind == "node"
            and len(caps) == self._tree.node(nid).gpus
        }
        return dataclasses.replace(
            self._conformance,
            flagged=frozenset(keep),
            probe_w=keep,
            evidence={n: e for n, e in was.evidence.items() if n in keep},
            ok_since_s={n: t for n, t in was.ok_since_s.items() if n in keep},
        )

    def _probe_leases(self, target_w: np.ndarray) -> np.ndarray:
        """The policy plans a flagged node at its maximum; it is still leased the caps it
        was flagged against, so that obeying them is what clears it."""
        probes = self._conformance.probe_w
        if not probes:
            return target_w
        out = np.array(target_w, dtype=np.float64)
        for nid, caps in probes.items():
            first, stop = self._tree.gpu_range(nid)
            if stop - first == len(caps):
                out[first:stop] = caps
        return out

    def _uncappable_alarms(self, now_s: float) -> list[Alarm]:
        return uncappable_alarms(self._conformance.flagged, self._conformance.evidence, now_s)

    def _note_cap(self, action: SetCap, wall: float) -> None:
        """Track caps in force (for /v1/caps): a new cap replaces any it overlaps."""
        gpus = set(action.gpus)
        self._caps = {k: v for k, v in self._caps.items() if not gpus & set(v.gpus)}
        if all(action.limit_w >= self._tree.gpus[g].max_w for g in action.gpus):
            return  # released
        key = action.job_id or f"server:{self._tree.gpus[action.gpus[0]].node}"
        self._caps[key] = _CapSince(
            action.limit_w, wall, action.reason, action.node_id, action.job_id, action.gpus
        )

    def _send_leases(self, target_w: np.ndarray) -> bool:
        if self.link is None or self.stopping:
            return False
        seq = self.lease_seq.next()
        lease_s = self.site.policy.lease_s
        for info in self.agents.values():
            caps: dict[int | str, float] = {
                k: float(target_w[info.first + k]) for k in range(info.stop - info.first)
            }
            lease = Lease.issue(self.controller_id, seq, caps, lease_s, agent_id=info.agent_id)
            self.link.send_lease(info.agent_id, lease)
        return True

    # -- publishing -------------------------------------------------------------------------

    def _publish(self, snap: Snapshot, now_s: float, wall: float) -> _Outputs:
        assert self.policy_state is not None
        status = self.policy_state.nodes
        target = self.policy_state.target_w
        est = self._estimates(snap)
        live: dict[str, NodeLive] = {}
        node_alarm_list = node_alarms(status, wall)
        by_node: dict[str, list[Alarm]] = {}
        for a in node_alarm_list:
            if a.node:
                by_node.setdefault(a.node, []).append(a)  # raised_at_s is ``wall``
        for k, nid in enumerate(status.node_ids):
            first, stop = self._tree.gpu_range(nid)
            sub = target[first:stop]
            maxes = self._gpu_max_w[first:stop]
            capped = int(np.count_nonzero(sub < maxes - 0.5)) if stop > first else 0
            measured = snap.node_power_w.get(nid)
            metered = nid in snap.node_power_w
            live[nid] = NodeLive(
                id=nid,
                envelope_w=float(status.envelope_w[k]),
                power_w=measured,
                estimated_w=est.get(nid),
                stale=metered and measured is None,
                capped_gpus=capped,
                cap_limit_w=float(sub.min()) if capped else None,
                mode=status.mode[k] if status.mode else "",
                margin_w=float(status.margin_w[k]),
                trip_used=float(status.trip_used[k]),
                alarms=tuple(by_node.get(nid, ())),
            )
        for nid in self._tree.of_kind("node"):
            first, stop = self._tree.gpu_range(nid)
            node = self._tree.node(nid)
            live[nid] = NodeLive(
                id=nid,
                envelope_w=node.envelope_w,
                estimated_w=est.get(nid),
                stale=bool(np.isnan(snap.gpu_power_w[first:stop]).any()),
                capped_gpus=int(
                    np.count_nonzero(target[first:stop] < self._gpu_max_w[first:stop] - 0.5)
                ),
            )
        self._live = live
        # Start-up is not a violation: before the meters and agents have reported, every
        # node sits at its worst case, so neither alarms nor violation counts are raised.
        settled, alarms, raised, cleared = self._update_alarms(node_alarm_list, now_s, wall)
        telemetry = tuple(
            NodeTelemetry(
                node=nid,
                power_w=lv.power_w if lv.power_w is not None else math.nan,
                envelope_w=lv.envelope_w,
                headroom_w=float(status.headroom_w[k]),
                ts_s=wall,
                quality=Quality.STALE if lv.stale else Quality.GOOD,
            )
            for k, nid in enumerate(status.node_ids)
            if (lv := live[nid]) is not None
        )
        if settled:
            self.metrics.count_violations(
                nid
                for k, nid in enumerate(status.node_ids)
                if status.load_w[k] > status.envelope_w[k]
            )
        points: tuple[Point, ...] = ()
        if self.build_points:
            points = tuple(self._cycle_points(snap, est, now_s, wall, count_violations=settled))
        return _Outputs(alarms, raised, cleared, telemetry, points)

    def _cycle_points(
        self,
        snap: Snapshot,
        est: Mapping[str, float],
        now_s: float,
        wall: float,
        *,
        count_violations: bool = True,
    ) -> list[Point]:
        """This cycle's TSDB points (``docs/tsdb-schema.md``: what, and at which rate)."""
        assert self.policy_state is not None
        health = self.device_health() if self.device_health is not None else {}
        stale = {dev: is_stale for dev, (is_stale, _) in health.items()}
        lost = set(self.lost_agents(now_s))
        stale.update({aid: aid in lost for aid in self.agents})
        return self._points.build(
            site=self.site,
            tree=self._tree,
            status=self.policy_state.nodes,
            snap=snap,
            target_w=self.policy_state.target_w,
            gpu_max_w=self._gpu_max_w,
            estimated_w=est,
            reserved_w=self.reservations.reserved_w(self._tree, wall),
            mode=self.mode,
            cycle_stats=self.cycle_stats,
            action_counts=counter_values(self.metrics.actions.collect, "kind"),
            devices=self.device_stats() if self.device_stats is not None else {},
            device_stale=stale,
            ts_ns=round(wall * 1e9),
            count_violations=count_violations,
        )

    def _estimates(self, snap: Snapshot) -> dict[str, float]:
        """GPU + baseline power under each node (no losses): what the agents report."""
        gpu = np.where(
            np.isnan(snap.gpu_power_w),
            self._gpu_max_w,
            snap.gpu_power_w,
        )
        own: dict[str, float] = {}
        for nid in self._tree.of_kind("node"):
            first, stop = self._tree.gpu_range(nid)
            own[nid] = float(gpu[first:stop].sum()) + self._tree.node(nid).baseline_w
        return self._tree.aggregate(own)

    def _settling(self, now_s: float, stale_devices: Sequence[str]) -> bool:
        """Still in the start-up grace: a device or agent has not reported yet and has not
        had its stale limit to do so. Alarms raised then would be about our own start
        (every node "over its envelope" at its worst case, every device "stale")."""
        if self._first_cycle_s is None:
            self._first_cycle_s = now_s
        if now_s - self._first_cycle_s >= self._startup_grace_s:
            return False
        return bool(stale_devices) or len(self._agent_seen_s) < len(self.agents)

    def _update_alarms(
        self, node_list: Iterable[Alarm], now_s: float, wall: float
    ) -> tuple[bool, tuple[Alarm, ...], tuple[Alarm, ...], tuple[str, ...]]:
        """Raise and clear this cycle's alarms; False (nothing raised) while settling."""
        stale: list[str] = []
        if self.device_health is not None:
            stale = [d for d, (is_stale, _) in self.device_health().items() if is_stale]
        if self._settling(now_s, stale):
            return False, (), (), ()
        current: dict[str, Alarm] = {a.alarm_id: a for a in node_list}
        current.update({a.alarm_id: a for a in device_alarms(stale, wall)})
        current.update(
            {
                a.alarm_id: a
                for a in agent_alarms(
                    self.lost_agents(now_s),
                    self._agent_failsafe,
                    wall,
                    {a: info.node_id for a, info in self.agents.items()},
                )
            }
        )
        current.update({a.alarm_id: a for a in self._uncappable_alarms(wall)})
        for source in self.alarm_sources:
            current.update({a.alarm_id: a for a in source(wall)})
        raised = tuple(a for aid, a in current.items() if aid not in self._alarms)
        cleared = tuple(sorted(set(self._alarms) - set(current)))
        self._alarms = current
        self.metrics.set_alarms(current.values())
        for alarm in raised:
            self.audit.record(f"alarm:{alarm.kind}", alarm.message, now_s=wall, node=alarm.node)
        for aid in cleared:
            self.audit.record("alarm_cleared", f"{aid} cleared", now_s=wall)
        return True, tuple(current.values()), raised, cleared
