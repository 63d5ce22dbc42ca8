"""A flood of BMS commands does not slow the control cycle (issue 11).

A real Controller (tiny site) and the real BmsLink wired as ``controller/service.py``
wires them (commands audited, demand responses into the controller's overrides), on one
event loop like the daemon, against a real Mosquitto. The flood comes from another
process (a BMS is not in our process, and a publisher thread would share our GIL):
2,000 QoS 1 commands in 10 s, then unpaced. Measured per cycle: the duration of the
cycle body (wall and CPU time), and its lateness (how late the loop woke it). Quiet vs
flood, p99; run with ``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controller.core.audit import AuditLog
from controller.core.controller import Controller
from controller.core.cycle import CycleStats, run_cycle, wait_or_stop
from controller.core.setpoints import Command, ModeSwitch
from controller.core.view import NodeTelemetry
from controller.integrations.bms.bridge import BmsLink
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.support.mqtt import Backoff
from tests.fixtures.mosquitto import Mosquitto
from tests.helpers.waiting import eventually
from tests.integration.test_bms import BASE, running
from tests.sites import tiny_site

pytest_plugins = ["tests.fixtures.mosquitto"]

REPO = Path(__file__).resolve().parents[2]
CYCLE_S = 0.05
QUIET_S = 5.0

BURST = """
import json, sys, time
import paho.mqtt.client as mqtt
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, seconds = int(sys.argv[4]), float(sys.argv[5])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bms-flood")
c.connect(host, port)
c.loop_start()
t0 = time.monotonic()
infos = []
for i in range(n):
    cmd = {"type": "demand_response", "command_id": f"flood-{i}", "node": "row",
           "limit_w": 9000 + i % 100, "ttl_s": 60}
    infos.append(c.publish(topic, json.dumps(cmd), qos=1))
    ahead = t0 + (i + 1) * seconds / n - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
for info in infos:
    info.wait_for_publish(timeout=60)
print(f"{time.monotonic() - t0:.2f}")
c.loop_stop()
c.disconnect()
"""


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(0.99 * len(ordered)) - 1))]


class Timing:
    """Cycle durations and wake-up lateness, split by phase."""

    def __init__(self) -> None:
        self.phase = "warm-up"
        self.duration_s: dict[str, list[float]] = {}
        self.late_s: dict[str, list[float]] = {}
        self.cpu_s: dict[str, list[float]] = {}

    def wait(self) -> Callable[[asyncio.Event, float], Awaitable[None]]:
        async def timed_wait(stop: asyncio.Event, delay_s: float) -> None:
            due_s = time.monotonic() + delay_s
            await wait_or_stop(stop, delay_s)
            self.late_s.setdefault(self.phase, []).append(max(0.0, time.monotonic() - due_s))

        return timed_wait


@pytest.mark.parametrize("pace_s", [10.0, 0.0], ids=["2000-in-10s", "unpaced"])
async def test_flood_of_commands_does_not_slow_the_cycle(
    mosquitto: Mosquitto, pace_s: float
) -> None:
    site = parse_site(tiny_site())
    controller = Controller(site, controller_id="ctl", audit=AuditLog())

    def on_command(cmd: Command) -> None:  # as controller/service.py does
        if isinstance(cmd, ModeSwitch):
            controller.apply_mode_command(cmd)
        controller.audit.record(
            f"command:{cmd.type}", f"BMS command {cmd.command_id} accepted", now_s=time.time()
        )

    frames: list[tuple[NodeTelemetry, ...]] = []  # the latest cycle's, as the service keeps
    cfg = MqttConfig(url=mosquitto.url, telemetry_period_s=0.5)
    link = BmsLink(
        cfg,
        controller.tree,
        telemetry=lambda: frames[-1] if frames else (),
        on_command=on_command,
        overrides=controller.overrides,
        backoff=Backoff(initial_s=0.05, max_s=0.5),
    )
    timing, stats, stop = Timing(), CycleStats(), asyncio.Event()

    async def body(now_s: float) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        frames[:] = [controller.run_cycle(now_s).telemetry]
        timing.duration_s.setdefault(timing.phase, []).append(time.perf_counter() - t0)
        timing.cpu_s.setdefault(timing.phase, []).append(time.thread_time() - c0)

    async with running(link):
        await eventually(lambda: link.stats().connected, "the link to connect")
        cycle = asyncio.create_task(run_cycle(body, CYCLE_S, stats, stop, wait=timing.wait()))
        # The same kind of demand response is in force in both phases, so the policy does
        # the same work; only the flood differs.
        link.handle_command(json.dumps(
            {"type": "demand_response", "command_id": "pre", "node": "row",
             "limit_w": 9000, "ttl_s": 600}).encode())  # fmt: skip
        await asyncio.sleep(1.0)
        timing.phase = "quiet"
        await asyncio.sleep(QUIET_S)
        timing.phase = "flood"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BURST, mosquitto.host, str(mosquitto.port),
            f"{BASE}/cmd", "2000", str(pace_s),
            cwd=REPO, stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        await eventually(lambda: link.stats().commands_accepted >= 2000, "2000 commands handled")
        timing.phase = "after"
        stop.set()
        await cycle
    s = link.stats()
    q_c, f_c = p99(timing.cpu_s["quiet"]), p99(timing.cpu_s["flood"])
    q_d, f_d = p99(timing.duration_s["quiet"]), p99(timing.duration_s["flood"])
    q_l, f_l = p99(timing.late_s["quiet"]), p99(timing.late_s["flood"])
    print(
        f"\nflood {out.decode().strip()} s for 2000 commands (pace {pace_s:g} s): "
        f"cycle p99 quiet {q_d * 1e3:.2f} ms, flood {f_d * 1e3:.2f} ms "
        f"({f_d / q_d:.2f}x); lateness p99 quiet {q_l * 1e3:.2f} ms, flood {f_l * 1e3:.2f} ms; "
        f"cycles {len(timing.duration_s['quiet'])}/{len(timing.duration_s['flood'])}, "
        f"accepted {s.commands_accepted}, dropped {s.commands_dropped}, "
        f"acks_dropped {s.acks_dropped}, overruns {stats.overruns}; "
        f"cycle CPU p99 quiet {q_c * 1e3:.2f} ms, flood {f_c * 1e3:.2f} ms ({f_c / q_c:.2f}x)"
    )
    assert s.commands_accepted == 2001 and s.commands_dropped == 0 and s.acks_dropped == 0
    assert stats.overruns == 0
    # The goal: within 20 % of quiet. Asserted on the cycle's CPU time (what the
    # flood could add to the cycle's own work: GC, bigger stores), plus 0.5 ms of slack;
    # the wall-clock figures are printed, not asserted: on a shared 2-core machine the
    # flood's publisher and broker preempt the cycle, which says nothing about the code.
    assert f_c <= 1.2 * q_c + 0.0005, (q_c, f_c)
    assert json.loads(json.dumps(controller.overrides.active(time.time())))  # DRs in force
