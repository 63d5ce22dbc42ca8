"""The conformance judge (controller/policy/conformance.py) and the policy's handling of
the servers it names (Snapshot.uncappable). Pure functions: time is an argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.agentlink.lease import Telemetry
from controller.core.controller import Controller
from controller.model.topology import PowerTree
from controller.policy import Snapshot, decide
from controller.policy.conformance import (
    ConformanceLimits,
    ConformanceState,
    Verdict,
    judge,
)
from drivers.reading import Quality, Reading
from tests.unit.test_daemon import site_with_agents

LIMITS = ConformanceLimits(lag_s=4.0, raise_s=2.0, clear_s=10.0)
N1, N2 = "rack-1-n1", "rack-1-n2"
BASE_W = 200.0


@pytest.fixture
def tree() -> PowerTree:
    return PowerTree(site_with_agents(rack_envelope_w=3000.0))


class Judge:
    """Feeds the judge one cycle at a time, as the daemon does (every 0.5 s)."""

    def __init__(self, tree: PowerTree) -> None:
        self.tree = tree
        self.state = ConformanceState.empty(len(tree.gpus), LIMITS)
        self.t = 0.0
        self.lease = np.full(len(tree.gpus), 500.0)

    def gpus(self, **per_node_w: float) -> np.ndarray:
        """Per GPU power from ``rack_1_n1=480``-style keywords; others report 100 W."""
        out = np.full(len(self.tree.gpus), 100.0)
        for key, w in per_node_w.items():
            first, stop = self.tree.gpu_range(key.replace("_", "-"))
            out[first:stop] = w
        return out

    def cycle(
        self,
        gpu_w: np.ndarray,
        meters: dict[str, float | None] | None = None,
        quiet: frozenset[str] = frozenset(),
    ) -> Verdict:
        verdict, self.state = judge(
            self.tree,
            self.t,
            self.state,
            leased_w=self.lease.copy(),
            gpu_power_w=gpu_w,
            node_power_w=meters or {},
            limits=LIMITS,
            quiet=quiet,
        )
        self.t += 0.5
        return verdict

    def run(
        self, seconds: float, gpu_w: np.ndarray, meters: dict[str, float | None] | None = None
    ) -> Verdict:
        verdict = self.cycle(gpu_w, meters)
        for _ in range(round(seconds / 0.5) - 1):
            verdict = self.cycle(gpu_w, meters)
        return verdict


def lease(j: Judge, node: str, w: float) -> None:
    first, stop = j.tree.gpu_range(node)
    j.lease[first:stop] = w


def test_a_cap_just_lowered_is_not_held_against_the_node(tree: PowerTree) -> None:
    """Normal lag: the cap drops from 500 to 200 W and the GPUs keep 480 W for a few
    seconds while the lease lands. Within lag_s that is not disobedience; a node still at
    480 W once the lag and raise_s have passed is."""
    j = Judge(tree)
    j.run(5.0, j.gpus(rack_1_n1=480))
    lease(j, N1, 200.0)
    verdict = j.run(LIMITS.lag_s, j.gpus(rack_1_n1=480))
    assert verdict.flagged == frozenset()
    assert N1 not in j.state.over_since_s
    verdict = j.run(LIMITS.raise_s + 1.0, j.gpus(rack_1_n1=480))
    assert verdict.flagged == {N1}
    assert j.state.evidence[N1].source == "agent report"
    assert j.state.probe_w[N1] == (200.0,) * 4  # what it is still leased while flagged


def test_raised_after_raise_s_cleared_after_clear_s_and_silence_proves_nothing(
    tree: PowerTree,
) -> None:
    j = Judge(tree)
    lease(j, N1, 200.0)
    j.run(5.0, j.gpus(rack_1_n1=200))
    first = j.cycle(j.gpus(rack_1_n1=480))
    assert first.flagged == frozenset()  # one cycle over is not "a few cycles"
    verdict = j.run(LIMITS.raise_s, j.gpus(rack_1_n1=480))
    assert verdict.raised == (N1,) and verdict.flagged == {N1}
    # The agent goes silent (no meter either): nothing spoke, nothing is cleared.
    silent = j.gpus()
    silent[slice(*tree.gpu_range(N1))] = math.nan
    verdict = j.run(3 * LIMITS.clear_s, silent)
    assert verdict.flagged == {N1} and verdict.cleared == ()
    # Back, obeying: cleared only after clear_s on end.
    verdict = j.run(LIMITS.clear_s - 1.0, j.gpus(rack_1_n1=195))
    assert verdict.flagged == {N1}
    verdict = j.run(1.5, j.gpus(rack_1_n1=195))
    assert verdict.cleared == (N1,) and verdict.flagged == frozenset()
    assert N1 not in j.state.probe_w


def test_the_node_meter_convicts_a_node_whose_agent_reports_low(tree: PowerTree) -> None:
    """The meter reads input power: conversion losses within loss_fraction are allowed."""
    j = Judge(tree)
    lease(j, N1, 200.0)
    allowed = 4 * 200.0 + BASE_W
    lying = j.gpus(rack_1_n1=190)
    verdict = j.run(5.0, lying, {N1: allowed * 1.08})
    assert verdict.flagged == frozenset()
    verdict = j.run(5.0, lying, {N1: allowed * 1.4})
    assert verdict.flagged == {N1}
    assert j.state.evidence[N1].source == "node meter"


def test_the_rack_meter_names_the_silent_node_never_its_honest_neighbour(
    tree: PowerTree,
) -> None:
    """Agent of n1 killed with its GPUs at 500 W; n2 honest at its 200 W lease. The rack's
    PDU minus n2 (counted at the most it may draw) is n1's least: over its leases."""
    j = Judge(tree)
    lease(j, N1, 200.0)
    lease(j, N2, 200.0)
    gpus = j.gpus(rack_1_n2=200)
    gpus[slice(*tree.gpu_range(N1))] = math.nan
    rack_w = (4 * 500 + BASE_W) + (4 * 200 + BASE_W)
    verdict = j.run(5.0, gpus, {"rack-1": rack_w * 1.03})
    assert verdict.flagged == {N1}
    assert j.state.evidence[N1].source == "rack-1 meter minus the other servers under it"
    assert not j.state.evidence[N2].over
    # Both silent: the excess cannot be pinned on either, so neither is named.
    j2 = Judge(tree)
    both = j2.gpus()
    both[slice(tree.gpu_range(N1)[0], tree.gpu_range(N2)[1])] = math.nan
    verdict = j2.run(5.0, both, {"rack-1": rack_w * 1.03})
    assert verdict.flagged == frozenset()
    assert math.isnan(j2.state.evidence[N1].seen_w)


def test_a_live_agent_that_under_reports_convicts_no_neighbour(tree: PowerTree) -> None:
    """n1 lies (reports 150 W a GPU, draws 500); the rack shows the excess. With two live
    agents it cannot be pinned on one: nobody is named (the policy counts the excess as
    unexplained, uncappable load instead), and above all not the honest n2."""
    j = Judge(tree)
    lease(j, N1, 200.0)
    lease(j, N2, 200.0)
    rack_w = (4 * 500 + BASE_W) + (4 * 200 + BASE_W)
    verdict = j.run(10.0, j.gpus(rack_1_n1=150, rack_1_n2=200), {"rack-1": rack_w})
    assert verdict.flagged == frozenset()


def test_the_policy_plans_an_uncappable_server_at_its_maximum_and_caps_its_neighbour(
    tree: PowerTree,
) -> None:
    """Same readings with and without ``uncappable``: with it, the rogue's GPUs get their
    maximum (no cap of theirs is counted on) and the neighbour's caps fit what is left."""
    gpu_w = np.full(len(tree.gpus), 100.0)
    r1, r2 = tree.gpu_range(N1), tree.gpu_range(N2)
    gpu_w[r1[0] : r1[1]] = 500.0
    gpu_w[r2[0] : r2[1]] = 480.0
    limit = np.full(len(tree.gpus), 500.0)

    def run(uncappable: frozenset[str]) -> np.ndarray:
        state = None
        for k in range(8):
            snap = Snapshot.build(
                tree,
                float(k) * 0.5,
                gpu_power_w=gpu_w,
                gpu_limit_w=limit,
                node_power_w={"rack-1": 4 * 500 + 4 * 480 + 2 * BASE_W, "rack-2": 1200.0},
                uncappable=uncappable,
            )
            _, state = decide(snap, tree, state)
        assert state is not None
        return np.asarray(state.target_w)

    plain = run(frozenset())
    rogue = run(frozenset({N1}))
    assert (rogue[r1[0] : r1[1]] == 500.0).all()
    assert rogue[r2[0] : r2[1]].sum() < plain[r2[0] : r2[1]].sum()
    # Rack-1's budget: 3,000 W at the band's target, minus two baselines and the rogue at
    # its maximum: what is left for the neighbour, never below its floor.
    assert rogue[r2[0] : r2[1]].sum() <= max(3000.0 - 2 * BASE_W - 2000.0, 4 * 100.0) + 1


def test_an_agent_back_from_silence_is_not_judged_until_its_lease_lands(tree: PowerTree) -> None:
    """After a broker outage the agent sits at its own failsafe cap (300 W here, above the
    200 W we lease): while quiet it is not judged, and quiet never clears a case either."""
    j = Judge(tree)
    lease(j, N1, 200.0)
    j.run(5.0, j.gpus(rack_1_n1=200))
    for _ in range(round(LIMITS.lag_s / 0.5)):
        verdict = j.cycle(j.gpus(rack_1_n1=300), quiet=frozenset({N1}))
    assert verdict.flagged == frozenset() and N1 not in j.state.over_since_s
    # Still above once the grace is over: a case is built and the node flagged.
    verdict = j.run(LIMITS.raise_s + 0.5, j.gpus(rack_1_n1=300))
    assert verdict.flagged == {N1}
    # A restart while flagged (quiet again) clears nothing.
    for _ in range(3 * round(LIMITS.clear_s / 0.5)):
        verdict = j.cycle(j.gpus(rack_1_n1=195), quiet=frozenset({N1}))
    assert verdict.flagged == {N1}


def _report(node: str, agent: str, w: float) -> Telemetry:
    return Telemetry(
        agent_id=agent,
        node_id=node,
        ts=0.0,
        failsafe=False,
        power_w=[w] * 4,
        power_avg_w=[w] * 4,
        limit_w=[500.0] * 4,
        min_w=[100.0] * 4,
        max_w=[500.0] * 4,
        q=[Quality.GOOD] * 4,
    )


@pytest.mark.parametrize("mode", ["enforce", "advisory"])
def test_the_daemon_drains_a_flagged_node_once_and_only_when_enforcing(mode: str) -> None:
    """Through Controller.run_cycle, no link: the agents' reports are fed in directly.
    Every GPU wants 480 W; rack-1-n1 draws it whatever it is leased, the others obey their
    lease. Enforcing, it is flagged and drained once (not every cycle) with the reason.
    Advisory leases every GPU its default: nothing is capped, so nobody can disobey,
    nobody is flagged and nothing is asked of the scheduler."""
    site = site_with_agents(rack_envelope_w=3000.0)
    ctl = Controller(site, controller_id="ctl", mode=mode)  # type: ignore[arg-type]
    ctl._startup_grace_s = 0.0
    drains: list[tuple[str, str]] = []
    ctl.can_drain = True  # a scheduler is configured; drains come out in the result
    t0 = 1000.0
    leased = np.full(len(ctl.tree.gpus), 500.0)
    for k in range(30):
        now = t0 + 0.5 * k
        rack_w = {"rack-1": 0.0, "rack-2": 0.0}
        for info in ctl.agents.values():
            w = 480.0 if info.node_id == N1 else min(480.0, float(leased[info.first]))
            ctl.accept_telemetry(_report(info.node_id, info.agent_id, w), received_s=now)
            rack_w[info.node_id[:6]] += 4 * w + BASE_W
        ctl.accept_readings(
            [Reading(f"pdu-{r[-1]}", "power_w", w, "W", now, now) for r, w in rack_w.items()]
            + [Reading("sst-meter", "input_power_w", sum(rack_w.values()), "W", now, now)]
        )
        drains.extend((d.node_id, d.reason) for d in ctl.run_cycle(now).drains)
        assert ctl._leased_w is not None
        leased = np.array(ctl._leased_w)
    events = [e for e in ctl.audit.recent(limit=500) if e.kind == "node_uncappable"]
    if mode == "advisory":
        assert events == [] and drains == [] and ctl._conformance.flagged == frozenset()
        return
    assert [e.node for e in events] == [N1]
    assert len(drains) == 1 and drains[0][0] == N1
    assert drains[0][1].startswith(f"{N1}: agent report reads")
    assert "drain requested through the scheduler" in events[0].reason
    assert f"node_uncappable:{N1}" in ctl._alarms
    assert [a for a in ctl._alarms if a.startswith("node_uncappable:")] == [f"node_uncappable:{N1}"]
