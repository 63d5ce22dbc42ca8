"""Which alarms hold right now, derived from one cycle's numbers (pure: no I/O, no clock).

The daemon diffs this set against the previous cycle's to raise and clear alarms on the
BMS, so an alarm is a function of state, never an event that can be missed. Messages are
stable while the condition holds (numbers go in ``details``), so a held alarm is
published once, not every cycle.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controller.core.setpoints import format_ts
from controller.policy import NodeStatus
from controller.policy.conformance import Evidence

# The one alarm type: the BMS publishes it, the audit records it, the API shows it per node.


class AlarmKind(enum.StrEnum):
    ENVELOPE_EXCEEDED = "envelope_exceeded"
    TRIP_RISK = "trip_risk"
    DEVICE_STALE = "device_stale"
    AGENT_LOST = "agent_lost"
    ESCALATION = "escalation"
    NODE_UNCAPPABLE = "node_uncappable"  # a GPU server ignores its caps (policy/conformance.py)


@dataclass(frozen=True)
class Alarm:
    """A condition the BMS should see until it is cleared.

    ``subject`` is what the alarm is about (a node, device or agent id); the pair
    (kind, subject) is the alarm's identity, so raising the same condition every cycle
    publishes it once.
    """

    kind: AlarmKind
    subject: str
    message: str
    raised_at_s: float
    severity: Literal["warning", "critical"] = "warning"
    node: str | None = None
    details: Mapping[str, float | str] = field(default_factory=dict)

    @property
    def alarm_id(self) -> str:
        return alarm_id(self.kind, self.subject)

    def to_json(self) -> dict[str, Any]:
        return {
            "alarm_id": self.alarm_id,
            "kind": str(self.kind),
            "severity": self.severity,
            "subject": self.subject,
            "node": self.node,
            "message": self.message,
            "raised_at": format_ts(self.raised_at_s),
            "details": {k: _finite(v) for k, v in self.details.items()},
        }


def alarm_id(kind: AlarmKind, subject: str) -> str:
    """``envelope_exceeded:rack-1``: what :meth:`BmsLink.clear_alarm` takes."""
    return f"{kind}:{subject}"


def _finite(value: float | str | None) -> float | str | None:
    """JSON has no NaN: a non-finite number is published as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


TRIP_RISK_FRACTION = 0.5  # half of a breaker's thermal allowance used


def node_alarms(status: NodeStatus, now_s: float) -> list[Alarm]:
    out: list[Alarm] = []
    for k, nid in enumerate(status.node_ids):
        load, env = float(status.load_w[k]), float(status.envelope_w[k])
        used = float(status.trip_used[k])
        numbers = {"load_w": round(load, 1), "envelope_w": round(env, 1), "trip_used": used}
        if load > env:
            out.append(
                Alarm(
                    AlarmKind.ENVELOPE_EXCEEDED,
                    nid,
                    f"{nid} draws more than its envelope",
                    now_s,
                    node=nid,
                    details=numbers,
                )
            )
        if used >= TRIP_RISK_FRACTION:
            out.append(
                Alarm(
                    AlarmKind.TRIP_RISK,
                    nid,
                    f"{nid} has used over {TRIP_RISK_FRACTION:.0%} of its breaker's overload"
                    " allowance",
                    now_s,
                    severity="critical",
                    node=nid,
                    details=numbers,
                )
            )
    return out


def device_alarms(stale_devices: Iterable[str], now_s: float) -> list[Alarm]:
    return [
        Alarm(
            AlarmKind.DEVICE_STALE,
            dev,
            f"device {dev} has no fresh reading: the nodes it meters count at their rating",
            now_s,
        )
        for dev in sorted(stale_devices)
    ]


def agent_alarms(
    lost_agents: Iterable[str],
    failsafe: Mapping[str, str],
    now_s: float,
    node_of: Mapping[str, str] | None = None,
) -> list[Alarm]:
    """Silent agents (their GPUs count at maximum) and agents sitting at their failsafe cap.

    ``node_of`` maps an agent to its GPU server, so the alarm names the server as its
    ``node`` too: a BMS or an operator acts on a server, not on an agent id.
    """
    nodes = node_of or {}
    lost = set(lost_agents)
    out = [
        Alarm(
            AlarmKind.AGENT_LOST,
            a,
            f"node agent {a} is silent: its GPUs count at their maximum",
            now_s,
            severity="critical",
            node=nodes.get(a),
        )
        for a in sorted(lost)
    ]
    out += [
        Alarm(
            AlarmKind.AGENT_LOST,
            a,
            f"node agent {a} is at its failsafe cap: {why}",
            now_s,
            node=nodes.get(a),
        )
        for a, why in sorted(failsafe.items())
        if a not in lost
    ]
    return out


def out_of_band_text(node_id: str) -> str:
    """What we cannot do yet for a node that ignores its caps (no Redfish driver)."""
    return f"no out-of-band path (BMC) configured: cannot cap node {node_id} out of band"


def uncappable_alarms(
    flagged: Iterable[str], evidence: Mapping[str, Evidence], now_s: float
) -> list[Alarm]:
    """GPU servers that ignore their caps: counted at their maximum, neighbours capped.

    The message names the node and what was done; the figures that convicted it go in
    ``details`` (they change every cycle, the message must not).
    """
    out: list[Alarm] = []
    for nid in sorted(flagged):
        ev = evidence.get(nid)
        details: dict[str, float | str] = {}
        if ev is not None:
            details = {
                "allowed_w": round(ev.allowed_w, 1),
                "seen_w": round(ev.seen_w, 1) if ev.seen_w == ev.seen_w else "unknown",
                "source": ev.source,
            }
        out.append(
            Alarm(
                AlarmKind.NODE_UNCAPPABLE,
                nid,
                f"node {nid} draws more than its leased caps allow: it is counted at its"
                f" maximum, its rack neighbours are capped instead and a drain is requested;"
                f" {out_of_band_text(nid)}",
                now_s,
                severity="critical",
                node=nid,
                details=details,
            )
        )
    return out
