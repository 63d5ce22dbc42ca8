"""The whole product on one machine, for end-to-end tests: PYTEST_DONT_REWRITE.

- the plant: :class:`~sim.runtime.SimRuntime` in the test's event loop, serving the e2e
  site's meters over real Modbus/TCP (an SST meter, a row's rectifier shelf) and real
  SNMP (one PDU per rack) on loopback ports written into the site file;
- the node agents: the real :class:`~controller.agent.node_agent.NodeAgent` on the real NVML driver
  and the real MQTT agent link, one per GPU server, in the test's event loop. No GPU
  here, so each agent's NVML is the simulator's fake (``SimRuntime.fake_nvml``), which
  feeds the limits it enforces back into the plant;
- the controller: ``rackpower run --config SITE`` as a subprocess, so a test can signal
  it and kill it like an operator would;
- Mosquitto and VictoriaMetrics: the real servers (tests/fixtures).

Tests read outcomes where they happen: rack and feed power from the plant, GPU limits
from the fake NVML's enforced limit, acks and statuses from the broker, points from the
TSDB's export API. The controller's own claims (its API) are used only to wait for it
to be up and to compute what to ask for.

The site is small on purpose (2 racks x 2 servers x 8 GPUs) and its load steady (a
training profile with no swing), so every assertion is about control, not noise, and
the harness runs on a loaded 2-core machine with a 0.25 s cycle and 3 s leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import yaml

from controller.agent.agent_config import parse_agent_config
from controller.agent.node_agent import NodeAgent
from controller.agentlink.msgauth import KeyFile, new_key_line, write_key_file
from controller.agentlink.transport import MqttAgentLink
from controller.cli.demo_cmd import failsafe_shares_w
from controller.model.config import Site
from controller.model.topology import PowerTree
from controller.support.mqtt import Backoff
from drivers.nvml import NvmlDriver
from sim.runtime import SimRuntime
from sim.workloads import TrainingJobSpec, TrainingProfile
from tests.helpers import waiting
from tests.helpers.ports import free_port, free_udp_port

REPO = Path(__file__).resolve().parents[2]
RACKPOWER = Path(sys.executable).parent / "rackpower"
SITE = "e2e"
CONTROLLER_ID = "ctl-e2e"
TOKEN_ENV = "RACKPOWER_E2E_API_TOKEN"
TOKEN = "e2e-token-not-a-secret"
WAIT_S = 45.0  # generous: only a broken system waits this long (2 loaded cores)
RACKS = ("row-1-rack-1", "row-1-rack-2")
GPU_MAX_W = 700.0
GPU_MIN_W = 200.0
DEMAND_FRAC = 0.5  # the steady load: every GPU at half its maximum


@dataclass(frozen=True)
class Ports:
    sst_modbus: int
    shelf_modbus: int
    pdu_snmp: int
    api: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(free_port(), free_port(), free_udp_port(), free_port())


EFFICIENCY = {"points": [[0.1, 0.94], [0.5, 0.975], [1.0, 0.97]]}


def site_dict(
    ports: Ports,
    mqtt_url: str,
    influx_url: str | None = None,
    *,
    keys_dir: Path,
    rack_envelope_w: float = 10_000.0,
) -> dict[str, Any]:
    """The e2e site: one feed, SST and bus, one row, two racks of two 8-GPU servers.

    Its agent link is signed (``integrations.agent_auth.keys_dir``), as a site on MQTT
    must be: :func:`running_plant` makes the directory and a key per agent.

    A rack draws up to 2 x (1000 + 8 x 700) = 13.2 kW against a 10 kW envelope (1.32x
    oversubscribed); at the steady half load it draws about 7.9 kW, inside. Feed and row
    envelopes are loose so the racks bind first, until a demand response says otherwise.
    """
    integrations: dict[str, Any] = {
        "api": {"host": "127.0.0.1", "port": ports.api, "token_env": TOKEN_ENV},
        # The e2e BMS switches modes (test_advisory_...); a site opts in (issue 11, F7).
        "mqtt": {"url": mqtt_url, "telemetry_period_s": 0.5, "allow_mode_commands": True},
        "agent_auth": {"keys_dir": str(keys_dir)},
    }
    if influx_url is not None:
        integrations["influx"] = {"url": influx_url, "flush_s": 0.5, "batch_size": 500}
    return {
        "site": SITE,
        "description": "end-to-end test site",
        "gpu_models": {"h100": {"min_w": GPU_MIN_W, "max_w": GPU_MAX_W, "default_w": GPU_MAX_W}},
        "trip_curves": {
            "breaker-c": {
                "points": [[1.05, 3600], [1.13, 600], [1.45, 60], [2.0, 10], [3.0, 2]],
                "instant_ratio": 5.0,
            }
        },
        "devices": [
            {
                "id": "sst-1-meter",
                "driver": "modbus",
                "address": f"127.0.0.1:{ports.sst_modbus}",
                "unit_id": 1,
                "map": "generic-sst-mv800",
                "period_s": 0.25,
                "timeout_s": 0.2,
            },
            {
                "id": "shelf-row-1",
                "driver": "modbus",
                "address": f"127.0.0.1:{ports.shelf_modbus}",
                "unit_id": 1,
                "map": "generic-hvdc-rectifier-800v",
                "period_s": 0.25,
                "timeout_s": 0.2,
            },
        ],
        "feeds": [
            {
                "id": "mv-1",
                "rating_w": 30_000,
                "envelope_w": 24_000,
                "trip_curve": "breaker-c",
                "meters": [{"device": "sst-1-meter", "point": "input_power_w"}],
            }
        ],
        "ssts": [
            {
                "id": "sst-1",
                "parent": "mv-1",
                "rating_w": 28_000,
                "envelope_w": 23_000,
                "meters": [{"device": "sst-1-meter", "point": "input_power_w"}],
                "efficiency": {"points": [[0.1, 0.93], [0.3, 0.97], [1.0, 0.972]]},
            }
        ],
        "buses": [
            {
                "id": "bus-800v",
                "parent": "sst-1",
                "rating_w": 26_000,
                "envelope_w": 22_000,
                "meters": [{"device": "sst-1-meter", "point": "output_power_w"}],
            }
        ],
        "rows": [
            {
                "id": "row-1",
                "parent": "bus-800v",
                "rating_w": 24_000,
                "envelope_w": 21_000,
                "trip_curve": "breaker-c",
                "meters": [{"device": "shelf-row-1", "point": "input_power_w"}],
                "efficiency": EFFICIENCY,
                "racks": [{"id": "{row}-rack-{i}", "count": 2, "template": "rack"}],
            }
        ],
        "rack_templates": {
            "rack": {
                "rating_w": 11_000,
                "envelope_w": rack_envelope_w,
                "trip_curve": "breaker-c",
                "meters": [{"device": "pdu-{rack}", "point": "power_w"}],
                "efficiency": {"points": [[0.1, 0.92], [0.5, 0.965], [1.0, 0.96]]},
                "devices": [
                    {
                        "id": "pdu-{rack}",
                        "driver": "snmp",
                        "address": f"127.0.0.1:{ports.pdu_snmp}",
                        "community": "{rack}",
                        "map": "apc-rpdu2",
                        "period_s": 0.25,
                        "timeout_s": 0.2,
                    },
                    {
                        "id": "agent-{rack}-node-{i}",
                        "count": 2,
                        "driver": "agent",
                        "period_s": 0.25,
                        "timeout_s": 0.2,
                    },
                ],
                "nodes": [
                    {
                        "id": "{rack}-node-{i}",
                        "count": 2,
                        "gpus": 8,
                        "gpu_model": "h100",
                        "baseline_w": 1000,
                        "agent": "agent-{rack}-node-{i}",
                    }
                ],
            }
        },
        "policy": {"name": "rackpower", "cycle_s": 0.25, "lease_s": 3.0},
        "integrations": integrations,
    }


def write_site(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


def steady_workloads(tree: PowerTree) -> list[TrainingJobSpec]:
    """One training job per rack at a flat ``DEMAND_FRAC`` of TDP: no swing, no
    checkpoint dip within a test, so the only load change is the one a test makes."""
    profile = TrainingProfile(
        compute_frac=DEMAND_FRAC,
        comm_frac=DEMAND_FRAC,
        period_s=1.0,
        checkpoint_every_s=1e9,
        startup_s=0.1,
        startup_frac=DEMAND_FRAC,
    )
    per_rack = tree.gpu_range(RACKS[0])[1] - tree.gpu_range(RACKS[0])[0]
    return [
        TrainingJobSpec(f"train-{k + 1}", per_rack, work_s=1e9, profile=profile)
        for k in range(len(RACKS))
    ]


Check = waiting.Check


async def eventually(check: Check, what: str, timeout_s: float = WAIT_S) -> None:
    """``tests.helpers.waiting.eventually`` with the e2e deadline (a whole daemon on 2 cores)."""
    await waiting.eventually(check, what, timeout_s, every_s=0.05)


async def held(
    check: Check,
    what: str,
    samples: int = 8,
    every_s: float = 0.25,
    timeout_s: float = WAIT_S,
) -> None:
    """Wait until ``check`` holds for ``samples`` polls in a row (a state, not a blip)."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while True:
        streak = streak + 1 if await waiting.holds(check) else 0
        if streak >= samples:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} to hold")
        await asyncio.sleep(every_s)


# -- the plant and the agents ------------------------------------------------------------


@dataclass
class Plant:
    """The simulator and one node agent per GPU server, running in this event loop."""

    sim: SimRuntime
    agents: dict[str, NodeAgent]  # by node id
    failsafe_w: dict[str, float]  # by node id
    links: dict[str, MqttAgentLink] = field(default_factory=dict)  # by node id

    @property
    def tree(self) -> PowerTree:
        return self.sim.tree

    def power_w(self, node_id: str) -> float:
        """Input power of a tree node as the plant has it (what a perfect meter reads)."""
        return self.sim.plant.power_w(self.sim.state, node_id)

    def feed_power_w(self) -> float:
        return float(self.sim.state.feed_power_w)

    def enforced_w(self, node_id: str) -> list[float]:
        """Every GPU's limit as the (fake) NVML enforces it."""
        nvml = self.sim.fake_nvml(node_id)
        first, stop = self.tree.gpu_range(node_id)
        return [nvml.enforced_limit_w(i) for i in range(stop - first)]

    def servers(self, under: str | None = None) -> list[str]:
        nodes = self.sim.gpu_servers()
        return [n for n in nodes if under is None or under in self.tree.ancestors(n)]

    def uncapped_demand_w(self, node_id: str) -> float:
        """What the GPUs and baselines under ``node_id`` would draw with no cap (no losses)."""
        first, stop = self.tree.gpu_range(node_id)
        demand = self.sim.scheduler.demand_w(self.sim.t_s)[first:stop]
        gpus = sum(
            min(float(d), g.max_w) for d, g in zip(demand, self.tree.gpus[first:stop], strict=True)
        )
        base = sum(self.tree.node(n).baseline_w for n in self.servers(node_id))
        return gpus + base

    def in_failsafe(self, node_id: str) -> bool:
        return self.agents[node_id].state.failsafe

    def all_gpus_at(self, limit_w: Callable[[str], float]) -> bool:
        """Every GPU's enforced limit at ``limit_w(server)`` (to the watt)."""
        return all(abs(w - limit_w(n)) < 1.0 for n in self.agents for w in self.enforced_w(n))

    def released(self) -> bool:
        """No cap left: every GPU may draw its maximum (what advisory mode leases)."""
        return self.all_gpus_at(lambda n: GPU_MAX_W)

    def at_cap_sum(self, envelope_w: Callable[[str], float]) -> bool:
        """The controller's steady plan is in force on every rack: the agents are leased
        (none in failsafe), the enforced limits under each rack, with its baselines, fit
        its envelope (the cap sum: no demand can overdraw it) and hand out at least 90 %
        of it (the budget is used, not stranded), split evenly under the uniform load.

        An oversubscribed rack (every e2e rack is) stays capped so however quiet it is:
        under the cap-sum design no GPU there is ever released to its maximum."""
        if any(self.in_failsafe(n) for n in self.agents):
            return False
        for rack in self.tree.of_kind("rack"):
            limits = [w for n in self.servers(rack) for w in self.enforced_w(n)]
            base = sum(self.tree.node(n).baseline_w for n in self.servers(rack))
            allowed = sum(limits) + base
            if not 0.9 * envelope_w(rack) <= allowed <= envelope_w(rack):
                return False
            if max(limits) - min(limits) > 1.0:
                return False
        return True


@contextlib.asynccontextmanager
async def running_plant(
    site: Site,
    mqtt_url: str,
    *,
    agent_mqtt: Callable[[str], Mapping[str, Any]] | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Plant]:
    """Simulator on the site's ports plus agents over MQTT; everything stopped on exit.

    Each agent signs with a key in the site's ``agent_auth.keys_dir`` (made here if
    absent, kept across a second plant on the same site); on one test host the agent's
    ``auth.key_file`` and the controller's copy can be the same file.

    By default every agent connects anonymously to ``mqtt_url``. ``agent_mqtt(agent_id)``
    gives an agent config's ``mqtt`` section instead (its own ``username`` and
    ``password_file`` on a broker with per-client identities), and ``tls_context`` the
    CA an ``mqtts://`` broker's certificate is checked against.
    """
    tree = PowerTree(site)
    auth = site.integrations.agent_auth
    keys_dir = auth.keys_dir if auth is not None else None
    if keys_dir is not None:
        keys_dir.mkdir(mode=0o700, exist_ok=True)
    tasks: list[asyncio.Task[None]] = []
    links: dict[str, MqttAgentLink] = {}
    agents: dict[str, NodeAgent] = {}
    shares = failsafe_shares_w(tree)
    async with SimRuntime(site, workloads=steady_workloads(tree), seed=1) as sim:
        try:
            for node_id in sim.gpu_servers():
                node = tree.node(node_id)
                assert node.agent is not None
                driver = NvmlDriver(node_id, backend=sim.fake_nvml(node_id))
                await driver.start()
                key_file = None if keys_dir is None else keys_dir / f"{node.agent}.key"
                if key_file is not None and not key_file.exists():
                    write_key_file(key_file, new_key_line("e2e"))
                cfg = parse_agent_config(
                    {
                        "site": site.name,
                        "agent_id": node.agent,
                        "node_id": node_id,
                        "controller_id": CONTROLLER_ID,
                        "failsafe_w": shares[node_id],
                        "telemetry_hz": 4,
                        "auth": (
                            {"allow_unsigned": True}
                            if key_file is None
                            else {"key_file": str(key_file)}
                        ),
                        "mqtt": (
                            {"url": mqtt_url} if agent_mqtt is None else agent_mqtt(node.agent)
                        ),
                    },
                    "<e2e agent>",
                )
                link = MqttAgentLink(
                    cfg.mqtt.as_site_mqtt(),
                    site.name,
                    node.agent,
                    tls_context=tls_context,
                    backoff=Backoff(initial_s=0.1, max_s=1.0),
                    keys=None if key_file is None else KeyFile(key_file),
                )
                agent = NodeAgent(cfg, driver, link)
                links[node_id] = link
                agents[node_id] = agent
                tasks.append(asyncio.create_task(link.run(), name=f"link:{node_id}"))
                tasks.append(asyncio.create_task(agent.run(), name=f"agent:{node_id}"))
            yield Plant(sim, agents, shares, links)
        finally:
            for agent in agents.values():
                agent.stop()
            for link in links.values():
                with contextlib.suppress(Exception):
                    await link.stop(timeout_s=3.0)
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# -- the controller as a process -----------------------------------------------------------


@dataclass
class ControllerProcess:
    """``rackpower run`` in a subprocess, its log in a file; stopped (killed if need be)
    on :meth:`close`."""

    config: Path
    api_url: str
    log_path: Path
    audit_path: Path
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to this process's own
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)
    _http: httpx.AsyncClient | None = field(default=None, repr=False)

    def start(self) -> None:
        env = {**os.environ, **self.env}
        env[TOKEN_ENV] = TOKEN
        env["PYTHONUNBUFFERED"] = "1"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(RACKPOWER),
                "run",
                "--config",
                str(self.config),
                "--controller-id",
                CONTROLLER_ID,
                "--audit-log",
                str(self.audit_path),
                "--log-level",
                "info",
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float = WAIT_S) -> int:
        assert self.proc is not None
        proc = self.proc
        await eventually(lambda: proc.poll() is not None, "the controller to exit", timeout_s)
        return int(proc.returncode)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def audit(self) -> list[dict[str, Any]]:
        try:
            lines = self.audit_path.read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.api_url, timeout=10.0)
        return self._http

    async def get(self, path: str, **params: Any) -> Any:
        r = await self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    async def post(
        self, path: str, body: Mapping[str, Any], token: str | None = TOKEN
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.http.post(path, json=dict(body), headers=headers)

    async def delete(self, path: str, token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.http.delete(path, headers=headers)

    async def health(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = await self.get("/v1/health")
            return data
        except (httpx.HTTPError, ValueError):
            return None

    async def wait_cycling(self, timeout_s: float = WAIT_S) -> None:
        """Until the API answers and the cycle has turned (it may not be "ok" yet)."""

        async def up() -> bool:
            if not self.running():
                raise AssertionError(f"controller exited:\n{self.log_text()[-3000:]}")
            h = await self.health()
            return h is not None and h.get("cycles", 0) > 0

        await eventually(up, "the controller's API and first cycles", timeout_s)

    async def close(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone after a generous wait."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await eventually(lambda: proc.poll() is not None, "the controller to stop", 20)
            if proc.poll() is None:
                proc.kill()
                await eventually(lambda: proc.poll() is not None, "the controller to die", 10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None


# -- a BMS on the broker -----------------------------------------------------------------------


async def wait_leasing(plant: Plant, ctl: ControllerProcess) -> None:
    """Until the controller cycles and leases reach every agent (none left in its
    start-up failsafe): the state every e2e test starts from."""
    await ctl.wait_cycling()
    await eventually(
        lambda: not any(plant.in_failsafe(n) for n in plant.agents),
        "every agent to apply a lease from the controller",
    )


@contextlib.asynccontextmanager
async def controller_leasing(
    plant: Plant,
    site_path: Path,
    api_port: int,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ControllerProcess]:
    """``rackpower run`` on ``site_path``, yielded once :func:`wait_leasing` holds; closed
    after, and its log tail printed (pytest shows it only when the test failed)."""
    ctl = ControllerProcess(
        site_path,
        f"http://127.0.0.1:{api_port}",
        tmp_path / "controller.log",
        tmp_path / "audit.jsonl",
        env=dict(env or {}),
    )
    ctl.start()
    try:
        await wait_leasing(plant, ctl)
        yield ctl
    finally:
        await ctl.close()
        print(f"--- {ctl.log_path} (tail) ---\n{ctl.log_text()[-4000:]}")


class Bms:
    """A plain MQTT client standing in for the building management system."""

    def __init__(self, client: aiomqtt.Client, base: str) -> None:
        self.client = client
        self.base = base
        self.messages: list[tuple[str, bytes, bool]] = []

    async def pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((str(m.topic), payload, bool(m.retain)))

    def on(self, suffix: str) -> list[bytes]:
        topic = f"{self.base}/{suffix}"
        return [p for t, p, _ in self.messages if t == topic]

    def acks(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for raw in self.on("cmd/ack"):
            ack = json.loads(raw)
            out[str(ack.get("command_id"))] = ack
        return out

    async def command(self, payload: Mapping[str, Any] | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(dict(payload)).encode()
        await self.client.publish(f"{self.base}/cmd", body, qos=1, retain=False)

    async def ack_for(self, command_id: str) -> dict[str, Any]:
        await eventually(lambda: command_id in self.acks(), f"the ack of {command_id}")
        return self.acks()[command_id]


@contextlib.asynccontextmanager
async def bms_client(
    host: str,
    port: int,
    *subscriptions: str,
    site: str = SITE,
    username: str | None = None,
    password: str | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Bms]:
    """A BMS client subscribed to ``rackpower/<site>/<subscription>`` for each one
    (anonymous unless given a ``username``/``password``; TLS with ``tls_context``)."""
    base = f"rackpower/{site}"
    client = aiomqtt.Client(
        host,
        port,
        identifier=f"e2e-bms-{os.getpid()}-{time.monotonic_ns() % 10**6}",
        username=username,
        password=password,
        tls_context=tls_context,
    )
    async with client:
        bms = Bms(client, base)
        pump = asyncio.create_task(bms.pump())
        for sub in subscriptions:
            await client.subscribe(f"{base}/{sub}", qos=1)
        try:
            yield bms
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump


async def retained_status(
    host: str, port: int, timeout_s: float = 5.0, site: str = SITE
) -> str | None:
    """What a BMS connecting now gets on ``status`` (the retained payload), if anything."""
    async with bms_client(host, port, "status", site=site) as bms:
        with contextlib.suppress(AssertionError):
            await eventually(lambda: bool(bms.on("status")), "a retained status", timeout_s)
        got = bms.on("status")
        return got[-1].decode() if got else None
