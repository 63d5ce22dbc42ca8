"""A node that ignores its caps, on the simulator, through the controller's real cycle.

The plant (sim.runtime.SimRuntime, stepped by the test) draws the power; each GPU server
has the real node agent on the real NVML driver over the in-process agent link, and the
driver's backend is the simulator's fake NVML (no GPU here: sim/fake_nvml.py is the only
fake, it stands in for libnvidia-ml). The rack meters are read back from the plant as the
PDUs serve them. A tenant with root is the fake's ``ignore_set_limit``; a killed agent is
an agent task cancelled while its GPUs sit at their maximum.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.transport import InProcessLink
from controller.core.controller import Controller
from controller.integrations.scheduler.attach import SchedulerIntegration, attach_scheduler
from controller.integrations.scheduler.simulated import SimulatedScheduler
from controller.model.config import SchedulerConfig
from controller.model.loader import parse_site
from drivers.nvml import NvmlDriver
from drivers.reading import Reading
from sim.runtime import SimRuntime
from sim.workloads import TrainingJobSpec, TrainingProfile
from tests.sites import agent_config_dict, tiny_site, with_rack_agents

RACK_ENVELOPE_W = 3000.0
GPU_MAX_W = 500.0
ROGUE = "rack-1-n1"
NEIGHBOUR = "rack-1-n2"
CYCLE_S = 0.5
# Cycles given to detection (lag, raise_s) and to the neighbour's caps landing; the rack
# may read above its envelope meanwhile (it is rated 8 kW: over the envelope, no trip).
SETTLE_CYCLES = 16


def rogue_site() -> Any:
    cfg = tiny_site()
    rack = cfg["rows"][0]["racks"][0]
    rack["envelope_w"] = RACK_ENVELOPE_W
    with_rack_agents(cfg)
    cfg["policy"] = {"cycle_s": CYCLE_S, "lease_s": 5.0}
    return parse_site(cfg)


def flat_out(per_node_gpus: int, nodes: int) -> list[TrainingJobSpec]:
    """One job per GPU server at its full TDP, no swing: only the rogue changes anything."""
    profile = TrainingProfile(
        compute_frac=1.0,
        comm_frac=1.0,
        period_s=1.0,
        checkpoint_every_s=1e9,
        startup_s=0.1,
        startup_frac=1.0,
    )
    return [
        TrainingJobSpec(f"job-{k}", per_node_gpus, work_s=1e9, profile=profile)
        for k in range(nodes)
    ]


@dataclass
class Rig:
    sim: SimRuntime
    controller: Controller
    hub: InProcessLink
    agents: dict[str, NodeAgent]
    tasks: dict[str, asyncio.Task[None]]
    raised: dict[str, Any]
    rack_w: list[float]
    scheduler: SimulatedScheduler
    link: SchedulerIntegration

    def rack_power_w(self, rack: str = "rack-1") -> float:
        """What the rack's PDU serves now (the plant's input power at the rack)."""
        value = self.sim.value(f"pdu-{rack[-1]}", "power_w")
        assert value is not None
        return value

    async def cycles(self, n: int) -> None:
        for _ in range(n):
            self.sim.step(round(CYCLE_S / self.sim.step_s))
            now = time.monotonic()
            wall = time.time()
            readings = [
                Reading(
                    "sst-meter",
                    "input_power_w",
                    self.sim.value("sst-meter", "input_power_w") or 0.0,
                    "W",
                    now,
                    wall,
                ),
                *(
                    Reading(f"pdu-{k}", "power_w", self.rack_power_w(f"rack-{k}"), "W", now, wall)
                    for k in (1, 2)
                ),
            ]
            self.controller.accept_readings(readings)
            result = self.controller.run_cycle(now)
            self.link.publish(result)  # what the service does with each cycle's result
            self.raised.update({a.alarm_id: a for a in (*result.alarms, *result.notices)})
            for aid in result.cleared:
                self.raised.pop(aid, None)
            self.rack_w.append(self.rack_power_w())
            # Leases reach the agents and telemetry comes back; the controller's clock is
            # real time, so the cycle keeps its real period (the plant steps as much).
            await asyncio.sleep(max(0.12, now + CYCLE_S - time.monotonic()))
            await self.link.link.drain_queue()  # what the link's own task does in the daemon

    def uncappable(self) -> list[str]:
        return sorted(k for k in self.raised if k.startswith("node_uncappable:"))

    def kill_agent(self, node: str) -> None:
        self.tasks.pop(node).cancel()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    site = rogue_site()
    sim = SimRuntime(site, seed=1, step_s=0.1, workloads=flat_out(4, 4))
    hub = InProcessLink()
    controller = Controller(site, link=hub.controller(), controller_id="ctl")
    controller._startup_grace_s = 0.0
    raised: dict[str, Any] = {}
    agents: dict[str, NodeAgent] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    for info in controller.agents.values():
        driver = NvmlDriver(info.node_id, backend=sim.fake_nvml(info.node_id))
        await driver.start()
        cfg = parse_agent_config(agent_config_dict(info.agent_id, info.node_id), "test.yaml")
        agent = NodeAgent(cfg, driver, hub.agent(info.agent_id))
        agents[info.node_id] = agent
        tasks[info.node_id] = asyncio.create_task(agent.run())

    async def read_telemetry() -> None:
        async for t in hub.controller().telemetry():
            controller.accept_telemetry(t)

    reader = asyncio.create_task(read_telemetry())
    scheduler = SimulatedScheduler(sim.scheduler, clock=lambda: sim.t_s)
    link = attach_scheduler(controller, scheduler, SchedulerConfig(kind="sim"))
    assert await link.link.refresh()
    sim.step(5)  # jobs placed and ramped
    yield Rig(sim, controller, hub, agents, tasks, raised, [], scheduler, link)
    for a in agents.values():
        a.stop()
    for t in [*tasks.values(), reader]:
        t.cancel()
    await asyncio.gather(*tasks.values(), reader, return_exceptions=True)


async def test_node_ignoring_caps_rack_stays_inside_its_envelope_and_alarm_names_node(
    rig: Rig,
) -> None:
    """The tenant of rack-1-n1 raises every GPU to its maximum by hand and keeps it there.
    Within a few cycles the controller names the node in an alarm, stops counting on its
    caps and caps its neighbour instead: the rack's PDU reads inside the envelope."""
    await rig.cycles(12)
    assert max(rig.rack_w[-4:]) <= RACK_ENVELOPE_W  # honest nodes: capped inside
    # Every GPU started uncapped and was capped hard: that lag convicted nobody.
    assert rig.uncappable() == []
    before_w = rig.rack_w[-1]
    rig.sim.fake_nvml(ROGUE).ignore_set_limit(raise_to_w=GPU_MAX_W)
    rig.rack_w.clear()
    flagged_after = None
    for k in range(SETTLE_CYCLES):
        await rig.cycles(1)
        if flagged_after is None and ROGUE in rig.controller._conformance.flagged:
            flagged_after = k + 1
    print(
        f"figures: rack-1 {before_w:.0f} W before, {max(rig.rack_w):.0f} W peak with the rogue,"
        f" {rig.rack_w[-1]:.0f} W settled (envelope {RACK_ENVELOPE_W:.0f} W);"
        f" flagged after {flagged_after} cycles of {CYCLE_S} s"
    )
    nvml = rig.sim.fake_nvml(ROGUE)
    assert [nvml.enforced_limit_w(i) for i in range(4)] == [GPU_MAX_W] * 4  # still rogue
    assert nvml.ignored_sets > 0  # leases kept coming and were ignored
    settled = rig.rack_w[-6:]
    assert max(settled) <= RACK_ENVELOPE_W, rig.rack_w
    alarm = rig.raised.get(f"node_uncappable:{ROGUE}")
    assert alarm is not None, sorted(rig.raised)
    assert alarm.node == ROGUE and ROGUE in alarm.message
    assert f"cannot cap node {ROGUE} out of band" in alarm.message
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]  # no honest node named
    neighbour = rig.sim.fake_nvml(NEIGHBOUR)
    assert max(neighbour.enforced_limit_w(i) for i in range(4)) < GPU_MAX_W / 2
    # Drained through the scheduler, audited with the reason and the missing BMC.
    assert ROGUE in rig.scheduler.drains
    assert rig.scheduler.drains[ROGUE].startswith(f"rackpower: {ROGUE}: agent report reads")
    events = rig.controller.audit.recent(limit=200)
    flagged = [e for e in events if e.kind == "node_uncappable"]
    assert len(flagged) == 1 and flagged[0].node == ROGUE
    assert "drain requested through the scheduler" in flagged[0].reason
    assert f"cannot cap node {ROGUE} out of band" in flagged[0].reason
    assert any(e.kind == "scheduler:drained" and e.node == ROGUE for e in events)


async def test_rogue_node_that_obeys_again_is_cleared_after_a_while(rig: Rig) -> None:
    """While flagged, the node is still leased the caps it ignored (not the maximum it is
    planned at); once it obeys them for clear_s the alarm clears and its caps count again."""
    rig.controller._conformance_limits = dataclasses.replace(
        rig.controller._conformance_limits, clear_s=3.0
    )
    await rig.cycles(8)
    nvml = rig.sim.fake_nvml(ROGUE)
    nvml.ignore_set_limit(raise_to_w=GPU_MAX_W)
    await rig.cycles(8)
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]
    leased = rig.controller._conformance.probe_w[ROGUE]
    assert max(leased) < GPU_MAX_W  # what it is told, not what it is planned at
    nvml.ignore_set_limit(ignore=False)  # the tenant stops; the next lease lands
    await rig.cycles(4)
    assert max(nvml.enforced_limit_w(i) for i in range(4)) < GPU_MAX_W
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]  # not yet: hysteresis
    await rig.cycles(8)
    assert rig.uncappable() == []
    kinds = [e.kind for e in rig.controller.audit.recent(limit=300)]
    assert "node_conforms" in kinds and "alarm_cleared" in kinds
    assert max(rig.rack_w[-4:]) <= RACK_ENVELOPE_W
    # A SIGHUP while flagged keeps the flag (no clear, no second drain request).
    await rig.cycles(1)
    nvml.ignore_set_limit(raise_to_w=GPU_MAX_W)
    await rig.cycles(8)
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]
    rig.controller.reload(rogue_site())
    await rig.cycles(2)
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]
    assert ROGUE in rig.controller._conformance.flagged


async def test_agent_killed_with_gpus_at_maximum_rack_stays_inside_and_alarm_names_node(
    rig: Rig,
) -> None:
    """kill -9 of the agent, GPUs left at their maximum: no telemetry, no lease lands.
    The rack's PDU minus the neighbour's report pins the excess on the silent node: it is
    named and planned at its maximum, the neighbour capped, the rack back inside."""
    await rig.cycles(8)
    rig.kill_agent(ROGUE)
    rig.sim.fake_nvml(ROGUE).ignore_set_limit(raise_to_w=GPU_MAX_W)  # left at maximum
    rig.rack_w.clear()
    await rig.cycles(SETTLE_CYCLES)
    assert max(rig.rack_w[-6:]) <= RACK_ENVELOPE_W, rig.rack_w
    assert f"agent_lost:agent-{ROGUE}" in rig.raised
    alarm = rig.raised.get(f"node_uncappable:{ROGUE}")
    assert alarm is not None, sorted(rig.raised)
    assert alarm.node == ROGUE and "rack-1 meter minus the other servers" in alarm.details["source"]
    assert rig.uncappable() == [f"node_uncappable:{ROGUE}"]
