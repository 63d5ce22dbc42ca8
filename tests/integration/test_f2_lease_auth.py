"""F2 regressions: a foreign client on the broker cannot cap, uncap or mislead.

Real Mosquitto on loopback, the real MqttControllerLink / MqttAgentLink / NodeAgent /
NvmlDriver; sim.fake_nvml.FakeNvml stands in for libnvidia-ml (there is no GPU here),
and every cap is read back as the limit the fake ENFORCES. The attacker is a plain
anonymous aiomqtt client that has read everything on the broker: the controller id, the
agent id and the current seq are in clear in every lease.

The rig is signed as `rackpower demo --mqtt` and a site with ``agent_auth`` are: one
secret per agent in ``<keys_dir>/<agent_id>.key`` on the controller and the same file as
the agent's ``auth.key_file``. Each test was seen failing on c203a14 (the same
assertions, the rig without keys since that code had none).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.lease import LeaseSequence, Telemetry
from controller.agentlink.msgauth import KeyFile, KeyStore, new_key_line, write_key_file
from controller.agentlink.transport import AgentTopics, MqttAgentLink, MqttControllerLink
from controller.model.config import MqttConfig
from controller.support.mqtt import Backoff
from drivers.nvml import NvmlDriver
from drivers.reading import Quality
from sim.fake_nvml import FakeNvml
from tests.fixtures.mosquitto import Mosquitto
from tests.helpers.waiting import eventually

pytest_plugins = ["tests.fixtures.mosquitto"]

SITE = "tiny"
AGENT = "agent-r1-n1"
NODE = "r1-n1"
CTL = "ctl-a"
FAILSAFE_W = 400.0
GENUINE_W = 450.0
TOPICS = AgentTopics.for_site("rackpower", SITE)
WAIT_S = 15.0


def backoff() -> Backoff:
    return Backoff(initial_s=0.05, max_s=0.5)


class Rig:
    """Controller link + one agent (2 GPUs, NVML 200-700 W) on one broker."""

    def __init__(self, broker: Mosquitto, tmp_path: Path) -> None:
        self.fake = FakeNvml.for_node(NODE, 2, min_w=200, max_w=700, power_w=333)
        mqtt = MqttConfig(url=broker.url)
        keys_dir = tmp_path / "keys"
        keys_dir.mkdir(mode=0o700)
        self.key_file = keys_dir / f"{AGENT}.key"
        write_key_file(self.key_file, new_key_line("k1"))
        self.ctl = MqttControllerLink(mqtt, SITE, backoff=backoff(), keys=KeyStore(keys_dir))
        self.link = MqttAgentLink(
            mqtt, SITE, AGENT, backoff=backoff(), keepalive_s=5, keys=KeyFile(self.key_file)
        )
        self.cfg = parse_agent_config(
            {
                "site": SITE,
                "agent_id": AGENT,
                "node_id": NODE,
                "controller_id": CTL,
                "failsafe_w": FAILSAFE_W,
                "telemetry_hz": 10,
                "auth": {"key_file": str(self.key_file)},
                "mqtt": {"url": broker.url},
            },
            "test",
        )
        self.seqs = LeaseSequence()
        self.agent: NodeAgent | None = None

    def enforced(self) -> list[float]:
        return [self.fake.enforced_limit_w(i) for i in range(2)]

    def send(self, cap_w: float) -> int:
        from controller.agentlink.lease import Lease

        seq = self.seqs.next()
        self.ctl.send_lease(AGENT, Lease.issue(CTL, seq, {0: cap_w, 1: cap_w}, 30, agent_id=AGENT))
        return seq


@asynccontextmanager
async def rig(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(broker, tmp_path)
    async with NvmlDriver(NODE, r.fake) as driver:
        r.agent = NodeAgent(r.cfg, driver, r.link)
        tasks = [asyncio.create_task(x.run()) for x in (r.ctl, r.link, r.agent)]
        try:
            await eventually(lambda: r.ctl.agents_online().get(AGENT) is True, "agent online")
            yield r
        finally:
            r.agent.stop()
            for link in (r.link, r.ctl):
                await link.stop(timeout_s=5.0)
            for t in tasks:
                with suppress(asyncio.CancelledError):
                    await asyncio.wait_for(t, 10)


def forged_lease(seq: int, cap_w: float = 700.0) -> bytes:
    """What an anonymous client writes after reading one genuine lease off the broker."""
    doc: dict[str, Any] = {
        "v": 1,
        "controller_id": CTL,
        "seq": seq,
        "issued_at": time.time(),
        "lease_s": 3600,
        "caps_w": {"0": cap_w, "1": cap_w},
        "agent_id": AGENT,
    }
    return json.dumps(doc).encode()


async def attacker_publish(broker: Mosquitto, topic: str, payload: bytes, retain: bool) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as raw:
        await raw.publish(topic, payload, qos=1, retain=retain)


async def genuine_renewal_wins(r: Rig) -> None:
    """After a forgery, the controller renews with a *lower* seq than the forgery's: only an
    agent that refused the forgery applies it. Waits until either outcome shows."""
    assert r.agent is not None
    agent = r.agent
    seq = r.send(GENUINE_W + 10)
    await eventually(
        lambda: agent.state.seq == seq or 700.0 in r.enforced(), "renewal or forgery applied"
    )
    await asyncio.sleep(0.3)  # let anything else queued land
    assert r.enforced() == [GENUINE_W + 10] * 2
    assert agent.state.seq == seq


@pytest.mark.parametrize("retain", [False, True], ids=["live", "retained"])
async def test_f2_forged_lease_with_copied_controller_id_changes_no_gpu_limit(
    mosquitto: Mosquitto, tmp_path: Path, retain: bool
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        seq = r.send(GENUINE_W)
        await eventually(lambda: r.enforced() == [GENUINE_W] * 2, "genuine lease enforced")
        # Copied controller id, a higher seq, every GPU at its maximum; retained or not,
        # an established subscription gets it with retain=0.
        await attacker_publish(mosquitto, TOPICS.lease(AGENT), forged_lease(seq + 10_000), retain)
        await asyncio.sleep(0.5)
        assert r.enforced() == [GENUINE_W] * 2
        await genuine_renewal_wins(r)
        assert r.agent is not None and r.link.stats().auth_refused == 1
        async with asyncio.timeout(WAIT_S):  # reports queued before the refusal come first
            async for t in r.ctl.telemetry():
                if t.seq == r.agent.state.seq:
                    break
        assert t.auth_refused == 1 and t.refused is None  # counted, not a lease refusal


async def test_f2_seq_2_63_from_the_broker_does_not_lock_the_agent_out(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        r.send(GENUINE_W)
        await eventually(lambda: r.enforced() == [GENUINE_W] * 2, "genuine lease enforced")
        await attacker_publish(mosquitto, TOPICS.lease(AGENT), forged_lease(2**63), False)
        await asyncio.sleep(0.5)
        await genuine_renewal_wins(r)


def forged_telemetry(power_w: float) -> bytes:
    t = Telemetry(
        agent_id=AGENT,
        node_id=NODE,
        ts=12345.0,  # marker
        failsafe=False,
        power_w=[power_w, power_w],
        power_avg_w=[power_w, power_w],
        limit_w=[GENUINE_W, GENUINE_W],
        min_w=[200.0, 200.0],
        max_w=[700.0, 700.0],
        q=[Quality.GOOD, Quality.GOOD],
    )
    return t.encode()


async def test_f2_forged_telemetry_is_refused_and_counted(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        await asyncio.wait_for(anext(r.ctl.telemetry()), WAIT_S)  # genuine reports flow
        await attacker_publish(mosquitto, TOPICS.telemetry(AGENT), forged_telemetry(10.0), False)
        seen: list[Telemetry] = []
        deadline = time.monotonic() + 1.5
        async with asyncio.timeout(WAIT_S):
            async for t in r.ctl.telemetry():
                seen.append(t)
                if t.ts == 12345.0 or time.monotonic() > deadline:
                    break
        assert all(t.ts != 12345.0 for t in seen), "forged telemetry reached the controller"
        assert all(t.power_w == [333.0, 333.0] for t in seen)
        assert r.ctl.stats().auth_refused >= 1
        assert r.ctl.stats().telemetry_received == len(seen) + 1


async def test_f2_replayed_genuine_lease_retained_is_not_applied(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A genuine signed lease copied off the broker and published again, retained: the
    live subscription gets it with retain=0 and it is not newer; an agent that connects
    later gets it with retain=1 and ignores it (it could be any age)."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as spy:
        await spy.subscribe(TOPICS.lease(AGENT), qos=1)
        async with rig(mosquitto, tmp_path) as r:
            r.send(650.0)
            async with asyncio.timeout(WAIT_S):
                captured = b""
                async for m in spy.messages:
                    assert isinstance(m.payload, bytes)
                    captured = m.payload
                    break
            assert b'"sig"' in captured and b"650" in captured  # sealed on the wire
            await eventually(lambda: r.enforced() == [650.0] * 2, "genuine lease enforced")
            r.send(GENUINE_W)
            await eventually(lambda: r.enforced() == [GENUINE_W] * 2, "newer lease enforced")
            await attacker_publish(mosquitto, TOPICS.lease(AGENT), captured, retain=True)
            await asyncio.sleep(0.5)
            assert r.enforced() == [GENUINE_W] * 2
    # A fresh agent (no seq remembered) on the same broker: the retained copy is ignored.
    (tmp_path / "again").mkdir()
    async with rig(mosquitto, tmp_path / "again") as r2:
        await eventually(lambda: r2.link.stats().retained_leases_ignored == 1, "retained seen")
        assert r2.enforced() == [FAILSAFE_W] * 2
