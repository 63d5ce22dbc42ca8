"""/v1/health tells the truth: degraded, with the reasons, when agents are lost.

The audit saw ``ok`` while every agent was lost and every GPU was counted at its maximum
and capped. Health comes from :meth:`Controller.health`, checked here on a virtual clock
with agent reports fed the way the telemetry reader feeds them; the API serves the same
value (tests/integration/test_api.py).
"""

from __future__ import annotations

from controller.agentlink.lease import Telemetry
from controller.core.controller import Controller
from drivers.reading import Quality
from tests.unit.test_daemon import site_with_agents


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def report(ctl: Controller, agent_id: str, now_s: float, *, failsafe: bool = False) -> None:
    info = ctl.agents[agent_id]
    n = info.stop - info.first
    ctl.accept_telemetry(
        Telemetry(
            agent_id=agent_id,
            node_id=info.node_id,
            ts=now_s,
            failsafe=failsafe,
            failsafe_reason="lease expired" if failsafe else None,
            power_w=[300.0] * n,
            power_avg_w=[300.0] * n,
            limit_w=[500.0] * n,
            min_w=[100.0] * n,
            max_w=[500.0] * n,
            q=[Quality.GOOD] * n,
        ),
        received_s=now_s,
    )


def rig() -> tuple[Controller, Clock]:
    mono = Clock(1000.0)
    wall = Clock(1_750_000_000.0)

    def tick(dt: float) -> None:
        mono.t += dt
        wall.t += dt

    ctl = Controller(site_with_agents(3000.0), controller_id="ctl", clock=mono, wall_clock=wall)
    ctl.device_health = lambda: {"sst-meter": (False, None), "pdu-1": (False, None)}
    ctl.tick = tick  # type: ignore[attr-defined]
    return ctl, mono


def test_health_is_ok_while_every_agent_reports() -> None:
    ctl, mono = rig()
    agents = sorted(ctl.agents)
    assert len(agents) >= 2
    for a in agents:
        report(ctl, a, mono.t)
    ctl.run_cycle(mono.t)
    h = ctl.health()
    assert (h.status, h.agents_total, h.agents_lost, h.reasons) == ("ok", len(agents), 0, ())


def test_lost_agents_make_health_degraded_and_are_named() -> None:
    ctl, mono = rig()
    agents = sorted(ctl.agents)
    for a in agents:
        report(ctl, a, mono.t)
    ctl.run_cycle(mono.t)
    # Every agent goes silent for longer than its stale limit; the cycle goes on.
    ctl.tick(max(ctl.agents[a].stale_s for a in agents) + 1.0)  # type: ignore[attr-defined]
    ctl.run_cycle(mono.t)
    h = ctl.health()
    assert h.status == "degraded"
    assert (h.agents_total, h.agents_lost) == (len(agents), len(agents))
    assert any(
        r.startswith(f"{len(agents)} of {len(agents)} agents lost") and agents[0] in r
        for r in h.reasons
    ), h.reasons
    assert agents[0] in h.message
    # One comes back in failsafe: still degraded, now for both reasons.
    report(ctl, agents[0], mono.t, failsafe=True)
    h = ctl.health()
    assert h.status == "degraded" and h.agents_lost == len(agents) - 1
    assert h.agents_failsafe == 1
    assert any("failsafe" in r and agents[0] in r for r in h.reasons), h.reasons
    # All back and out of failsafe: ok again.
    for a in agents:
        report(ctl, a, mono.t)
    assert ctl.health().status == "ok"


def test_stale_devices_are_named_too() -> None:
    ctl, mono = rig()
    for a in ctl.agents:
        report(ctl, a, mono.t)
    ctl.device_health = lambda: {"sst-meter": (True, "timeout"), "pdu-1": (False, None)}
    ctl.run_cycle(mono.t)
    # Within the start-up grace a silent meter may just not have had its turn yet.
    assert ctl.health().status == "starting"
    ctl.tick(ctl._startup_grace_s + 0.1)  # type: ignore[attr-defined]
    for a in ctl.agents:
        report(ctl, a, mono.t)
    ctl.run_cycle(mono.t)
    h = ctl.health()
    assert h.status == "degraded" and h.devices_stale == 1
    assert any(r.startswith("1 of 2 devices stale") and "sst-meter" in r for r in h.reasons)
