"""The node agent against the simulator's fake NVML, over the in-process link.

There is no GPU on the machines these tests run on, so libnvidia-ml cannot answer:
sim.fake_nvml.FakeNvml stands in for it behind the real drivers.nvml.NvmlDriver, speaking
pynvml's interface. Every cap is checked by reading the limit the fake ENFORCES (what the
GPU would obey) and the fake's count of accepted set calls, never by a return value.
Lease expiry is driven by an injected clock, so no test sleeps through a lease.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.agent.agent_config import AgentConfig, load_agent_config, parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.lease import Lease, Telemetry, decode_telemetry
from controller.agentlink.msgauth import new_key_line, write_key_file
from controller.agentlink.transport import BadMessage, InProcessLink
from controller.cli.agent_cmd import cmd_agent, register
from controller.model.config import ConfigError
from drivers.nvml import NvmlDriver
from drivers.reading import Quality
from sim.fake_nvml import FakeNvml
from sim.values import StaticSource
from tests.helpers.clock import ManualClock

NODE = "r1-n1"
CTL = "ctl-a"
FAILSAFE_W = 400.0
REPO = Path(__file__).resolve().parents[2]


def agent_config(**over: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "site": "tiny",
        "agent_id": "agent-r1-n1",
        "node_id": NODE,
        "controller_id": CTL,
        "failsafe_w": FAILSAFE_W,
        "telemetry_hz": 10,
        "max_lease_s": 60,
        "mqtt": {"url": "mqtt://127.0.0.1:1"},
    }
    data.update(over)
    return parse_agent_config(data, "test.yaml")


def lease(seq: int, caps: dict[int | str, float], **over: Any) -> Lease:
    fields: dict[str, Any] = {"issued_at": 1_700_000_000.0, "lease_s": 10.0}
    fields.update(over)
    return Lease.issue(fields.pop("controller_id", CTL), seq, caps, **fields)


class Rig:
    """A 4-GPU node (NVML range 200-700 W, default 700 W) with its agent."""

    def __init__(self, fake: FakeNvml, driver: NvmlDriver, agent: NodeAgent, clock: ManualClock):
        self.fake = fake
        self.driver = driver
        self.agent = agent
        self.clock = clock

    def enforced(self) -> list[float]:
        return [self.fake.enforced_limit_w(i) for i in range(4)]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    src = StaticSource()
    for i in range(4):
        src.values[(f"{NODE}-g{i}", "power_w")] = 300.0 + 10 * i
        src.values[(f"{NODE}-g{i}", "limit_w")] = 700.0
    fake = FakeNvml.for_node(NODE, 4, min_w=200, max_w=700, default_w=700, source=src)
    clock = ManualClock(1000.0)
    link = InProcessLink()
    async with NvmlDriver(NODE, fake) as driver:
        # The wall clock reads 1 s: the small seqs these tests send are "now" (within
        # seq_window_s); a real controller's seq is its wall clock in ms.
        agent = NodeAgent(
            agent_config(), driver, link.agent("agent-r1-n1"), clock=clock, wall_clock=lambda: 1.0
        )
        await agent.start()
        yield Rig(fake, driver, agent, clock)


# --- start and leases ---------------------------------------------------------------------


async def test_start_applies_the_failsafe_cap_before_any_lease(rig: Rig) -> None:
    assert rig.enforced() == [FAILSAFE_W] * 4
    assert rig.agent.failsafe
    assert "no lease" in (rig.agent.state.failsafe_reason or "")


async def test_lease_is_applied_by_index_and_by_site_gpu_id(rig: Rig) -> None:
    out = await rig.agent.handle(lease(1, {0: 450, 1: 500, f"{NODE}-g2": 650, "3": 200}))
    assert out.status == "applied"
    assert rig.enforced() == [450.0, 500.0, 650.0, 200.0]
    assert rig.agent.state.seq == 1
    assert not rig.agent.failsafe


async def test_gpus_the_lease_does_not_name_stay_at_the_failsafe_cap(rig: Rig) -> None:
    await rig.agent.handle(lease(1, {0: 650}))
    assert rig.enforced() == [650.0, FAILSAFE_W, FAILSAFE_W, FAILSAFE_W]


@pytest.mark.parametrize(
    ("caps", "why"),
    [
        ({0: 450, 1: 150}, "GPU 1: cap 150 W outside its NVML range [200, 700] W"),
        ({0: 450, 2: 701}, "GPU 2: cap 701 W outside its NVML range [200, 700] W"),
        ({0: 450, 4: 300}, "this node has 4 GPUs"),
        ({0: 450, "r9-n9-g1": 300}, "not on this node"),
        ({0: 450, f"{NODE}-g0": 300}, "GPU 0 is named twice"),
    ],
)
async def test_bad_cap_refuses_the_whole_lease_and_nothing_is_applied(
    rig: Rig, caps: dict[int | str, float], why: str
) -> None:
    await rig.agent.handle(lease(1, {0: 600, 1: 600, 2: 600, 3: 600}))
    calls = rig.fake.set_calls

    out = await rig.agent.handle(lease(2, caps))

    assert out.status == "refused"
    assert why in out.reason
    assert rig.enforced() == [600.0] * 4  # the lease in force stays, untouched
    assert rig.fake.set_calls == calls
    assert rig.agent.state.seq == 1
    t = await rig.agent.sample()
    assert t.refused is not None and t.refused.seq == 2 and why in t.refused.reason


async def test_refused_lease_while_in_failsafe_leaves_the_failsafe_cap(rig: Rig) -> None:
    calls = rig.fake.set_calls
    out = await rig.agent.handle(lease(1, {0: 100}))
    assert out.status == "refused"
    assert rig.enforced() == [FAILSAFE_W] * 4
    assert rig.fake.set_calls == calls
    assert rig.agent.failsafe


async def test_lease_from_another_controller_is_ignored(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "controller.agent.node_agent"):
        out = await rig.agent.handle(lease(5, {0: 650}, controller_id="rogue"))
        await rig.agent.handle(lease(6, {0: 650}, controller_id="rogue"))
    assert out.status == "ignored"
    assert rig.enforced() == [FAILSAFE_W] * 4
    assert rig.agent.state.seq is None
    assert sum("'rogue'" in r.getMessage() for r in caplog.records) == 1  # said once


async def test_lease_for_another_agent_is_ignored(rig: Rig) -> None:
    out = await rig.agent.handle(lease(5, {0: 650}, agent_id="agent-r1-n2"))
    assert out.status == "ignored"
    assert rig.enforced() == [FAILSAFE_W] * 4


@pytest.mark.parametrize("old_seq", [9, 10])
async def test_older_or_repeated_seq_is_ignored(rig: Rig, old_seq: int) -> None:
    await rig.agent.handle(lease(10, {0: 600}))
    out = await rig.agent.handle(lease(old_seq, {0: 250}))
    assert out.status == "ignored"
    assert rig.enforced()[0] == 600.0
    assert rig.agent.state.seq == 10


async def test_malformed_message_is_refused_and_reported(rig: Rig) -> None:
    out = await rig.agent.handle(BadMessage("invalid lease: seq: Input should be a valid integer"))
    assert out.status == "refused"
    t = await rig.agent.sample()
    assert t.refused is not None and t.refused.seq is None and "seq" in t.refused.reason
    assert rig.enforced() == [FAILSAFE_W] * 4


# --- expiry -------------------------------------------------------------------------------


async def test_expired_lease_falls_back_to_the_failsafe_cap_and_says_so(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await rig.agent.handle(lease(1, {0: 650, 1: 650, 2: 650, 3: 650}, lease_s=10))
    rig.clock.now_s += 9.99
    assert not await rig.agent.check_expiry()
    assert rig.enforced() == [650.0] * 4
    t = await rig.agent.sample()
    assert not t.failsafe and t.lease_left_s == pytest.approx(0.01)

    rig.clock.now_s += 0.02
    with caplog.at_level(logging.WARNING, "controller.agent.node_agent"):
        assert await rig.agent.check_expiry()

    assert rig.enforced() == [FAILSAFE_W] * 4
    assert any("FAILSAFE" in r.getMessage() and "expired" in r.getMessage() for r in caplog.records)
    t = await rig.agent.sample()
    assert (
        t.failsafe
        and "lease 1" in (t.failsafe_reason or "")
        and "expired" in (t.failsafe_reason or "")
    )
    assert t.seq == 1 and t.lease_left_s is None
    assert not await rig.agent.check_expiry()  # once


async def test_expiry_counts_from_receipt_not_from_the_controllers_clock(rig: Rig) -> None:
    # issued_at an hour in the past (a controller whose clock is behind): still 10 s.
    await rig.agent.handle(lease(1, {0: 650}, issued_at=1_000.0, lease_s=10))
    rig.clock.now_s += 9.0
    assert not await rig.agent.check_expiry()
    assert rig.enforced()[0] == 650.0


async def test_renewal_extends_the_lease(rig: Rig) -> None:
    await rig.agent.handle(lease(1, {0: 650}, lease_s=10))
    rig.clock.now_s += 8
    await rig.agent.handle(lease(2, {0: 650}, lease_s=10))
    rig.clock.now_s += 8  # 16 s after the first, 8 s after the renewal
    assert not await rig.agent.check_expiry()
    assert rig.enforced()[0] == 650.0


async def test_lease_longer_than_max_lease_s_is_held_to_it(rig: Rig) -> None:
    rig.agent.cfg = agent_config(max_lease_s=5)
    await rig.agent.handle(lease(1, {0: 650}, lease_s=3600))
    rig.clock.now_s += 5.01
    assert await rig.agent.check_expiry()
    assert rig.enforced()[0] == FAILSAFE_W


async def test_a_lease_after_failsafe_is_applied(rig: Rig) -> None:
    await rig.agent.handle(lease(1, {0: 650}, lease_s=1))
    rig.clock.now_s += 2
    await rig.agent.check_expiry()
    out = await rig.agent.handle(lease(2, {0: 300}))
    assert out.status == "applied"
    assert rig.enforced()[0] == 300.0 and not rig.agent.failsafe


# --- NVML traffic -------------------------------------------------------------------------


async def test_renewal_with_the_same_caps_makes_no_nvml_set_calls(rig: Rig) -> None:
    await rig.agent.handle(lease(1, {0: 450, 1: 500, 2: 650, 3: 650}))
    calls = rig.fake.set_calls
    for seq in range(2, 12):
        out = await rig.agent.handle(lease(seq, {0: 450, 1: 500, 2: 650, 3: 650}))
        assert out.status == "applied" and out.set_gpus == ()
        await rig.agent.sample()
    assert rig.fake.set_calls == calls
    assert rig.enforced() == [450.0, 500.0, 650.0, 650.0]

    out = await rig.agent.handle(lease(12, {0: 450, 1: 520, 2: 650, 3: 650}))
    assert out.set_gpus == (1,)
    assert rig.fake.set_calls == calls + 1
    assert rig.enforced() == [450.0, 520.0, 650.0, 650.0]


async def test_limit_raised_out_of_band_is_set_again(rig: Rig) -> None:
    await rig.agent.handle(lease(1, {0: 450}))
    # Someone (nvidia-smi, a GPU reset) puts GPU 0 back to its default limit.
    rig.fake.nvmlDeviceSetPowerManagementLimit(rig.driver._gpus[0].handle, 700_000)
    assert rig.enforced()[0] == 700.0
    await rig.agent.sample()
    assert rig.enforced()[0] == 450.0


async def test_a_sample_read_while_a_set_awaits_confirmation_is_not_out_of_band(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A set is in NVML before the driver confirms it and the agent records it; a sample
    read in that window saw the new, higher limit against the old record and took it for
    an out-of-band change: a WARNING and a second set call (the e2e release ramp logged
    it on every GPU)."""
    await rig.agent.handle(lease(1, {0: 450}))
    real_set, real_read = rig.driver.set_limit, rig.driver.read_all
    set_in_nvml, read_done, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def set_then_wait(index: int, limit_w: float) -> Any:
        result = await real_set(index, limit_w)
        set_in_nvml.set()
        await release.wait()  # still confirming
        return result

    async def read_then_say(*args: Any, **kwargs: Any) -> Any:
        got = await real_read(*args, **kwargs)
        read_done.set()
        return got

    monkeypatch.setattr(rig.driver, "set_limit", set_then_wait)
    monkeypatch.setattr(rig.driver, "read_all", read_then_say)
    calls = rig.fake.set_calls
    raising = asyncio.create_task(rig.agent.handle(lease(2, {0: 650})))
    await set_in_nvml.wait()
    sampling = asyncio.create_task(rig.agent.sample())
    await read_done.wait()
    release.set()
    await asyncio.wait_for(asyncio.gather(raising, sampling), 5.0)
    assert rig.enforced()[0] == 650.0
    assert rig.fake.set_calls == calls + 1
    assert not [r for r in caplog.records if "out of band" in r.getMessage()]


async def test_expiry_watch_ends_when_cancelled_as_a_lease_arrives(rig: Rig) -> None:
    """Python 3.11's wait_for returns the inner result when a cancel lands just as the
    awaited event fires, swallowing the cancel: a lease arriving as the agent stopped left
    its expiry watch waiting for ever (no lease in force: no timeout), and ``run()``, hence
    ``rackpower agent`` on SIGTERM, never returned (the e2e rig hung in teardown)."""
    await rig.agent.handle(lease(1, {0: 450}))  # a lease in force: the watch has a timeout
    watch = asyncio.create_task(rig.agent._expiry_loop())
    for _ in range(3):
        await asyncio.sleep(0)  # it is waiting on the lease-changed event
    rig.agent._lease_changed.set()
    watch.cancel()
    done, _ = await asyncio.wait({watch}, timeout=2.0)
    if not done:
        watch.cancel()  # do not leave it running past the test
    assert watch in done and watch.cancelled()


async def test_agent_survives_a_lost_gpu_and_caps_the_others(rig: Rig) -> None:
    rig.fake.lose(1)
    out = await rig.agent.handle(lease(1, {0: 450, 1: 450, 2: 450, 3: 450}))
    assert out.status == "applied"
    assert out.failed_gpus == (1,)
    assert [rig.enforced()[i] for i in (0, 2, 3)] == [450.0] * 3
    t = await rig.agent.sample()
    assert t.q[1] is Quality.ERROR and t.power_w[1] is None
    assert [t.q[i] for i in (0, 2, 3)] == [Quality.GOOD] * 3

    # Expiry still works for the others while GPU 1 is gone.
    rig.clock.now_s += 11
    assert await rig.agent.check_expiry()
    assert [rig.enforced()[i] for i in (0, 2, 3)] == [FAILSAFE_W] * 3

    # The GPU comes back: the next sweep gives it the cap in force.
    await rig.agent.handle(lease(2, {0: 500, 1: 500, 2: 500, 3: 500}))
    rig.fake.lose(1, False)
    await rig.agent.sample()
    assert rig.enforced() == [500.0] * 4


async def test_failsafe_outside_the_gpu_range_is_clamped_into_it() -> None:
    fake = FakeNvml.for_node(NODE, 2, min_w=200, max_w=700, power_w=100)
    async with NvmlDriver(NODE, fake) as driver:
        agent = NodeAgent(agent_config(failsafe_w=150), driver, InProcessLink().agent("a"))
        await agent.start()
    assert [fake.enforced_limit_w(i) for i in range(2)] == [200.0, 200.0]


# --- telemetry ----------------------------------------------------------------------------


async def test_telemetry_reports_every_gpu_in_compact_arrays(rig: Rig) -> None:
    rig.fake.set_instant_supported(3, False)
    await rig.agent.handle(lease(7, {0: 450, 1: 500}))
    t = await rig.agent.sample()

    assert (t.agent_id, t.node_id, t.seq, t.failsafe, t.failsafe_reason) == (
        "agent-r1-n1",
        NODE,
        7,
        False,
        None,
    )
    assert t.power_w == [300.0, 310.0, 320.0, 330.0]
    assert t.power_avg_w == [300.0, 310.0, 320.0, 330.0]
    assert t.limit_w == [450.0, 500.0, FAILSAFE_W, FAILSAFE_W]
    assert t.min_w == [200.0] * 4 and t.max_w == [700.0] * 4
    assert t.q == [Quality.GOOD] * 4
    assert t.lease_left_s == pytest.approx(10.0)

    wire = t.encode()
    assert decode_telemetry(wire) == t
    doc = json.loads(wire)
    assert doc["power_w"] == [300.0, 310.0, 320.0, 330.0] and doc["q"] == ["good"] * 4
    assert b" " not in wire  # compact separators
    print(f"telemetry for 4 GPUs: {len(wire)} bytes")


# --- running over the in-process link -----------------------------------------------------


async def wait_for(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll an outcome (the fake's enforced limit has no event to wait on); fail if late."""
    async with asyncio.timeout(timeout_s):
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_run_over_the_in_process_link_and_fall_back_when_cut() -> None:
    fake = FakeNvml.for_node(NODE, 2, min_w=200, max_w=700, power_w=250)
    hub = InProcessLink(through_json=True)
    ctl = hub.controller()
    async with NvmlDriver(NODE, fake) as driver:
        agent = NodeAgent(agent_config(), driver, hub.agent("agent-r1-n1"), wall_clock=lambda: 1.0)
        received: list[Telemetry] = []

        async def collect() -> None:
            async for t in ctl.telemetry():
                received.append(t)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(collect())
            run = tg.create_task(agent.run())
            await wait_for(lambda: fake.enforced_limit_w(0) == FAILSAFE_W)
            ctl.send_lease("agent-r1-n1", lease(1, {0: 600, 1: 550}, lease_s=0.5))
            await wait_for(lambda: fake.enforced_limit_w(1) == 550.0)
            assert fake.enforced_limit_w(0) == 600.0
            await wait_for(lambda: any(t.seq == 1 and not t.failsafe for t in received))

            hub.cut()  # the controller goes silent: no renewal reaches the agent
            ctl.send_lease("agent-r1-n1", lease(2, {0: 650, 1: 650}, lease_s=0.5))
            await wait_for(lambda: fake.enforced_limit_w(0) == FAILSAFE_W)
            assert fake.enforced_limit_w(1) == FAILSAFE_W
            assert agent.state.seq == 1
            assert hub.stats().leases_dropped == 1

            hub.heal()  # the agent reports its failsafe (telemetry was cut too)
            await wait_for(
                lambda: any(t.failsafe and "expired" in (t.failsafe_reason or "") for t in received)
            )
            ctl.send_lease("agent-r1-n1", lease(3, {0: 610, 1: 610}, lease_s=30))
            await wait_for(lambda: fake.enforced_limit_w(0) == 610.0)
            agent.stop()
            await run
            await ctl.stop()
    # Stopping puts the failsafe cap back: nobody will renew the lease.
    assert [fake.enforced_limit_w(i) for i in range(2)] == [FAILSAFE_W] * 2


# --- config and command -------------------------------------------------------------------


def test_example_agent_config_loads() -> None:
    cfg = load_agent_config(REPO / "configs/agents/example.yaml")
    assert cfg.failsafe_w > 0 and 1 <= cfg.telemetry_hz <= 10


@pytest.mark.parametrize(
    ("over", "path", "words"),
    [
        ({"telemetry_hz": 20}, "telemetry_hz", "less than or equal to 10"),
        ({"failsafe_w": -5}, "failsafe_w", "greater than 0"),
        ({"controler_id": "x"}, "controler_id", "unknown key"),
        ({"agent_id": "a/b"}, "agent_id", "pattern"),
        ({"mqtt": {"url": "mqtt://h", "pasword_env": "X"}}, "mqtt.pasword_env", "unknown key"),
    ],
)
def test_bad_agent_config_names_the_file_and_the_path(
    tmp_path: Path, over: dict[str, Any], path: str, words: str
) -> None:
    data = json.loads(json.dumps(agent_config().model_dump(mode="json")))
    data.update(over)
    f = tmp_path / "agent.yaml"
    f.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(ConfigError) as err:
        load_agent_config(f)
    assert f"{f}: {path}: " in str(err.value) and words in str(err.value)


def test_missing_key_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="controller_id: required key is missing"):
        parse_agent_config({"site": "s", "agent_id": "a", "node_id": "n", "failsafe_w": 1,
                            "mqtt": {}}, "a.yaml")  # fmt: skip
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path / "nope.yaml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rackpower")
    register(p.add_subparsers(dest="command"))
    return p


def test_agent_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["agent", "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_agent_command_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("site: s\nagent_id: a\n")
    assert cmd_agent(parser().parse_args(["agent", "--config", str(f)])) == 2
    assert f"{f}: node_id: required key is missing" in capsys.readouterr().err


def test_agent_command_without_nvml_exits_1_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The real pynvml: this machine has no NVIDIA driver, so NVML cannot start. The
    # example with its key file in tmp_path (a key is checked before NVML is opened).
    key = tmp_path / "agent.key"
    write_key_file(key, new_key_line())
    text = (REPO / "configs/agents/example.yaml").read_text()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text.replace("/etc/rackpower/agent.key", str(key)))
    args = parser().parse_args(["agent", "--config", str(cfg)])
    assert cmd_agent(args) == 1
    assert "NVML is not available" in capsys.readouterr().err


# --- F2: seq bounded by the agent's wall clock ----------------------------------------------


async def test_f2_seq_beyond_the_wall_clock_is_refused_and_does_not_lock_out(rig: Rig) -> None:
    now_ms = 1000  # the rig's wall clock, in ms: a real controller's seq
    out = await rig.agent.handle(lease(2**63, {0: 700, 1: 700, 2: 700, 3: 700}))
    assert out.status == "refused" and "wall clock" in out.reason
    assert rig.enforced() == [FAILSAFE_W] * 4
    t = await rig.agent.sample()
    assert t.refused is not None and t.refused.seq == 2**63
    # The real controller is obeyed afterwards.
    out = await rig.agent.handle(lease(now_ms, {0: 600}))
    assert out.status == "applied" and rig.agent.state.seq == now_ms
    assert rig.enforced()[0] == 600.0
