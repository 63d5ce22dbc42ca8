"""The daemon end to end: `rackpower run` as a process against the simulated site, real
Mosquitto (BMS topics and the agent link) and real VictoriaMetrics (the TSDB).

The harness (tests/e2e/harness.py) runs the simulator and the node agents in this event
loop; the agents' NVML is the simulator's fake (no GPU here), which enforces the limits
the agents set and feeds them back into the plant. Every assertion reads the outcome
where it happens: rack and feed power from the plant, GPU limits from the fake NVML,
acks and statuses from the broker, points from VictoriaMetrics' export API.

Each test starts its own site (plant, agents, controller process: about 2 s), so a
failure never leaks into the next. Timing is never asserted: conditions are polled with
generous deadlines, and "held" means true on several polls in a row.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.model.loader import load_site
from tests.e2e.harness import (
    CONTROLLER_ID,
    GPU_MAX_W,
    RACKS,
    SITE,
    ControllerProcess,
    Plant,
    Ports,
    bms_client,
    eventually,
    held,
    retained_status,
    running_plant,
    site_dict,
    wait_leasing,
    write_site,
)
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.victoriametrics import Series, VictoriaMetrics, samples
from tests.helpers.ports import free_port

pytest_plugins = ["tests.fixtures.mosquitto", "tests.fixtures.victoriametrics"]


@dataclass
class System:
    plant: Plant
    ctl: ControllerProcess
    broker: Mosquitto
    site_path: Path
    ports: Ports

    def envelope_w(self, node_id: str) -> float:
        return self.plant.tree.node(node_id).envelope_w


SystemFactory = Callable[..., Awaitable[System]]


@pytest.fixture
async def make_system(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[SystemFactory]:
    """Start the site (plant, agents, controller process) on demand; stop it all after."""
    stack: list[tuple[ControllerProcess, object]] = []

    async def make(influx: VictoriaMetrics | None = None, mode: str = "enforce") -> System:
        ports = Ports.pick()
        site_path = write_site(
            tmp_path / "site.yaml",
            site_dict(
                ports,
                mosquitto.url,
                influx.url if influx else None,
                keys_dir=tmp_path / "agent-keys",
            ),
        )
        plant_cm = running_plant(load_site(site_path), mosquitto.url)
        plant = await plant_cm.__aenter__()
        ctl = ControllerProcess(
            site_path,
            f"http://127.0.0.1:{ports.api}",
            tmp_path / "controller.log",
            tmp_path / "audit.jsonl",
            extra_args=("--mode", mode),
        )
        stack.append((ctl, plant_cm))
        ctl.start()
        await wait_leasing(plant, ctl)
        return System(plant, ctl, mosquitto, site_path, ports)

    yield make
    for ctl, plant_cm in reversed(stack):
        await ctl.close()
        # Shown by pytest only when the test failed: what the controller said.
        print(f"--- {ctl.log_path} (tail) ---\n{ctl.log_text()[-4000:]}")
        await plant_cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


FEED = "mv-1"


async def test_load_step_lands_on_caps_already_in_place(
    make_system: SystemFactory, mosquitto: Mosquitto
) -> None:
    """At the steady half load each (1.32x oversubscribed) rack already holds caps that
    sum to its budget, read at the fake NVML; a step to 90 % of TDP, which uncapped
    would take both racks far past their envelope, lands on them: the racks never go
    over, run close to their envelope (capped, not starved), and the BMS hears no alarm
    at all (nothing was wrong at any moment). The alarm path itself is tested in
    tests/integration/test_bms.py and tests/unit/test_daemon.py."""
    async with bms_client(mosquitto.host, mosquitto.port, "alarms/#") as bms:
        s = await make_system()
        plant = s.plant
        # The cap sum, not measurement, keeps the racks inside: caps even when quiet.
        await held(lambda: plant.at_cap_sum(s.envelope_w), "every rack's caps at its cap sum")
        assert bms.messages == []  # start-up raised nothing
        for rack in RACKS:
            assert plant.power_w(rack) < 0.9 * s.envelope_w(rack)

        plant.sim.load_step(1.8)  # half load -> 90 % of TDP on every GPU
        for rack in RACKS:
            # Uncapped, each rack would be far out (demand counted without losses).
            assert plant.uncapped_demand_w(rack) > 1.15 * s.envelope_w(rack)

        def inside() -> bool:
            return all(plant.power_w(r) <= s.envelope_w(r) for r in RACKS)

        worst = 0.0
        deadline = time.monotonic() + 6.0  # the step, and a dozen cycles after it
        while time.monotonic() < deadline:
            worst = max(worst, max(plant.power_w(r) / s.envelope_w(r) for r in RACKS))
            await asyncio.sleep(0.02)
        assert worst <= 1.0, f"a rack reached {worst:.3f}x its envelope after the step"
        await held(inside, "both racks inside their envelope after the step", samples=12)
        for rack in RACKS:
            limits = [w for n in plant.servers(rack) for w in plant.enforced_w(n)]
            assert max(limits) < 0.95 * GPU_MAX_W, f"{rack}: GPUs not capped: {limits}"
            # Capped, not starved: the rack still runs close to its envelope.
            assert plant.power_w(rack) > 0.85 * s.envelope_w(rack)
        assert not plant.sim.state.trips
        alarms = [t for t, _, _ in bms.messages if "/alarms/envelope_exceeded:" in t]
        assert alarms == [], "an envelope alarm although no rack was ever over"
    assert s.ctl.running()


async def test_demand_response_over_mqtt_lowers_the_site_and_is_acked(
    make_system: SystemFactory,
) -> None:
    """A BMS limits the feed below what the site draws: the ack says accepted with its
    expiry, the plant's feed power falls under the limit and stays there, through GPU
    caps. The same command_id again (with another limit) is acked as a duplicate and not
    applied."""
    s = await make_system()
    plant = s.plant
    limit_w = 13_000.0
    await eventually(lambda: plant.feed_power_w() > limit_w + 2_000, "the site's steady load")
    async with bms_client(s.broker.host, s.broker.port, "cmd/ack") as bms:
        await bms.command(
            {
                "type": "demand_response",
                "command_id": "dr-e2e-1",
                "node": FEED,
                "limit_w": limit_w,
                "ttl_s": 600,
            }
        )
        ack = await bms.ack_for("dr-e2e-1")
        assert ack["status"] == "accepted", ack
        assert ack["reason"] is None and ack["duplicate"] is False
        assert ack["type"] == "demand_response" and ack["expires_at"]

        await held(
            lambda: plant.feed_power_w() <= limit_w, "the feed under the DR limit", samples=12
        )
        limits = [w for n in plant.agents for w in plant.enforced_w(n)]
        assert max(limits) < 0.8 * GPU_MAX_W, limits  # the GPUs were capped to get there
        assert plant.feed_power_w() > 0.8 * limit_w  # lowered to the limit, not to the floor

        await bms.command(
            {
                "type": "demand_response",
                "command_id": "dr-e2e-1",
                "node": FEED,
                "limit_w": 20_000.0,
                "ttl_s": 600,
            }
        )
        await eventually(lambda: len(bms.on("cmd/ack")) >= 2, "the duplicate's ack")
        dup = json.loads(bms.on("cmd/ack")[-1])
        assert dup["command_id"] == "dr-e2e-1" and dup["duplicate"] is True
        assert dup["status"] == "accepted" and dup["expires_at"] == ack["expires_at"]
        await held(lambda: plant.feed_power_w() <= limit_w, "the first limit still in force")


INVALID_COMMANDS: list[tuple[str, dict[str, object] | bytes, str]] = [
    (
        "bad-rating",
        {
            "type": "demand_response",
            "command_id": "bad-rating",
            "node": FEED,
            "limit_w": 40_000,
            "ttl_s": 60,
        },
        "above the rating of mv-1",
    ),
    (
        "bad-expiry",
        {"type": "demand_response", "command_id": "bad-expiry", "node": FEED, "limit_w": 13_000},
        "an expiry is required",
    ),
    (
        "bad-node",
        {
            "type": "demand_response",
            "command_id": "bad-node",
            "node": "rack-9",
            "limit_w": 5_000,
            "ttl_s": 60,
        },
        "unknown node 'rack-9'",
    ),
    (
        "bad-floor",
        {
            "type": "demand_response",
            "command_id": "bad-floor",
            "node": FEED,
            "limit_w": 5_000,
            "ttl_s": 60,
        },
        "below what mv-1 can be brought down to",
    ),
    (
        "bad-type",
        {
            "type": "envelope_override",
            "command_id": "bad-type",
            "node": FEED,
            "envelope_w": "13000",
            "ttl_s": 60,
        },
        "envelope_w",
    ),
    ("None", b"{not json", "payload is not valid JSON"),
]


async def test_invalid_commands_are_rejected_with_the_reason_and_change_nothing(
    make_system: SystemFactory,
) -> None:
    """Each invalid command is acked ``rejected`` with the reason naming what is wrong; the
    ones that would have bitten (13 kW without expiry, 5 kW below the floor) are not
    applied: the GPUs keep their caps at the racks' cap sum and the feed envelope the
    BMS sees is the configured one."""
    s = await make_system()
    plant = s.plant
    await held(lambda: plant.at_cap_sum(s.envelope_w), "every rack's caps at its cap sum")
    before = {n: plant.enforced_w(n) for n in plant.agents}
    async with bms_client(s.broker.host, s.broker.port, "cmd/ack", f"telemetry/{FEED}") as bms:
        for _, payload, _ in INVALID_COMMANDS:
            await bms.command(payload)
        for command_id, _, reason in INVALID_COMMANDS:
            ack = await bms.ack_for(command_id)
            assert ack["status"] == "rejected", ack
            assert reason in ack["reason"], ack
            assert ack["expires_at"] is None
        # Nothing was applied: no cap appears over a lease's worth of cycles.
        await held(
            lambda: all(plant.enforced_w(n) == w for n, w in before.items()),
            "every GPU still at the limit it had",
            samples=12,
        )
        frames = [json.loads(p) for p in bms.on(f"telemetry/{FEED}")]
        assert frames and frames[-1]["envelope_w"] == s.envelope_w(FEED)
    assert plant.feed_power_w() > 13_000


async def test_killed_controller_leaves_the_agents_at_their_failsafe_cap(
    make_system: SystemFactory,
) -> None:
    """The controller process is killed (SIGKILL: no clean stop) while it holds the racks
    capped under a high load. The broker announces it ``offline`` (its last will); each
    agent's lease runs out and it applies its failsafe cap, read as the limit the fake
    NVML enforces; with every GPU at its safe share the racks stay inside their
    envelope with nobody controlling them."""
    s = await make_system()
    plant = s.plant
    plant.sim.load_step(1.8)
    await held(
        lambda: all(plant.power_w(r) <= s.envelope_w(r) for r in RACKS),
        "the racks capped inside their envelope",
    )
    assert not any(plant.in_failsafe(n) for n in plant.agents)
    s.ctl.send(signal.SIGKILL)
    assert await s.ctl.wait_exit() == -signal.SIGKILL
    assert await retained_status(s.broker.host, s.broker.port) == "offline"

    await eventually(
        lambda: all(plant.in_failsafe(n) for n in plant.agents), "every agent in failsafe"
    )
    for node, agent in plant.agents.items():
        reason = agent.state.failsafe_reason or ""
        assert "expired" in reason and CONTROLLER_ID in reason, (node, reason)
    await eventually(
        lambda: plant.all_gpus_at(lambda n: plant.failsafe_w[n]),
        "every GPU enforcing its server's failsafe cap",
    )
    assert all(plant.failsafe_w[n] < 0.8 * GPU_MAX_W for n in plant.agents)
    await held(
        lambda: all(plant.power_w(r) <= s.envelope_w(r) for r in RACKS),
        "the racks inside their envelope at the failsafe cap",
    )
    assert not plant.sim.state.trips


async def test_the_tsdb_holds_the_points(
    make_system: SystemFactory, victoriametrics: VictoriaMetrics
) -> None:
    """Read back from VictoriaMetrics' export API: every constraint node's power, envelope
    and headroom, with the ids as tags; the rack power written matches the plant's; the
    cycle's duration and the writer's own counters are there too."""
    s = await make_system(influx=victoriametrics)
    plant = s.plant
    nodes = list(plant.tree.constraint_nodes())

    def enough(series: list[Series]) -> bool:
        got = samples(series, "rackpower_node_power_w")
        return all(
            len(got.get(key, [])) >= 2
            for key in (
                tuple(sorted({"site": SITE, "node": r, "kind": "rack"}.items())) for r in RACKS
            )
        )

    series = await asyncio.to_thread(
        victoriametrics.wait_for, f'{{__name__=~"rackpower_.*",site="{SITE}"}}', enough, 60
    )
    power = samples(series, "rackpower_node_power_w")
    envelope = samples(series, "rackpower_node_envelope_w")
    headroom = samples(series, "rackpower_node_headroom_w")
    for nid in nodes:
        key = tuple(sorted({"site": SITE, "node": nid, "kind": plant.tree.node(nid).kind}.items()))
        assert key in power and key in envelope and key in headroom, (nid, sorted(power))
        assert {v for _, v in envelope[key]} == {s.envelope_w(nid)}
        for (_, p), (_, e), (_, h) in zip(power[key], envelope[key], headroom[key], strict=False):
            assert h <= e - p + 1.0  # headroom never claims more than envelope - measured
    for rack in RACKS:
        key = tuple(sorted({"site": SITE, "node": rack, "kind": "rack"}.items()))
        ts_ms, last_w = power[key][-1]
        assert abs(time.time() * 1000 - ts_ms) < 60_000  # wall-clock stamps, this run
        # The steady load: what was written is what the plant draws (metered over SNMP).
        assert abs(last_w - plant.power_w(rack)) < 0.05 * plant.power_w(rack)
    cycle = samples(series, "rackpower_cycle_duration_s")
    assert cycle and all(0 < v < 5 for vs in cycle.values() for _, v in vs)
    written = samples(series, "rackpower_tsdb_written")
    assert written, sorted({s["metric"]["__name__"] for s in series})
    # The detail below the racks (every 5 s), from the running service's own poll group:
    # the devices' statistics reach the TSDB (F9: they never did).
    detail = await asyncio.to_thread(
        victoriametrics.wait_for,
        f'{{__name__=~"rackpower_(device_poll_duration_s|gpu_target_w)",site="{SITE}"}}',
        lambda got: (
            {x["metric"]["__name__"] for x in got}
            == {"rackpower_device_poll_duration_s", "rackpower_gpu_target_w"}
        ),
        60,
    )
    polled = samples(detail, "rackpower_device_poll_duration_s")
    assert {dict(k)["driver"] for k in polled} >= {"snmp"}, sorted(polled)


async def test_a_reservation_larger_than_the_headroom_is_refused_with_409(
    make_system: SystemFactory,
) -> None:
    """Over HTTP with the bearer token: asking a rack for more than its headroom answers
    409 naming the limiting node and holds nothing; a fitting one is granted (201) and
    shows in the rack's reserved and headroom; then more than what is left is refused
    too; deleting it gives the headroom back. Without the token nothing is stored."""
    s = await make_system()
    ctl = s.ctl
    rack = RACKS[0]

    async def headroom() -> dict[str, Any]:
        nodes = (await ctl.get("/v1/headroom", node=rack))["nodes"]
        row: dict[str, Any] = next(n for n in nodes if n["id"] == rack)
        return row

    async def steady() -> bool:
        return bool(1_000 < (await headroom())["headroom_w"] < 3_000)

    await held(steady, "the rack's steady headroom")
    before = await headroom()
    assert before["reserved_w"] == 0
    assert before["envelope_w"] == s.envelope_w(rack)
    big = {"node": rack, "watts": before["headroom_w"] + 500, "ttl_s": 60, "job_id": "big-job"}
    r = await ctl.post("/v1/reservations", big)
    assert r.status_code == 409, r.text
    refusal = r.json()
    assert refusal["limiting_node"] == rack and refusal["requested_w"] == big["watts"]
    assert refusal["available_w"] < big["watts"]
    assert (await ctl.get("/v1/reservations"))["reservations"] == []
    assert (await headroom())["reserved_w"] == 0

    for token in (None, "wrong"):
        r = await ctl.post("/v1/reservations", {**big, "watts": 500}, token=token)
        assert r.status_code == 401, r.text
    assert (await ctl.get("/v1/reservations"))["reservations"] == []

    r = await ctl.post("/v1/reservations", {**big, "watts": 800, "job_id": "fits"})
    assert r.status_code == 201, r.text
    granted = r.json()
    held_now = await headroom()
    assert held_now["reserved_w"] == 800
    assert held_now["headroom_w"] == pytest.approx(before["headroom_w"] - 800, abs=300)
    r = await ctl.post("/v1/reservations", {**big, "watts": held_now["headroom_w"] + 500})
    assert r.status_code == 409, r.text
    assert [x["id"] for x in (await ctl.get("/v1/reservations"))["reservations"]] == [granted["id"]]
    refusals = (await ctl.get("/v1/events", kind="refusal"))["events"]
    assert len(refusals) == 2 and all(e["node"] == rack for e in refusals)

    gone = await ctl.delete(f"/v1/reservations/{granted['id']}")
    assert gone.status_code == 200 and gone.json()["id"] == granted["id"]
    assert (await headroom())["reserved_w"] == 0


async def test_sigterm_exits_0_and_leaves_offline_retained(make_system: SystemFactory) -> None:
    """SIGTERM: the process exits 0, the retained BMS status a newcomer reads is
    ``offline`` (published on the way out), the audit trail says it stopped, and with no
    lease renewed the agents fall back to their failsafe cap."""
    s = await make_system()
    plant = s.plant
    assert await retained_status(s.broker.host, s.broker.port) == "online"
    s.ctl.send(signal.SIGTERM)
    assert await s.ctl.wait_exit() == 0, s.ctl.log_text()[-3000:]
    assert await retained_status(s.broker.host, s.broker.port) == "offline"
    kinds = [e["kind"] for e in s.ctl.audit()]
    assert kinds[0] == "start" and kinds[-1] == "stop", kinds
    # Wait for the agents' own failsafe, not for the GPUs' limits: under the cap-sum the
    # controller's even share of an oversubscribed rack can equal the failsafe share, so
    # the GPUs may read as "at the failsafe cap" before any lease has run out.
    await eventually(
        lambda: all(plant.in_failsafe(n) for n in plant.agents), "every agent in failsafe"
    )
    await eventually(
        lambda: plant.all_gpus_at(lambda n: plant.failsafe_w[n]),
        "every GPU enforcing its server's failsafe cap",
    )
    for agent in plant.agents.values():
        assert "expired" in (agent.state.failsafe_reason or "")


async def test_sighup_refuses_a_bad_config_and_reloads_a_good_one(
    make_system: SystemFactory,
) -> None:
    """SIGHUP with a broken file: refused (a log line and a ``config_refused`` audit event
    naming the problem) and the old config keeps running. SIGHUP with a valid file that
    lowers the rack envelopes: reloaded, and the plant's racks come down under the new
    envelope."""
    s = await make_system()
    plant = s.plant
    good = yaml.safe_load(s.site_path.read_text())
    bad = json.loads(json.dumps(good))
    bad["rack_templates"]["rack"]["envelope_w"] = 12_000  # above its 11 kW rating
    write_site(s.site_path, bad)
    cycles = (await s.ctl.get("/v1/health"))["cycles"]
    s.ctl.send(signal.SIGHUP)
    await eventually(
        lambda: any(e["kind"] == "config_refused" for e in s.ctl.audit()),
        "config_refused in the audit trail",
    )
    refused = next(e for e in s.ctl.audit() if e["kind"] == "config_refused")
    assert "envelope_w" in refused["reason"] and str(s.site_path) in refused["reason"]
    assert "new config refused" in s.ctl.log_text()
    events = (await s.ctl.get("/v1/events", kind="config_refused"))["events"]
    assert len(events) == 1

    async def cycling_on() -> bool:
        return bool((await s.ctl.get("/v1/health"))["cycles"] > cycles + 8)

    await eventually(cycling_on, "cycles go on")
    assert s.ctl.running()
    rows = {n["id"]: n for n in (await s.ctl.get("/v1/headroom"))["nodes"]}
    assert rows[RACKS[0]]["envelope_w"] == 10_000  # the old config runs

    new_envelope_w = 7_000.0
    good["rack_templates"]["rack"]["envelope_w"] = new_envelope_w
    write_site(s.site_path, good)
    s.ctl.send(signal.SIGHUP)
    await eventually(
        lambda: any(e["kind"] == "config_reload" for e in s.ctl.audit()),
        "config_reload in the audit trail",
    )
    rows = {n["id"]: n for n in (await s.ctl.get("/v1/headroom"))["nodes"]}
    assert all(rows[r]["envelope_w"] == new_envelope_w for r in RACKS)
    assert all(plant.power_w(r) > new_envelope_w for r in RACKS)  # the old load is above it
    await held(
        lambda: all(plant.power_w(r) <= new_envelope_w for r in RACKS),
        "the racks under the reloaded envelope",
        samples=12,
    )
    assert s.ctl.running()


async def test_advisory_mode_changes_nothing_until_the_bms_switches_to_enforce(
    make_system: SystemFactory,
) -> None:
    """``rackpower run --mode advisory``: after a load step the racks run over their
    envelope and every GPU keeps its full limit (the audit trail says what it would have
    capped); a ``mode`` command over MQTT switches it to enforce, acked, and the racks are
    capped back inside."""
    s = await make_system(mode="advisory")
    plant = s.plant
    await held(plant.released, "every GPU at its maximum (leased the NVML default)")
    plant.sim.load_step(1.8)

    def over() -> bool:
        return all(plant.power_w(r) > s.envelope_w(r) for r in RACKS)

    await held(over, "the racks over their envelope, left alone")
    assert plant.released()
    would = [e for e in s.ctl.audit() if e["kind"] == "cap" and e.get("advisory")]
    assert would, "advisory mode audits the caps it would set"
    health = await s.ctl.get("/v1/health")
    assert health["mode"] == "advisory"

    async with bms_client(s.broker.host, s.broker.port, "cmd/ack") as bms:
        await bms.command({"type": "mode", "command_id": "mode-e2e-1", "mode": "enforce"})
        ack = await bms.ack_for("mode-e2e-1")
        assert ack["status"] == "accepted", ack
    await held(
        lambda: all(plant.power_w(r) <= s.envelope_w(r) for r in RACKS),
        "the racks capped inside their envelope once enforcing",
    )
    assert max(w for n in plant.agents for w in plant.enforced_w(n)) < 0.95 * GPU_MAX_W
    assert (await s.ctl.get("/v1/health"))["mode"] == "enforce"


async def test_a_tsdb_down_at_start_delays_nothing_and_gets_the_points_later(
    make_system: SystemFactory,
    victoriametrics_factory: Callable[[int], VictoriaMetrics],
) -> None:
    """The TSDB is down when the controller starts: the cycle runs and caps as usual
    (the writer buffers off the control path), and once the TSDB comes up the points
    written while it was down arrive, stamped with the time they were taken."""
    vm = victoriametrics_factory(free_port())
    s = await make_system(influx=vm)
    plant = s.plant
    await held(
        lambda: plant.at_cap_sum(s.envelope_w), "the controller cycling and capping, TSDB down"
    )
    cycles = (await s.ctl.get("/v1/health"))["cycles"]

    async def cycling() -> bool:  # the writer waits for the TSDB, the cycle does not
        return bool((await s.ctl.get("/v1/health"))["cycles"] > cycles + 4)

    await eventually(cycling, "the cycle to go on with the TSDB down")
    down_until_ms = time.time() * 1000
    await asyncio.to_thread(vm.start)

    def caught_up(series: list[Series]) -> bool:
        got = samples(series, "rackpower_node_power_w")
        return any(ts < down_until_ms for vs in got.values() for ts, _ in vs)

    series = await asyncio.to_thread(
        vm.wait_for, f'{{__name__="rackpower_node_power_w",site="{SITE}"}}', caught_up, 60
    )
    early = sorted(ts for vs in samples(series, "rackpower_node_power_w").values() for ts, _ in vs)
    assert early and early[0] < down_until_ms, "no point from while the TSDB was down"
    assert s.ctl.running()


async def test_a_broker_outage_ends_in_failsafe_and_control_resumes_after(
    make_system: SystemFactory,
) -> None:
    """The broker goes away (a restart without persistence): no lease reaches the agents,
    which fall back to their failsafe cap when their leases run out; the controller goes
    on cycling. When the broker is back, the controller and the agents reconnect by
    themselves: leases flow again (agents leave failsafe) and the BMS reads ``online``
    again, restated since the restarted broker forgot its retained messages."""
    s = await make_system()
    plant = s.plant
    await asyncio.to_thread(s.broker.stop)
    await eventually(
        lambda: all(plant.in_failsafe(n) for n in plant.agents),
        "every agent in failsafe without its broker",
    )
    await eventually(
        lambda: plant.all_gpus_at(lambda n: plant.failsafe_w[n]), "every GPU at its failsafe cap"
    )
    assert s.ctl.running()
    await asyncio.to_thread(s.broker.start)
    await eventually(
        lambda: not any(plant.in_failsafe(n) for n in plant.agents),
        "every agent leased again after the broker came back",
    )
    await eventually(
        lambda: plant.at_cap_sum(s.envelope_w), "control resumed: every rack at its cap sum"
    )
    assert await retained_status(s.broker.host, s.broker.port) == "online"
