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

from collections.abc import Iterable, Sequence

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

from controller.config import Kind
from controller.topology import PowerTree
from controller.view import CapRow, Health, NodeOut, kinds_down_to

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

_POLL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_CYCLE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0)


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
        self.poll_errors = Counter(
            "rackpower_poll_errors",
            "Failed polls by device and error kind.",
            ["device", "error"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            "rackpower_cycle_duration_seconds",
            "Time for one control cycle (read to act).",
            buckets=_CYCLE_BUCKETS_S,
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

        node_labels = ["node", "kind"]
        self.node_power = Gauge(
            "rackpower_node_power_watts",
            "Measured power (NaN when unmetered or unusable).",
            node_labels,
            registry=r,
        )
        self.node_load = Gauge(
            "rackpower_node_load_watts",
            "max(measured, estimated); the rating when unknown.",
            node_labels,
            registry=r,
        )
        self.node_envelope = Gauge(
            "rackpower_node_envelope_watts",
            "Envelope in force (overrides applied).",
            node_labels,
            registry=r,
        )
        self.node_headroom = Gauge(
            "rackpower_node_headroom_watts",
            "envelope - load - reserved; negative means over.",
            node_labels,
            registry=r,
        )
        self.node_reserved = Gauge(
            "rackpower_node_reserved_watts",
            "Reserved on this node and below.",
            node_labels,
            registry=r,
        )
        self.node_capped_gpus = Gauge(
            "rackpower_node_capped_gpus",
            "GPUs below held under their maximum limit.",
            node_labels,
            registry=r,
        )
        self.node_alarms = Gauge(
            "rackpower_node_alarms", "Alarms active on the node.", node_labels, registry=r
        )
        self.caps_active = Gauge("rackpower_caps_active", "Cap groups (jobs) in force.", registry=r)
        self.capped_gpus = Gauge("rackpower_capped_gpus", "GPUs under a cap.", registry=r)
        self.reservations_active = Gauge(
            "rackpower_reservations_active", "Reservations held.", registry=r
        )
        self.gpu_power: Gauge | None = None
        if per_gpu:
            self.gpu_power = Gauge(
                "rackpower_gpu_power_watts", "Power per GPU.", ["gpu", "node"], registry=r
            )

    # -- events the daemon reports ---------------------------------------------------

    def observe_poll(self, device: str, duration_s: float, error: str | None = None) -> None:
        """One poll of a device; ``error`` is a short kind (``timeout``, ``exception``)."""
        self.poll_duration.labels(device).observe(duration_s)
        if error is not None:
            self.poll_errors.labels(device, error).inc()

    def observe_cycle(self, duration_s: float, *, overrun: bool = False) -> None:
        self.cycle_duration.observe(duration_s)
        if overrun:
            self.cycle_overruns.inc()

    def count_action(self, kind: str, n: int = 1) -> None:
        self.actions.labels(kind).inc(n)

    def count_violations(self, node_ids: Iterable[str]) -> None:
        """Call once per cycle with the constraint nodes that were above their envelope."""
        for nid in node_ids:
            self.violations.labels(nid).inc()

    def set_tsdb_dropped(self, total: int) -> None:
        """Mirror the TSDB writer's running drop count into a counter (it only grows)."""
        if total > self._tsdb_dropped_seen:
            self.tsdb_dropped.inc(total - self._tsdb_dropped_seen)
            self._tsdb_dropped_seen = total

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

        Node series are cleared first so nodes gone after a config reload disappear.
        """
        self.info.clear()
        self.info.labels(self.site, health.mode).set(1)
        self.up.set(1 if health.status == "ok" else 0)
        gauges = (
            self.node_power,
            self.node_load,
            self.node_envelope,
            self.node_headroom,
            self.node_reserved,
            self.node_capped_gpus,
            self.node_alarms,
        )
        for g in gauges:
            g.clear()
        for row in rows:
            if row.kind not in self.kinds:
                continue
            labels = (row.id, row.kind)
            self.node_power.labels(*labels).set(
                float("nan") if row.power_w is None else row.power_w
            )
            self.node_load.labels(*labels).set(row.load_w)
            self.node_envelope.labels(*labels).set(row.envelope_w)
            self.node_headroom.labels(*labels).set(row.headroom_w)
            self.node_reserved.labels(*labels).set(row.reserved_w)
            self.node_capped_gpus.labels(*labels).set(row.cap.capped_gpus)
            self.node_alarms.labels(*labels).set(len(row.alarms))
        self.caps_active.set(len(caps))
        self.capped_gpus.set(sum(c.gpu_count for c in caps))
        self.reservations_active.set(reservations)

    def render(self) -> bytes:
        return generate_latest(self.registry)
