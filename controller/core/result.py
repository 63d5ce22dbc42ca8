"""What one control cycle produced, handed whole to every integration.

Why one frozen value instead of callbacks fired from inside the cycle: the cycle's outputs
(alarms, escalations, TSDB points, telemetry) used to leave through seven attributes set
after construction from two files, each called mid-cycle, so a raising callback skipped
that cycle's leases. Now the cycle finishes (leases sent) and then hands this result to
each integration; none can change it or what another one sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controller.core.alarms import Alarm
from controller.core.points import Point
from controller.core.view import NodeLive, NodeTelemetry
from controller.policy import Action, Snapshot

PHASES = ("read", "decide", "act", "lease", "publish")
"""The cycle's phases, in order (``rackpower_cycle_phase_seconds{phase}``)."""


def _empty_nodes() -> Mapping[str, NodeLive]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Drain:
    """A node that ignores its caps, to be drained through the scheduler (enforce only)."""

    node_id: str
    reason: str


@dataclass(frozen=True)
class CycleResult:
    """One cycle's outputs. ``snapshot`` is None when the read phase failed; ``leased`` says
    whether leases went out (not while stopping, without a link, or after a failed decide)."""

    now_s: float
    wall_s: float
    mode: str
    snapshot: Snapshot | None = None
    actions: tuple[Action, ...] = ()
    drains: tuple[Drain, ...] = ()
    leased: bool = False
    nodes: Mapping[str, NodeLive] = field(default_factory=_empty_nodes)
    alarms: tuple[Alarm, ...] = ()  # every alarm in force (re-raised each cycle, as before)
    raised: tuple[Alarm, ...] = ()  # of ``alarms``, those new this cycle
    notices: tuple[Alarm, ...] = ()  # one-off alarms from integrations (escalation outcomes)
    cleared: tuple[str, ...] = ()  # alarm ids that no longer hold
    telemetry: tuple[NodeTelemetry, ...] = ()
    points: tuple[Point, ...] = ()
    failed_phases: tuple[str, ...] = ()
