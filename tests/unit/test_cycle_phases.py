"""The cycle's one front door: named phases, timed and isolated, a frozen result.

Real parts: the Controller on a real site, leases read back from the in-process agent
link (the link the demo runs); no network is needed for what is tested here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest

from controller.agentlink.lease import Lease
from controller.agentlink.transport import InProcessAgentSide, InProcessLink
from controller.core.controller import Controller
from controller.core.integration import Integration, deliver
from controller.core.result import PHASES, CycleResult
from tests.unit.test_daemon import site_with_agents


class Recorder:
    """An integration that keeps what it was handed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.results: list[CycleResult] = []

    async def run(self, stop: asyncio.Event) -> None:
        return None

    def publish(self, result: CycleResult) -> None:
        self.results.append(result)

    async def aclose(self) -> None:
        return None


class Raising(Recorder):
    def publish(self, result: CycleResult) -> None:
        raise RuntimeError("publisher down")


def rig() -> tuple[Controller, dict[str, InProcessAgentSide]]:
    hub = InProcessLink()
    ctl = Controller(site_with_agents(3000.0), link=hub.controller(), controller_id="ctl")
    sides = {aid: hub.agent(aid) for aid in ctl.agents}
    assert sides, "the toy site must have agents, or no lease is tested"
    return ctl, sides


async def next_lease(side: InProcessAgentSide) -> Lease:
    msg = await asyncio.wait_for(anext(aiter(side.leases())), 1.0)
    assert isinstance(msg, Lease), msg
    return msg


def sample(ctl: Controller, name: str, labels: dict[str, str]) -> float | None:
    return ctl.metrics.registry.get_sample_value(name, labels)


async def test_a_raising_publisher_stops_neither_leases_nor_the_other_integrations() -> None:
    ctl, sides = rig()
    before, after = Recorder("before"), Recorder("after")
    integrations: list[Integration] = [before, Raising("broken"), after]
    seqs: dict[str, list[int]] = {aid: [] for aid in sides}
    for k in range(3):
        result = ctl.run_cycle(1000.0 + k * 0.5)
        deliver(result, integrations, ctl.phases)
        for aid, side in sides.items():  # every agent got this cycle's lease, read back
            lease = await next_lease(side)
            assert lease.caps_w and lease.agent_id == aid
            seqs[aid].append(lease.seq)
    assert all(s == sorted(set(s)) and len(s) == 3 for s in seqs.values())
    assert len(before.results) == len(after.results) == 3
    assert sample(ctl, "rackpower_cycle_phase_failures_total", {"phase": "deliver"}) == 3.0
    assert ctl.phases.failed == ["deliver"]


async def test_a_failing_audit_in_act_does_not_skip_the_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's finding: an exception in an audit callback skipped the cycle's leases."""
    ctl, sides = rig()

    def broken(*_: Any, **__: Any) -> Any:
        raise OSError("audit disk full")

    monkeypatch.setattr(ctl.audit, "record_action", broken)
    # No readings: every rack counts at its worst case, so the policy caps (acts).
    result = ctl.run_cycle(1000.0)
    assert result.actions, "the cycle must act, or the failing audit is never reached"
    assert result.failed_phases == ("act",) and result.leased
    for side in sides.values():
        lease = await next_lease(side)
        assert min(lease.caps_w.values()) < 500.0  # the cap decided, below the 500 W maximum
    failures = sample(ctl, "rackpower_cycle_phase_failures_total", {"phase": "act"})
    assert failures is not None and failures >= 1.0


async def test_a_failing_decide_sends_no_lease_and_publishes_no_garbage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Failed decide: no new targets, so no lease (the agents keep theirs, then failsafe)."""
    ctl, sides = rig()
    ctl.run_cycle(1000.0)
    for side in sides.values():
        await next_lease(side)

    def broken(*_: Any) -> Any:
        raise ValueError("policy bug")

    monkeypatch.setattr(ctl, "policy", broken)
    result = ctl.run_cycle(1000.5)
    assert result.failed_phases == ("decide",) and not result.leased
    assert result.actions == () and result.points == () and result.telemetry == ()
    for side in sides.values():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(side.leases())), 0.2)
    assert sample(ctl, "rackpower_cycle_phase_failures_total", {"phase": "decide"}) == 1.0
    health = ctl.health()  # the failure shows where an operator looks, not only on /metrics
    assert health.status == "degraded"
    assert any("decide phase failed" in r for r in health.reasons)


def test_every_phase_is_timed_on_metrics_after_a_cycle() -> None:
    ctl, _ = rig()
    assert PHASES == ("read", "decide", "act", "lease", "publish")
    deliver(ctl.run_cycle(1000.0), [Recorder("r")], ctl.phases)
    for phase in (*PHASES, "deliver"):
        count = sample(ctl, "rackpower_cycle_phase_seconds_count", {"phase": phase})
        assert count == 1.0, phase
    text = ctl.metrics.render().decode()
    assert 'rackpower_cycle_phase_seconds_bucket{le="0.005",phase="read"}' in text


def test_the_result_is_frozen() -> None:
    ctl, _ = rig()
    result = ctl.run_cycle(1000.0)
    assert result.snapshot is not None and result.nodes and result.telemetry
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.leased = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.nodes["rack-1"] = result.nodes["rack-1"]  # type: ignore[index]
    assert isinstance(result.actions, tuple) and isinstance(result.points, tuple)


def test_a_phase_failing_every_cycle_logs_once_not_every_cycle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctl, _ = rig()
    with caplog.at_level(logging.ERROR, logger="controller.cycle"):
        for k in range(50):
            deliver(ctl.run_cycle(1000.0 + k * 0.5), [Raising("broken")], ctl.phases)
    lines = [r for r in caplog.records if "deliver:broken" in r.getMessage()]
    assert len(lines) == 1
    assert sample(ctl, "rackpower_cycle_phase_failures_total", {"phase": "deliver"}) == 50.0
