"""Prometheus metrics for ``GET /metrics``, in a registry of their own.

Own :class:`CollectorRegistry`, not the global one: a test, the demo and a scenario can
each run a controller in one process without their series colliding.

Two kinds of series:

* events the daemon reports as they happen (a poll, a cycle, an action, a violation,
  TSDB drops): counters and histograms it updates through the ``observe_*``/``count_*``
  methods;
* the state of the tree (power, envelope, headroom, reservations, caps): gauges set
  from the API's view at scrape time by :meth:`Metrics.refresh`, so they are exactly
  what ``/v1/tree`` says and the daemon does no work for them between scrapes.

Cardinality: per-node series stop at the GPU servers (about 370 series per metric for a
40-rack row of 2,500 GPUs). Per-GPU power is off unless asked for (``per_gpu=True``);
on a large site ``down_to="rack"`` keeps even the servers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol, get_args

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.core.view import CapRow, Health, HealthStatus, NodeOut, kinds_down_to
from controller.model.config import Kind
from controller.model.topology import PowerTree

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

_POLL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Cycles take from under a ms (a small site) to tens of ms (a hall): up to 51 ms the
# buckets step by 2**(1/4) (19 %), so a p99 read from two scrapes' difference
# (histogram_quantile) resolves a 20 % change (issue 11: a BMS flood must leave the
# cycle's p99 within 20 %). The coarse edges are kept for existing dashboards.
_FINE_BUCKETS_S = tuple(round(0.0001 * 2 ** (k / 4), 7) for k in range(37))  # 0.1-51 ms
_CYCLE_BUCKETS_S = tuple(
    sorted({*_FINE_BUCKETS_S, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0})
)


class Metrics:
    """Every series the controller exports; one instance per running controller."""

    def __init__(
        self,
        site: str,
        *,
        per_gpu: bool = False,
        down_to: Kind = "node",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.site = site
        self.per_gpu = per_gpu
        self.kinds = kinds_down_to(down_to)
        r = self.registry = registry if registry is not None else CollectorRegistry()

        self.info = Gauge(
            "rackpower_info", "Always 1; labels say what is running.", ["site", "mode"], registry=r
        )
        self.up = Gauge("rackpower_up", "1 while the control loop is healthy.", registry=r)

        self.poll_duration = Histogram(
            "rackpower_poll_duration_seconds",
            "Time for one poll of a device.",
            ["device"],
            buckets=_POLL_BUCKETS_S,
            registry=r,
        )
        self.cycle_duration = Histogram(
            "rackpower_cycle_duration_seconds",
            "Time for one control cycle (read to act).",
            buckets=_CYCLE_BUCKETS_S,
            registry=r,
        )
        self.cycle_cpu = Histogram(
            "rackpower_cycle_cpu_seconds",
            "CPU time of one control cycle on the loop's thread (not counting preemption).",
            buckets=_CYCLE_BUCKETS_S,
            registry=r,
        )
        # Per phase (controller/core/phases.py): which part of a slow cycle was slow, and
        # which part failed (the cycle goes on past a failed phase; this says it did).
        self.cycle_phase = Histogram(
            "rackpower_cycle_phase_seconds",
            "Time for one phase of a control cycle (read, decide, act, lease, publish, deliver).",
            ["phase"],
            buckets=_CYCLE_BUCKETS_S,
            registry=r,
        )
        self.cycle_phase_failures = Counter(
            "rackpower_cycle_phase_failures",
            "Control cycle phases that raised (counted, logged; the cycle went on).",
            ["phase"],
            registry=r,
        )
        self.cycle_overruns = Counter(
            "rackpower_cycle_overruns", "Cycles that missed their deadline.", registry=r
        )
        self.actions = Counter(
            "rackpower_actions", "Actions taken (or refused) by kind.", ["kind"], registry=r
        )
        self.violations = Counter(
            "rackpower_envelope_violations",
            "Cycles a constraint node spent above its envelope.",
            ["node"],
            registry=r,
        )
        self.tsdb_dropped = Counter(
            "rackpower_tsdb_dropped_points",
            "Telemetry points dropped because the TSDB buffer was full.",
            registry=r,
        )
        self._tsdb_dropped_seen = 0
        # The agent link's authentication refusals (docs/agent-link.md): forged or
        # unsigned telemetry, and leases not sent for want of an agent's key. Mirrored
        # from the link's running counts like the TSDB drops.
        self.agent_telemetry_refused = Counter(
            "rackpower_agent_telemetry_refused",
            "Agent telemetry refused: unsigned, unknown key or bad MAC (forged, or no key).",
            registry=r,
        )
        self.agent_leases_unsent_no_key = Counter(
            "rackpower_agent_leases_unsent_no_key",
            "Leases not sent because the agent has no usable key file (it stays at failsafe).",
            registry=r,
        )
        self._link_seen = {"auth_refused": 0, "leases_no_key": 0}

        self._tree = _TreeCollector()
        r.register(self._tree)
        self._device_errors = _DeviceErrorsCollector()
        r.register(self._device_errors)
        self.caps_active = Gauge("rackpower_caps_active", "Cap groups (jobs) in force.", registry=r)
        self.capped_gpus = Gauge("rackpower_capped_gpus", "GPUs under a cap.", registry=r)
        self.reservations_active = Gauge(
            "rackpower_reservations_active", "Reservations held.", registry=r
        )
        # Health as series (issue 12, alert rules): the status as a state set, and the
        # counts /v1/health gives reasons for, so a rule can say "2 agents lost" without
        # parsing text. ``rackpower_up`` stays: 0 also while starting or stopping.
        self.health_status = Gauge(
            "rackpower_health_status",
            "1 on the control loop's current status (starting, ok, degraded, stopping).",
            ["status"],
            registry=r,
        )
        self.cycle_period = Gauge(
            "rackpower_cycle_period_seconds", "The configured control cycle period.", registry=r
        )
        self.devices = Gauge("rackpower_devices", "Polled devices (meters).", registry=r)
        self.devices_stale = Gauge(
            "rackpower_devices_stale",
            "Devices without a fresh reading: the nodes they meter count at their rating.",
            registry=r,
        )
        self.agents = Gauge("rackpower_agents", "Node agents configured.", registry=r)
        self.agents_lost = Gauge(
            "rackpower_agents_lost",
            "Agents silent past their stale limit: their GPUs count at their maximum.",
            registry=r,
        )
        self.agents_failsafe = Gauge(
            "rackpower_agents_failsafe",
            "Agents reporting, but on their failsafe cap (no lease reaches them).",
            registry=r,
        )
        self._alarms = _AlarmCollector()
        r.register(self._alarms)
        self.gpu_power: Gauge | None = None
        if per_gpu:
            self.gpu_power = Gauge(
                "rackpower_gpu_power_watts", "Power per GPU.", ["gpu", "node"], registry=r
            )

    # -- events the daemon reports ---------------------------------------------------

    def observe_poll(self, device: str, duration_s: float) -> None:
        """One poll of a device (its errors, by kind: ``rackpower_device_errors_total``)."""
        self.poll_duration.labels(device).observe(duration_s)

    def observe_cycle(
        self, duration_s: float, *, cpu_s: float | None = None, overrun: bool = False
    ) -> None:
        self.cycle_duration.observe(duration_s)
        if cpu_s is not None:
            self.cycle_cpu.observe(cpu_s)
        if overrun:
            self.cycle_overruns.inc()

    def observe_phase(self, phase: str, duration_s: float) -> None:
        self.cycle_phase.labels(phase).observe(duration_s)

    def count_phase_failure(self, phase: str) -> None:
        self.cycle_phase_failures.labels(phase).inc()

    def count_action(self, kind: str, n: int = 1) -> None:
        self.actions.labels(kind).inc(n)

    def count_violations(self, node_ids: Iterable[str]) -> None:
        """Call once per cycle with the constraint nodes that were above their envelope."""
        for nid in node_ids:
            self.violations.labels(nid).inc()

    def watch_bms(self, stats: Callable[[], Mapping[str, int | bool]]) -> None:
        """Export the BMS link's counters, read at scrape time (the link keeps them)."""
        self.registry.register(_BmsCollector(stats))

    def set_tsdb_dropped(self, total: int) -> None:
        """Mirror the TSDB writer's running drop count into a counter (it only grows)."""
        if total > self._tsdb_dropped_seen:
            self.tsdb_dropped.inc(total - self._tsdb_dropped_seen)
            self._tsdb_dropped_seen = total

    def set_agent_link(self, auth_refused: int, leases_no_key: int) -> None:
        """Mirror the controller link's running counts (``LinkStats``) into counters."""
        for name, total, counter in (
            ("auth_refused", auth_refused, self.agent_telemetry_refused),
            ("leases_no_key", leases_no_key, self.agent_leases_unsent_no_key),
        ):
            if total > self._link_seen[name]:
                counter.inc(total - self._link_seen[name])
                self._link_seen[name] = total

    def set_alarms(self, alarms: Iterable[AlarmLike]) -> None:
        """The alarms active after this cycle (all kinds: node, device, agent, scheduler).

        Exported as one ``rackpower_alarm`` series per alarm while it holds, so an alert
        names what it is about; a cleared alarm's series is gone at the next scrape.
        """
        self._alarms.rows = [(str(a.kind), a.subject, a.node or "", a.severity) for a in alarms]

    def set_device_errors_source(self, source: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Where ``rackpower_device_errors_total`` is read from at scrape time: the poll
        group's ``{(device, kind): errors}`` (drivers.errorlog: kinds are a closed set)."""
        self._device_errors.source = source

    def set_gpu_power(self, tree: PowerTree, power_w: npt.NDArray[np.float64]) -> None:
        """Per-GPU power; a no-op unless the instance was made with ``per_gpu=True``."""
        if self.gpu_power is None:
            return
        for g, value in zip(tree.gpus, power_w.tolist(), strict=True):
            self.gpu_power.labels(g.id, g.node).set(value)

    # -- state, set at scrape time ------------------------------------------------------

    def refresh(
        self,
        rows: Sequence[NodeOut],
        caps: Sequence[CapRow],
        *,
        health: Health,
        reservations: int,
    ) -> None:
        """Set the tree gauges from the rows ``/v1/tree`` would serve.

        The per-node series are written straight from these rows at collect time, so
        nodes gone after a config reload disappear and no labelled child is kept.
        """
        self.info.clear()
        self.info.labels(self.site, health.mode).set(1)
        self.up.set(1 if health.status == "ok" else 0)
        for status in get_args(HealthStatus):
            self.health_status.labels(status).set(1 if health.status == status else 0)
        self.cycle_period.set(health.cycle_s)
        self.devices.set(health.devices_total)
        self.devices_stale.set(health.devices_stale)
        self.agents.set(health.agents_total)
        self.agents_lost.set(health.agents_lost)
        self.agents_failsafe.set(health.agents_failsafe)
        self._tree.rows = [row for row in rows if row.kind in self.kinds]
        self.caps_active.set(len(caps))
        self.capped_gpus.set(sum(c.gpu_count for c in caps))
        self.reservations_active.set(reservations)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_NODE_GAUGES: tuple[tuple[str, str, Callable[[NodeOut], float]], ...] = (
    (
        "rackpower_node_power_watts",
        "Measured power (NaN when unmetered or unusable).",
        lambda r: math.nan if r.power_w is None else r.power_w,
    ),
    (
        "rackpower_node_load_watts",
        "max(measured, estimated); the rating when unknown.",
        lambda r: r.load_w,
    ),
    (
        "rackpower_node_envelope_watts",
        "Envelope in force (overrides applied).",
        lambda r: r.envelope_w,
    ),
    (
        "rackpower_node_headroom_watts",
        "envelope - load - reserved; negative means over.",
        lambda r: r.headroom_w,
    ),
    ("rackpower_node_reserved_watts", "Reserved on this node and below.", lambda r: r.reserved_w),
    (
        "rackpower_node_capped_gpus",
        "GPUs below held under their maximum limit.",
        lambda r: float(r.cap.capped_gpus),
    ),
    ("rackpower_node_alarms", "Alarms active on the node.", lambda r: float(len(r.alarms))),
)


class _TreeCollector(Collector):
    """Per-node gauges built from the last rows at scrape time.

    Ten times cheaper than one labelled ``Gauge`` child per node cleared and set on
    every scrape, which matters because a scrape runs on the control loop's thread.
    """

    def __init__(self) -> None:
        self.rows: list[NodeOut] = []

    def describe(self) -> Iterator[Metric]:
        for name, doc, _ in _NODE_GAUGES:
            yield GaugeMetricFamily(name, doc, labels=("node", "kind"))

    def collect(self) -> Iterator[Metric]:
        rows = self.rows
        for name, doc, value in _NODE_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=("node", "kind"))
            for row in rows:
                family.add_metric((row.id, row.kind), value(row))
            yield family


class AlarmLike(Protocol):
    """What :meth:`Metrics.set_alarms` reads of an alarm (``controller.core.alarms.Alarm`` has
    it; a Protocol keeps the metrics free of the alarm's JSON and BMS details)."""

    @property
    def kind(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def node(self) -> str | None: ...
    @property
    def severity(self) -> str: ...


class _AlarmCollector(Collector):
    """``rackpower_alarm{kind, subject, node, alarm_severity} 1`` per active alarm."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for row in self.rows:
            family.add_metric(row, 1.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "rackpower_alarm",
            "1 per alarm active (kind, what it is about, its node, its severity).",
            labels=("kind", "subject", "node", "alarm_severity"),
        )


# BMS link counter -> (metric name, help). Drops are the ones to alert on (F6, flood).
_BMS_COUNTERS = {
    "acks_dropped": ("rackpower_bms_acks_dropped", "BMS acks dropped before publishing."),
    "commands_dropped": (
        "rackpower_bms_commands_dropped",
        "BMS commands dropped unanswered: the bounded inbox was full (a flood).",
    ),
    "telemetry_dropped": (
        "rackpower_bms_telemetry_dropped",
        "BMS telemetry frames dropped (queue full while the broker was away).",
    ),
    "commands_accepted": ("rackpower_bms_commands_accepted", "BMS commands accepted."),
    "commands_rejected": ("rackpower_bms_commands_rejected", "BMS commands rejected."),
    "commands_duplicate": (
        "rackpower_bms_commands_duplicate",
        "BMS commands with a command_id seen before (answered, not applied again).",
    ),
    "retained_commands_ignored": (
        "rackpower_bms_retained_commands_ignored",
        "Retained BMS commands ignored.",
    ),
    "internal_errors": (
        "rackpower_bms_internal_errors",
        "BMS commands acked 'internal error' (a bug: see the log).",
    ),
    "connects": ("rackpower_bms_connects", "Connections made to the BMS broker."),
}


class _BmsCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int | bool]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, doc) in _BMS_COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        g = GaugeMetricFamily("rackpower_bms_connected", "1 while connected to the BMS broker.")
        g.add_metric([], float(bool(stats.get("connected", False))))
        yield g


class _DeviceErrorsCollector(Collector):
    """``rackpower_device_errors_total{device,kind}``, read from the pollers at scrape.

    The pollers own the counts (they only grow); reading them at scrape time costs the
    poll loop nothing and drops the series of a device removed by a reload.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[tuple[str, str], int]] | None = None

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "rackpower_device_errors", "Device poll errors by kind.", labels=("device", "kind")
        )

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "rackpower_device_errors", "Device poll errors by kind.", labels=("device", "kind")
        )
        for (device, kind), n in sorted((self.source() if self.source else {}).items()):
            family.add_metric((device, kind), n)
        yield family
