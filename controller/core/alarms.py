"""Which alarms hold right now, derived from one cycle's numbers (pure: no I/O, no clock).

The daemon diffs this set against the previous cycle's to raise and clear alarms on the
BMS, so an alarm is a function of state, never an event that can be missed. Messages are
stable while the condition holds (numbers go in ``details``), so a held alarm is
published once, not every cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.integrations.bms.bridge import Alarm, AlarmKind
from controller.policy import NodeStatus
from controller.policy.conformance import Evidence

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
