"""The scale benchmark's node agents: every GPU server of a site in one process, over MQTT.

Run by ``benchmarks.scale`` as ``python -m benchmarks._scale_agents --site FILE --mqtt URL
--controller-id ID --ready-file OUT``. Each GPU server gets a real ``NodeAgent`` with the
real ``NvmlDriver`` on a fake NVML (no GPU here) and its own ``MqttAgentLink`` (one
broker connection per agent, as on real nodes). The GPUs draw a training-like square
wave (compute and communication phases, a phase per server) clipped to the limit the
agent set, so caps the controller leases show in the telemetry it gets back.

The ready file is written once every agent's link is connected; SIGTERM stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.transport import MqttAgentLink
from controller.cli.demo_cmd import failsafe_w
from controller.model.config import MqttConfig
from controller.model.loader import load_site
from controller.model.topology import PowerTree
from drivers.nvml import NvmlDriver
from sim.fake_nvml import FakeGpuSpec, FakeNvml

COMPUTE_FRAC = 0.95
COMM_FRAC = 0.45
PERIOD_S = 2.0
COMPUTE_SHARE = 0.7


class SwingSource:
    """GPU power for the fake NVML: a compute/communication square wave per server,
    never above the GPU's enforced limit (a capped GPU draws its cap)."""

    def __init__(self, tree: PowerTree) -> None:
        self._max_w = {g.id: g.max_w for g in tree.gpus}
        self._limit_w = {g.id: g.default_w for g in tree.gpus}
        servers = sorted({g.node for g in tree.gpus})
        phase = {s: k * 0.37 % PERIOD_S for k, s in enumerate(servers)}
        self._phase_s = {g.id: phase[g.node] for g in tree.gpus}

    def value(self, device_id: str, point: str) -> float | None:
        if point == "power_w":
            pos = (time.monotonic() + self._phase_s[device_id]) % PERIOD_S
            frac = COMPUTE_FRAC if pos < COMPUTE_SHARE * PERIOD_S else COMM_FRAC
            return min(frac * self._max_w[device_id], self._limit_w[device_id])
        if point == "limit_w":
            return self._limit_w.get(device_id)
        return None

    def write(self, device_id: str, point: str, value: float) -> bool:
        if point != "limit_w" or device_id not in self._limit_w:
            return False
        self._limit_w[device_id] = value
        return True


async def run(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    tree = PowerTree(site)
    mqtt = MqttConfig(url=args.mqtt)
    source = SwingSource(tree)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agents: list[NodeAgent] = []
    links: list[MqttAgentLink] = []
    drivers: list[NvmlDriver] = []
    for node_id in tree.of_kind("node"):
        node = tree.node(node_id)
        if node.agent is None:
            continue
        first, stop_i = tree.gpu_range(node_id)
        specs = [
            FakeGpuSpec(g.id, f"GPU-bench-{g.id}", g.min_w, g.max_w, g.default_w)
            for g in tree.gpus[first:stop_i]
        ]
        driver = NvmlDriver(node_id, backend=FakeNvml(specs, source))
        await driver.start()
        drivers.append(driver)
        cfg = parse_agent_config(
            {
                "site": site.name,
                "agent_id": node.agent,
                "node_id": node_id,
                "controller_id": args.controller_id,
                "failsafe_w": failsafe_w(tree, node_id),
                "telemetry_hz": args.telemetry_hz,
                "mqtt": {"url": args.mqtt},
            },
            "<scale benchmark>",
        )
        link = MqttAgentLink(mqtt, site.name, node.agent)
        links.append(link)
        agents.append(NodeAgent(cfg, driver, link))

    async def announce() -> None:
        await asyncio.gather(*(link.wait_connected() for link in links))
        text = json.dumps({"agents": len(agents)})
        await asyncio.to_thread(Path(args.ready_file).write_text, text)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(link.run()) for link in links]
            tasks += [tg.create_task(agent.run()) for agent in agents]
            tasks.append(tg.create_task(announce()))
            await stop.wait()
            for agent in agents:
                agent.stop()
            await asyncio.sleep(0.5)
            for link in links:
                with contextlib.suppress(Exception):
                    await link.stop(timeout_s=2.0)
            for t in tasks:
                t.cancel()
    finally:
        for d in drivers:
            await d.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._scale_agents")
    p.add_argument("--site", required=True)
    p.add_argument("--mqtt", required=True)
    p.add_argument("--controller-id", required=True)
    p.add_argument("--telemetry-hz", type=float, default=2.0)
    p.add_argument("--ready-file", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if not math.isfinite(args.telemetry_hz) or args.telemetry_hz <= 0:
        p.error("--telemetry-hz must be positive")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
