"""The controller-agent link over a real Mosquitto on loopback.

The controller side is controller.agentlink.transport.MqttControllerLink; the agent is the real
NodeAgent on the real MqttAgentLink and NvmlDriver, with sim.fake_nvml.FakeNvml standing
in for libnvidia-ml (no GPU here). Caps are checked by the limit the fake ENFORCES;
messages on the wire by a plain MQTT subscriber. Covered: a lease sent by the controller
is enforced and telemetry comes back; the controller disconnects and the agent falls
back to its failsafe cap when the lease runs out (and says so on the wire); a retained
lease is never applied; the agent's retained status and its last will when it is killed;
reconnect after a broker restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt

from controller.agent.agent_config import AgentConfig, parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.lease import Lease, LeaseSequence, Telemetry
from controller.agentlink.transport import AgentTopics, MqttAgentLink, MqttControllerLink
from controller.model.config import MqttConfig
from controller.support.mqtt import Backoff
from drivers.nvml import NvmlDriver
from sim.fake_nvml import FakeNvml
from tests.fixtures.mosquitto import Mosquitto
from tests.helpers.mqtt import Recorder, recording
from tests.helpers.waiting import eventually

pytest_plugins = ["tests.fixtures.mosquitto"]

REPO = Path(__file__).resolve().parents[2]
SITE = "tiny"
AGENT = "agent-r1-n1"
NODE = "r1-n1"
CTL = "ctl-a"
FAILSAFE_W = 400.0
TOPICS = AgentTopics.for_site("rackpower", SITE)
WAIT_S = 15.0  # generous: only a broken link ever waits this long


def agent_config(broker: Mosquitto) -> AgentConfig:
    return parse_agent_config(
        {
            "site": SITE,
            "agent_id": AGENT,
            "node_id": NODE,
            "controller_id": CTL,
            "failsafe_w": FAILSAFE_W,
            "telemetry_hz": 10,
            "mqtt": {"url": broker.url},
        },
        "test",
    )


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.05, max_s=0.5)


def recorder(broker: Mosquitto, *topics: str) -> AbstractAsyncContextManager[Recorder]:
    """A plain (anonymous) client keeping everything it receives on ``topics``."""
    return recording(aiomqtt.Client(broker.host, broker.port), *topics)


@asynccontextmanager
async def running(*links: MqttAgentLink | MqttControllerLink) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(link.run()) for link in links]
    try:
        yield
    finally:
        for link in links:
            await link.stop(timeout_s=5.0)
        for task in tasks:
            if not task.done():
                task.cancel()
            with suppress(asyncio.CancelledError):
                await task


class NodeUnderTest:
    """Fake NVML + driver + agent + agent link, all running."""

    def __init__(self, broker: Mosquitto) -> None:
        self.fake = FakeNvml.for_node(NODE, 2, min_w=200, max_w=700, power_w=333)
        self.link = MqttAgentLink(
            MqttConfig(url=broker.url), SITE, AGENT, backoff=fast_backoff(), keepalive_s=5
        )
        self.cfg = agent_config(broker)

    def enforced(self) -> list[float]:
        return [self.fake.enforced_limit_w(i) for i in range(2)]


@asynccontextmanager
async def node(broker: Mosquitto) -> AsyncIterator[NodeUnderTest]:
    n = NodeUnderTest(broker)
    async with NvmlDriver(NODE, n.fake) as driver:
        agent = NodeAgent(n.cfg, driver, n.link)
        async with running(n.link):
            task = asyncio.create_task(agent.run())
            try:
                yield n
            finally:
                agent.stop()
                await task


def controller_link(broker: Mosquitto) -> MqttControllerLink:
    return MqttControllerLink(MqttConfig(url=broker.url), SITE, backoff=fast_backoff())


def lease(seq: int, cap_w: float, lease_s: float) -> Lease:
    return Lease.issue(CTL, seq, {0: cap_w, f"{NODE}-g1": cap_w}, lease_s, reason="test")


async def test_lease_over_mqtt_is_enforced_and_telemetry_reaches_the_controller(
    mosquitto: Mosquitto,
) -> None:
    ctl = controller_link(mosquitto)
    seqs = LeaseSequence()
    async with running(ctl), node(mosquitto) as n:
        # The agent says online only after subscribing to its lease topic.
        await eventually(lambda: ctl.agents_online().get(AGENT) is True, "agent online")
        await eventually(lambda: n.enforced() == [FAILSAFE_W] * 2, "failsafe at start")

        first = seqs.next()
        ctl.send_lease(AGENT, lease(first, 555, 30))
        await eventually(lambda: n.enforced() == [555.0, 555.0], "lease enforced")

        got: list[Telemetry] = []
        async with asyncio.timeout(WAIT_S):
            async for t in ctl.telemetry():
                got.append(t)
                if t.seq == first and t.limit_w == [555.0, 555.0]:
                    break
        t = got[-1]
        assert (t.agent_id, t.node_id, t.failsafe) == (AGENT, NODE, False)
        assert t.power_w == [333.0, 333.0] and t.min_w == [200.0, 200.0]
        assert got[0].failsafe  # the reports before the lease said failsafe

        # A renewal every "cycle" with the same caps: no NVML set calls.
        calls = n.fake.set_calls
        for _ in range(5):
            ctl.send_lease(AGENT, lease(seqs.next(), 555, 30))
            await asyncio.sleep(0.05)
        last = seqs._last
        async with asyncio.timeout(WAIT_S):
            async for t in ctl.telemetry():
                if t.seq == last:
                    break
        assert n.fake.set_calls == calls
        assert ctl.stats().leases_sent >= 6


async def test_controller_gone_agent_falls_back_to_failsafe_when_the_lease_expires(
    mosquitto: Mosquitto,
) -> None:
    ctl = controller_link(mosquitto)
    async with (
        recorder(mosquitto, TOPICS.telemetry(AGENT)) as rec,
        node(mosquitto) as n,
    ):
        task = asyncio.create_task(ctl.run())
        await eventually(lambda: ctl.agents_online().get(AGENT) is True, "agent online")
        ctl.send_lease(AGENT, lease(LeaseSequence().next(), 600, 1.5))
        await eventually(lambda: n.enforced() == [600.0, 600.0], "lease enforced")

        await ctl.stop()  # the controller disconnects: nobody renews the lease
        await task
        await eventually(lambda: n.enforced() == [FAILSAFE_W] * 2, "failsafe after expiry")

        def failsafe_on_the_wire() -> bool:
            for payload in rec.on(TOPICS.telemetry(AGENT)):
                doc = json.loads(payload)
                if doc["failsafe"] and "expired" in doc.get("failsafe_reason", ""):
                    return True
            return False

        await eventually(failsafe_on_the_wire, "failsafe: true in telemetry")


async def test_retained_lease_is_never_applied(mosquitto: Mosquitto) -> None:
    # Someone retained a lease on the agent's topic (this project never does).
    stale = lease(LeaseSequence().next(), 650, 3600)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as raw:
        await raw.publish(TOPICS.lease(AGENT), stale.encode(), qos=1, retain=True)

    ctl = controller_link(mosquitto)
    async with running(ctl), node(mosquitto) as n:
        await eventually(lambda: n.link.stats().retained_leases_ignored == 1, "retained seen")
        t = await asyncio.wait_for(anext(ctl.telemetry()), WAIT_S)
        assert t.failsafe and t.seq is None
        assert n.enforced() == [FAILSAFE_W] * 2


async def test_agent_reconnects_after_a_broker_restart(mosquitto: Mosquitto) -> None:
    ctl = controller_link(mosquitto)
    seqs = LeaseSequence()
    async with running(ctl), node(mosquitto) as n:
        await eventually(lambda: ctl.agents_online().get(AGENT) is True, "agent online")
        mosquitto.restart()  # retained status lost; both sides reconnect
        await eventually(lambda: n.link.stats().connects >= 2, "agent reconnected")
        await eventually(lambda: ctl.stats().connects >= 2, "controller reconnected")
        await eventually(lambda: ctl.agents_online().get(AGENT) is True, "online again")
        ctl.send_lease(AGENT, lease(seqs.next(), 520, 30))
        await eventually(lambda: n.enforced() == [520.0, 520.0], "lease after restart")


AGENT_SCRIPT = """
import asyncio, sys
from controller.agent.node_agent import NodeAgent
from controller.agent.agent_config import parse_agent_config
from controller.model.config import MqttConfig
from controller.agentlink.transport import MqttAgentLink
from drivers.nvml import NvmlDriver
from sim.fake_nvml import FakeNvml

async def main(url):
    cfg = parse_agent_config({"site": "tiny", "agent_id": "agent-r1-n1", "node_id": "r1-n1",
        "controller_id": "ctl-a", "failsafe_w": 400, "mqtt": {"url": url}})
    link = MqttAgentLink(MqttConfig(url=url), "tiny", "agent-r1-n1", keepalive_s=1)
    async with NvmlDriver("r1-n1", FakeNvml.for_node("r1-n1", 2, min_w=200, max_w=700)) as d:
        agent = NodeAgent(cfg, d, link)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run())
            tg.create_task(agent.run())

asyncio.run(main(sys.argv[1]))
"""


async def test_status_online_and_last_will_offline_when_the_agent_is_killed(
    mosquitto: Mosquitto,
) -> None:
    status = TOPICS.status(AGENT)
    async with recorder(mosquitto, status) as rec:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            AGENT_SCRIPT,
            mosquitto.url,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            await eventually(lambda: rec.on(status) == [b"online"], "online", timeout_s=30)
            proc.send_signal(signal.SIGKILL)  # no clean disconnect: the broker sends the will
            await asyncio.wait_for(proc.wait(), 10)
            await eventually(lambda: rec.on(status)[-1:] == [b"offline"], "last will")
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)

    # Retained: a controller that starts later still learns the agent is offline.
    ctl = controller_link(mosquitto)
    async with running(ctl):
        await eventually(lambda: ctl.agents_online().get(AGENT) is False, "retained offline")


async def test_clean_agent_stop_says_offline_and_leaves_the_failsafe_cap(
    mosquitto: Mosquitto,
) -> None:
    status = TOPICS.status(AGENT)
    ctl = controller_link(mosquitto)
    captured: dict[str, Any] = {}
    async with recorder(mosquitto, status) as rec, running(ctl):
        async with node(mosquitto) as n:
            await eventually(lambda: rec.on(status)[-1:] == [b"online"], "online")
            ctl.send_lease(AGENT, lease(LeaseSequence().next(), 680, 30))
            await eventually(lambda: n.enforced() == [680.0, 680.0], "lease enforced")
            captured["node"] = n
        await eventually(lambda: rec.on(status)[-1:] == [b"offline"], "offline on stop")
    assert captured["node"].enforced() == [FAILSAFE_W] * 2
