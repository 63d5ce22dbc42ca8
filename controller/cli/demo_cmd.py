"""``rackpower demo``: simulator, agents, controller, API and status page in one process.

The simulator serves the demo site's meters over real Modbus/TCP and SNMP on loopback
(ports picked by the kernel), each GPU server gets a node agent on the simulator's fake
NVML, joined to the controller by the in-process link (or MQTT with ``--mqtt``), and the
controller polls, caps and serves its API exactly as ``rackpower run`` would. This module
is one of the two code paths where the controller imports the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from controller.cli.cmdutil import load_site_or_report, setup_logging
from controller.model.config import InfluxConfig, MqttConfig, Site
from controller.model.topology import CONSTRAINT_KINDS, PowerTree
from controller.support.mqtt import quiet_aiomqtt_close_race
from drivers.shipped import config_path

# The shipped demo site (package data), so `rackpower demo` works from any directory.
DEMO_SITE = config_path("sites", "demo.yaml")


def _efficiency_at_envelope(tree: PowerTree, node_id: str) -> float:
    """The node's configured conversion efficiency with its envelope at its input (1 with no
    curve): out = in x eff, the curve read at out / rating, settled in one more step and
    the lower of the two kept."""
    node = tree.node(node_id)
    curve = node.efficiency
    if curve is None or node.kind not in CONSTRAINT_KINDS:
        return 1.0
    xp = [x for x, _ in curve.points]
    fp = [e for _, e in curve.points]
    first = float(np.interp(node.envelope_w / node.rating_w, xp, fp))
    settled = float(np.interp(node.envelope_w * first / node.rating_w, xp, fp))
    return min(first, settled)


def failsafe_shares_w(tree: PowerTree) -> dict[str, float]:
    """The static safe share per GPU of every GPU server: what each GPU may draw with every
    server at it at once, no controller, and every constraint above still inside its
    envelope. Envelopes are measured at a node's input, so the share is what is left
    after each converter on the way down (the least efficient path below a node, at the
    envelope's load) less the baselines, split evenly; never below a GPU's floor."""
    chain: dict[str, float] = {}  # worst path efficiency from a node's input to the servers
    for nid in reversed(tree.order):
        below = [chain[c] for c in tree.children(nid) if c in chain]
        own = _efficiency_at_envelope(tree, nid)
        if tree.node(nid).kind == "gpu":
            continue
        chain[nid] = own * (min(below) if below else 1.0)
    baseline = tree.aggregate({n: tree.node(n).baseline_w for n in tree.of_kind("node")})
    share: dict[str, float] = {}
    for nid in tree.constraint_nodes():
        first, stop = tree.gpu_range(nid)
        if stop > first:
            usable = tree.effective_envelope_w(nid) * chain[nid] - baseline[nid]
            share[nid] = usable / (stop - first)
    out: dict[str, float] = {}
    for nid in tree.of_kind("node"):
        first, stop = tree.gpu_range(nid)
        if stop == first:
            continue
        gpus = tree.gpus[first:stop]
        best = min(
            [max(g.max_w for g in gpus)] + [share[a] for a in tree.ancestors(nid) if a in share]
        )
        out[nid] = max(math.floor(best), max(g.floor_w for g in gpus))
    return out


_SHARES: weakref.WeakKeyDictionary[PowerTree, dict[str, float]] = weakref.WeakKeyDictionary()


def failsafe_w(tree: PowerTree, node_id: str) -> float:
    """The static safe share per GPU of one server (see :func:`failsafe_shares_w`); the
    shares are worked out once per tree, so asking server by server stays linear."""
    shares = _SHARES.get(tree)
    if shares is None:
        shares = _SHARES[tree] = failsafe_shares_w(tree)
    return shares[node_id]


def _with_integrations(site: Site, mqtt: str | None, influx: str | None) -> Site:
    spec = site.spec
    integ = spec.integrations
    if mqtt:
        integ = integ.model_copy(update={"mqtt": MqttConfig(url=mqtt)})
    if influx:
        integ = integ.model_copy(update={"influx": InfluxConfig(url=influx)})
    return site.__class__(
        name=site.name,
        source=site.source,
        spec=spec.model_copy(update={"integrations": integ}),
        nodes=site.nodes,
        devices=site.devices,
        device_paths=site.device_paths,
    )


class _AgentStops(logging.Filter):
    """The demo starts and stops every agent at once: one line each instead of a warning
    per agent. Only clean ones are held back (the agent starting before its first lease,
    or stopping, with no failed set); anything else an agent says goes out as it is.
    """

    EXPECTED = ("FAILSAFE: no lease received since the agent started;", "FAILSAFE: agent stopping;")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith(self.EXPECTED) and text.endswith(" 0 failed)"):
            self.count += text.startswith(self.EXPECTED[1])
            return False
        return True


async def run_demo(args: argparse.Namespace, site: Site) -> int:
    from controller.agent.agent_config import parse_agent_config
    from controller.agent.node_agent import NodeAgent
    from controller.agentlink.msgauth import KeyFile, KeyStore, new_key_line, write_key_file
    from controller.agentlink.transport import (
        ControllerLink,
        InProcessLink,
        MqttAgentLink,
        MqttControllerLink,
    )
    from controller.core.integration import TaskIntegration
    from controller.integrations.api.app import binding_note
    from controller.service import ServiceOptions, run_service
    from drivers.nvml import NvmlDriver
    from sim.runtime import SimRuntime

    quiet_aiomqtt_close_race()
    token_env = site.integrations.api.token_env
    if token_env and not os.environ.get(token_env):
        os.environ[token_env] = secrets.token_urlsafe(24)
    stop = asyncio.Event()
    stops = _AgentStops()
    agent_log = logging.getLogger("controller.agent.node_agent")
    agent_log.addFilter(stops)
    # Over MQTT every agent gets a throwaway key, so `demo --mqtt URL` is signed out of the
    # box: a client on that broker cannot cap or uncap the demo's GPUs. Gone at exit.
    keys_tmp = tempfile.TemporaryDirectory(prefix="rackpower-demo-keys-")
    keys_dir = Path(keys_tmp.name)
    os.chmod(keys_dir, 0o700)
    try:
        async with SimRuntime(site, seed=args.seed, ephemeral=True) as sim:
            served = _with_integrations(sim.served_site(), args.mqtt, args.influx)
            tree = PowerTree(served)
            hub = InProcessLink()
            controller_link: ControllerLink
            mqtt_cfg = served.integrations.mqtt
            if mqtt_cfg is not None:
                controller_link = MqttControllerLink(mqtt_cfg, served.name, keys=KeyStore(keys_dir))
            else:
                controller_link = hub.controller()
            tasks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
            agents: list[NodeAgent] = []
            shares = failsafe_shares_w(tree)
            for node_id in sim.gpu_servers():
                node = tree.node(node_id)
                if node.agent is None:
                    continue
                driver = NvmlDriver(node_id, backend=sim.fake_nvml(node_id))
                await driver.start()
                key_path = keys_dir / f"{node.agent}.key"
                write_key_file(key_path, new_key_line("demo"))
                cfg = parse_agent_config(
                    {
                        "site": served.name,
                        "agent_id": node.agent,
                        "node_id": node_id,
                        "controller_id": f"rackpower-{served.name}-demo",
                        "failsafe_w": shares[node_id],
                        "telemetry_hz": 4,
                        "auth": {"key_file": str(key_path)},
                        "mqtt": {"url": mqtt_cfg.url if mqtt_cfg else "mqtt://127.0.0.1:1883"},
                    },
                    "<demo>",
                )
                agent_link = (
                    MqttAgentLink(mqtt_cfg, served.name, node.agent, keys=KeyFile(key_path))
                    if mqtt_cfg is not None
                    else hub.agent(node.agent)
                )
                agent = NodeAgent(cfg, driver, agent_link)
                agents.append(agent)
                tasks[f"agent:{node.agent}"] = agent.run
                if mqtt_cfg is not None:
                    tasks[f"agent-link:{node.agent}"] = agent_link.run

            def ready(controller: Any, url: str | None) -> None:
                controller.controller_id = f"rackpower-{served.name}-demo"
                token = os.environ.get(token_env or "", "")
                print(
                    f"rackpower demo: site {served.name!r}, {len(tree.gpus)} GPUs, "
                    f"{len(agents)} node agents (each at its failsafe cap until its first lease)",
                    flush=True,
                )
                print(f"  status page  {url}/", flush=True)
                print(
                    f"  API          {url}/v1/tree   {url}/v1/headroom   {url}/openapi.json",
                    flush=True,
                )
                print(f"  metrics      {url}/metrics", flush=True)
                print(f"  API binds    {binding_note(served.integrations.api.host)}", flush=True)
                if mqtt_cfg is not None:
                    print(
                        f"  agent link   MQTT, every lease and report signed (HMAC-SHA256,"
                        f" throwaway per-agent keys in {keys_dir})",
                        flush=True,
                    )
                if token:
                    print(
                        f"  API token    {token}   (for POST/DELETE: Authorization: Bearer ...)",
                        flush=True,
                    )
                for e in sim.endpoints()[:4]:
                    where = e.get("unit_id") or e.get("community")
                    print(
                        f"  {e['protocol']:6} {e['device']:22} {e['host']}:{e['port']} ({where})",
                        flush=True,
                    )
                print(
                    "  Ctrl-C to stop"
                    + (f"; stops by itself after {args.duration:g} s" if args.duration else ""),
                    flush=True,
                )
                reporter_state["controller"] = controller

            reporter_state: dict[str, Any] = {}

            async def reporter() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=args.report_s)
                    ctl = reporter_state.get("controller")
                    if ctl is None or stop.is_set():
                        continue
                    nodes = ctl.nodes()
                    racks = [nodes[r] for r in tree.of_kind("rack") if r in nodes]
                    worst = max(racks, key=lambda n: (n.power_w or 0) / n.envelope_w, default=None)
                    capped = sum(c.gpu_count for c in ctl.caps())
                    feed = nodes.get(tree.roots[0])
                    line = f"t={sim.t_s:7.1f}s"
                    if feed is not None and feed.power_w is not None:
                        line += f"  feed {feed.power_w / 1e3:6.1f}/{feed.envelope_w / 1e3:.1f} kW"
                    if worst is not None and worst.power_w is not None:
                        line += (
                            f"  hottest rack {worst.id} {worst.power_w / 1e3:5.1f}/"
                            f"{worst.envelope_w / 1e3:.1f} kW"
                        )
                    line += f"  capped GPUs {capped}  trips {len(sim.state.trips)}"
                    print(line, flush=True)

            async def deadline() -> None:
                if args.duration:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=args.duration)
                    stop.set()

            tasks["demo-reporter"] = reporter
            tasks["demo-deadline"] = deadline
            options = ServiceOptions(
                mode=args.mode,
                api_port=args.api_port,
                link=controller_link,
                allow_unauthenticated=False,
                on_ready=ready,
                extra=[TaskIntegration(name, run) for name, run in tasks.items()],
            )
            code = await run_service(served, options, stop)
            for agent in agents:
                agent.stop()
            if stops.count:
                print(
                    f"rackpower demo: {stops.count} agents stopped; their GPUs hold the failsafe"
                    " cap, as on a real node whose agent stops",
                    flush=True,
                )
            print(
                f"rackpower demo: stopped after {sim.t_s:.0f} s of plant time,"
                f" {len(sim.state.trips)} trips",
                flush=True,
            )
            return code
    finally:
        agent_log.removeFilter(stops)
        keys_tmp.cleanup()


def cmd_demo(args: argparse.Namespace) -> int:
    site = load_site_or_report(args.config)
    if site is None:
        return 2
    setup_logging(args.log_level)
    started = time.monotonic()
    try:
        return asyncio.run(run_demo(args, site))
    except OSError as exc:
        print(f"rackpower demo: {exc}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger(__name__).info("demo ran %.0f s", time.monotonic() - started)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="simulator + agents + controller + API + status page in one process",
        description=(
            "Run the demo site on the embedded simulator: real Modbus/TCP and SNMP on"
            " loopback, node agents on a fake NVML, the controller capping GPU power to keep"
            " every rack inside its envelope, and the API and status page. No external"
            " server is needed; --mqtt and --influx add a broker and a TSDB."
        ),
    )
    p.add_argument("--config", default=str(DEMO_SITE), help="site YAML (default: the demo site)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--api-port", type=int, default=8080, help="API port (0: any free port)")
    p.add_argument("--mqtt", default=None, help="broker URL (mqtt://host:port) for BMS + agents")
    p.add_argument("--influx", default=None, help="InfluxDB 2 URL (http://host:8086)")
    p.add_argument("--mode", choices=("enforce", "advisory"), default="enforce")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--report-s", type=float, default=5.0, help="status line period")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=cmd_demo)
