"""The node-ignoring-caps test end to end: `rackpower run` as a process, real Mosquitto
(the agent link and the BMS topics), the simulated site on real Modbus and SNMP.

The harness (tests/e2e/harness.py) runs the plant and the real node agents in this event
loop on the simulator's fake NVML (no GPU here). A tenant with root on one server is the
fake's ``ignore_set_limit``: every set the agent makes is acknowledged and ignored, the
GPUs stay at the maximum the tenant set. Outcomes are read where they happen: the rack's
power from the plant, the alarm from the broker, the audit trail from its file.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.model.loader import load_site
from tests.e2e.harness import (
    GPU_MAX_W,
    RACKS,
    ControllerProcess,
    Plant,
    Ports,
    bms_client,
    controller_leasing,
    eventually,
    held,
    running_plant,
    site_dict,
    write_site,
)
from tests.fixtures.mosquitto import Mosquitto

pytest_plugins = ["tests.fixtures.mosquitto"]

RACK = RACKS[0]


@pytest.fixture
async def system(
    tmp_path: Path, mosquitto: Mosquitto
) -> AsyncIterator[tuple[Plant, ControllerProcess]]:
    ports = Ports.pick()
    site = site_dict(ports, mosquitto.url, keys_dir=tmp_path / "agent-keys")
    site_path = write_site(tmp_path / "site.yaml", site)
    async with (
        running_plant(load_site(site_path), mosquitto.url) as plant,
        controller_leasing(plant, site_path, ports.api, tmp_path) as ctl,
    ):
        yield plant, ctl


async def test_node_ignoring_caps_rack_stays_inside_its_envelope_and_alarm_names_node(
    system: tuple[Plant, ControllerProcess], mosquitto: Mosquitto
) -> None:
    plant, ctl = system
    envelope_w = plant.tree.node(RACK).envelope_w
    rogue, neighbour = plant.servers(RACK)
    async with bms_client(mosquitto.host, mosquitto.port, "alarms/#") as bms:
        plant.sim.load_step(1.8)  # 90 % of TDP on every GPU: both racks must be capped

        def inside() -> bool:
            return plant.power_w(RACK) <= envelope_w

        await held(inside, f"{RACK} capped inside its envelope", samples=8)
        assert bms.on(f"alarms/node_uncappable:{rogue}") == []  # capping convicted nobody

        plant.sim.fake_nvml(rogue).ignore_set_limit(raise_to_w=GPU_MAX_W)
        await eventually(lambda: not inside(), f"the rogue {rogue} to push {RACK} over")

        def named() -> bool:
            return any(p for p in bms.on(f"alarms/node_uncappable:{rogue}"))

        await eventually(named, f"a node_uncappable alarm naming {rogue}")
        await held(inside, f"{RACK} back inside with {rogue} ignoring its caps", samples=12)
        assert plant.enforced_w(rogue) == [GPU_MAX_W] * 8  # it never obeyed
        assert max(plant.enforced_w(neighbour)) < 0.6 * GPU_MAX_W  # the neighbour paid
        assert not plant.sim.state.trips
        alarm = json.loads(next(p for p in bms.on(f"alarms/node_uncappable:{rogue}") if p))
        assert alarm["node"] == rogue and alarm["severity"] == "critical"
        assert f"cannot cap node {rogue} out of band" in alarm["message"]
        assert alarm["details"]["source"] == "agent report"
        # Nobody else was named.
        named_topics = {t for t, _, _ in bms.messages if "/alarms/node_uncappable:" in t}
        assert named_topics == {f"rackpower/e2e/alarms/node_uncappable:{rogue}"}
    events = [e for e in ctl.audit() if e["kind"] == "node_uncappable"]
    assert [e["node"] for e in events] == [rogue]
    assert "no scheduler configured: cannot drain it" in events[0]["reason"]
