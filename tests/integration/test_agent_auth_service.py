"""The controller service with a node agent it holds no key for, over a real Mosquitto.

The whole `rackpower run` service in-process (run_service: control cycle, MQTT agent link
signed from ``integrations.agent_auth.keys_dir``, HTTP API on a free loopback port) and
four real node agents (MqttAgentLink, NodeAgent, NvmlDriver), each with its own key. One
of them, B, has no file in the controller's keys directory (a node reinstalled and not
re-keyed, or one the operator forgot). sim.fake_nvml.FakeNvml stands in for
libnvidia-ml (no GPU here); every limit is read back as what the fake ENFORCES.

What must hold for B: no lease is sent to it (it stays at its failsafe cap, and nothing
even reached it to refuse), its signed telemetry is refused and counted (the controller
cannot check it), it is reported lost (an alarm in the audit trail), each refusal is
logged once, not per message, and both counts are on ``/metrics``, read back over HTTP.
The keyed agents meanwhile are leased as usual (the positive control).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.msgauth import KeyFile, new_key_line, write_key_file
from controller.agentlink.transport import MqttAgentLink, MqttControllerLink
from controller.core.controller import Controller
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.service import ServiceOptions, run_service
from controller.support.mqtt import Backoff
from drivers.nvml import NvmlDriver
from sim.fake_nvml import FakeNvml
from tests.fixtures.mosquitto import Mosquitto
from tests.helpers.waiting import eventually
from tests.sites import agent_site

pytest_plugins = ["tests.fixtures.mosquitto"]

CTL = "ctl-auth"
NODES = ["rack-1-n1", "rack-1-n2", "rack-2-n1", "rack-2-n2"]
B = "agent-rack-1-n2"  # the agent without a key file at the controller
FAILSAFE_W = 300.0
MAX_W = 500.0
WAIT_S = 20.0


def metric(text: str, name: str) -> float:
    m = re.search(rf"(?m)^{name} (\S+)$", text)
    assert m is not None, f"{name} not on /metrics"
    return float(m.group(1))


def site_without_meters(broker: Mosquitto, keys_dir: Path) -> dict[str, Any]:
    """The tiny agent site with only its agents: no Modbus/SNMP meter to poll (nothing
    runs on their ports here), power estimated from the agents' telemetry."""
    site = agent_site(
        {"url": broker.url, "telemetry_period_s": 0.5}, agent_auth={"keys_dir": str(keys_dir)}
    )
    site["devices"] = [d for d in site["devices"] if d["driver"] == "agent"]
    site["feeds"][0].pop("meters", None)
    site["rows"][0]["racks"][0].pop("meters", None)
    site["policy"] = {"cycle_s": 0.2}
    site["integrations"]["api"] = {"host": "127.0.0.1", "port": 0}
    return site


async def test_agent_without_key_gets_no_lease_is_refused_counted_lost_and_on_metrics(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    keys_dir = tmp_path / "agent-keys"
    keys_dir.mkdir(mode=0o700)
    own = tmp_path / "own-keys"  # each agent's auth.key_file, as on its node
    own.mkdir(mode=0o700)
    site = parse_site(site_without_meters(mosquitto, keys_dir), "site.yaml")
    mqtt = MqttConfig(url=mosquitto.url)
    fakes: dict[str, FakeNvml] = {}
    agents: dict[str, NodeAgent] = {}
    links: dict[str, MqttAgentLink] = {}
    drivers: list[NvmlDriver] = []
    for node in NODES:
        agent_id = f"agent-{node}"
        key_file = own / f"{agent_id}.key"
        line = new_key_line("k1")
        write_key_file(key_file, line)
        if agent_id != B:
            write_key_file(keys_dir / f"{agent_id}.key", line)
        fakes[agent_id] = FakeNvml.for_node(node, 4, min_w=100, max_w=MAX_W, power_w=250)
        driver = NvmlDriver(node, fakes[agent_id])
        await driver.start()
        drivers.append(driver)
        cfg = parse_agent_config(
            {"site": site.name, "agent_id": agent_id, "node_id": node, "controller_id": CTL,
             "failsafe_w": FAILSAFE_W, "telemetry_hz": 10,
             "auth": {"key_file": str(key_file)}, "mqtt": {"url": mosquitto.url}},
            "test",
        )  # fmt: skip
        links[agent_id] = MqttAgentLink(
            mqtt, site.name, agent_id, keys=KeyFile(key_file), backoff=Backoff(0.05, 0.5)
        )
        agents[agent_id] = NodeAgent(cfg, driver, links[agent_id])

    def enforced(agent_id: str) -> list[float]:
        return [fakes[agent_id].enforced_limit_w(i) for i in range(4)]

    ready: dict[str, Any] = {}

    def on_ready(controller: Controller, url: str | None) -> None:
        ready["controller"], ready["url"] = controller, url

    audit_path = tmp_path / "audit.jsonl"
    stop = asyncio.Event()
    options = ServiceOptions(
        controller_id=CTL,
        api_port=0,
        install_signals=False,
        audit_path=audit_path,
        on_ready=on_ready,
        extra_tasks={f"agent:{a}": ag.run for a, ag in agents.items()}
        | {f"link:{a}": lk.run for a, lk in links.items()},
    )
    service = asyncio.create_task(run_service(site, options, stop))
    try:
        await eventually(lambda: "controller" in ready, "the service ready", WAIT_S)
        controller: Controller = ready["controller"]
        ctl = controller.link
        assert isinstance(ctl, MqttControllerLink) and ctl.keys is not None
        keyed = [a for a in agents if a != B]
        # Positive control: the keyed agents are leased (the default target is MAX_W).
        await eventually(
            lambda: all(enforced(a) == [MAX_W] * 4 for a in keyed), "keyed agents leased", WAIT_S
        )

        def audited_lost() -> list[dict[str, Any]]:
            if not audit_path.exists():
                return []
            events = [json.loads(line) for line in audit_path.read_text().splitlines()]
            return [
                e for e in events if e["kind"] == "alarm:agent_lost" and "silent" in e["reason"]
            ]

        await eventually(lambda: bool(audited_lost()), "B reported lost", WAIT_S)
        await eventually(lambda: ctl.stats().auth_refused >= 20, "B's reports refused", WAIT_S)
        async with httpx.AsyncClient(base_url=ready["url"], timeout=5) as http:
            first = (await http.get("/metrics")).text
            await asyncio.sleep(1.0)
            second = (await http.get("/metrics")).text
        stats = ctl.stats()

        # No lease went to B: it sits at its failsafe cap, and nothing even reached it.
        assert enforced(B) == [FAILSAFE_W] * 4
        b_state = agents[B].state
        assert b_state.failsafe and b_state.seq is None
        assert (links[B].stats().auth_refused, links[B].stats().bad_messages) == (0, 0)
        assert all(not agents[a].state.failsafe for a in keyed)
        # B's telemetry refused and counted; B (and only B) reported lost.
        assert stats.leases_no_key >= 5 and stats.auth_refused >= 20
        assert controller.lost_agents(time.monotonic()) == [B]
        lost = audited_lost()
        assert {e["reason"].split()[2] for e in lost} == {B}, lost  # "node agent <id> is ..."
        # Logged once each (at most one line a minute), not once per message.
        lines = [r.getMessage() for r in caplog.records]
        telemetry_lines = [m for m in lines if m.startswith("refused agent telemetry")]
        lease_lines = [m for m in lines if m.startswith("refused to send a lease")]
        assert len(telemetry_lines) == 1 and f"/{B}/telemetry" in telemetry_lines[0]
        assert len(lease_lines) == 1 and f"no usable key for {B}" in lease_lines[0]
        assert any("no usable agent key for 1 of 4 agents" in m and B in m for m in lines)
        # On /metrics, read back over HTTP: counters that keep counting.
        for text in (first, second):
            assert metric(text, "rackpower_agent_telemetry_refused_total") >= 1
            assert metric(text, "rackpower_agent_leases_unsent_no_key_total") >= 1
        refused = [metric(t, "rackpower_agent_telemetry_refused_total") for t in (first, second)]
        unsent = [metric(t, "rackpower_agent_leases_unsent_no_key_total") for t in (first, second)]
        assert refused[1] > refused[0] and unsent[1] > unsent[0]
        assert refused[1] <= stats.auth_refused and unsent[1] <= stats.leases_no_key
    finally:
        for ag in agents.values():
            ag.stop()
        stop.set()
        code = await asyncio.wait_for(service, 30)
        for d in drivers:
            with suppress(Exception):
                await d.close()
    assert code == 0
