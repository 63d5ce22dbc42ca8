"""The live simulator: plant, scheduler and workloads stepped in real time, served over
the real protocols.

``async with SimRuntime(site, seed=1) as sim:`` steps the plant every ``step_s`` of
simulated time (``time_scale`` simulated seconds per wall second) in an asyncio task, and
serves the site's meters through the frontends: one Modbus/TCP server per distinct
address of the site config (a gateway address serves its devices by unit id; a device
alone on an address gets its own port) and one SNMP agent per distinct SNMP address
(devices told apart by community). GPU servers get a fake NVML each
(:meth:`SimRuntime.fake_nvml`) backed by the same plant, for in-process node agents.

Ports are the config's by default; ``port_offset`` shifts them all, ``ephemeral=True``
lets the kernel pick (grouping stays the config's), so a test or the demo can run while
something else holds the configured ports. :meth:`SimRuntime.endpoints` says where each
device ended up.

The outside world acts on the plant through :meth:`load_step`, :meth:`lose_source`,
:meth:`restore_source`, :meth:`reclose` and :meth:`set_fault` (also reachable over the
control channel of ``rackpower sim``, :mod:`sim.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.model.config import Site
from controller.model.topology import PowerTree
from drivers.devicemap import load_snmp_map
from sim.fake_nvml import FakeGpuSpec, FakeNvml
from sim.faults import Fault, FaultTable
from sim.modbus_server import ModbusFrontend, SimModbusDevice
from sim.plant import Plant, PlantConfig, PlantState, Setpoints
from sim.plant_source import PlantSource
from sim.scheduler import JobSpec, SchedulerConfig, SimScheduler
from sim.snmp_agent import SnmpFrontend, SnmpSimDevice
from sim.workloads import InferenceServiceSpec, TrainingJobSpec

log = logging.getLogger(__name__)

MODBUS_DEFAULT_PORT = 502
SNMP_DEFAULT_PORT = 161
#: When the loop falls this many steps behind (a stalled event loop, a slow machine), the
#: backlog is dropped instead of replayed in a burst: the sim stays live, time slips.
MAX_CATCHUP_STEPS = 20

# Share of the site's GPU servers each default job takes: (class wanted, share, work hours).
_DEFAULT_TRAINING = (
    ("critical", 0.125, 20.0),
    ("training", 0.25, 12.0),
    ("training", 0.1875, 8.0),
    ("batch", 0.125, 6.0),
    ("batch", 0.125, 4.0),
)
_DEFAULT_INFERENCE_SHARE = 0.125
_MAX_INFERENCE_SCALE = 16.0  # x the Azure trace's ~5.4 requests/s


def default_workloads(
    tree: PowerTree, seed: int, classes: Sequence[str] | None = None
) -> list[JobSpec]:
    """A busy site: seeded training jobs of several priority classes on about 80 % of the
    GPU servers, plus an inference service replaying the Azure LLM trace on 1/8 of them.

    Jobs take whole servers, so at full training power racks run above their envelope
    (the oversubscription the controller exists for). Work lasts hours: a demo never
    sees them finish."""
    classes = list(classes or ("critical", "training", "inference", "batch"))
    servers = [n for n in tree.of_kind("node") if tree.gpu_range(n)[1] > tree.gpu_range(n)[0]]
    if not servers:
        return []
    per_server = tree.gpu_range(servers[0])[1] - tree.gpu_range(servers[0])[0]
    n_gpus = len(tree.gpus)
    rng = np.random.default_rng(seed)

    def cls(wanted: str) -> str:
        if wanted in classes:
            return wanted
        return classes[-1]

    def gpus_for(share: float) -> int:
        return max(per_server, int(len(servers) * share) * per_server)

    specs: list[JobSpec] = []
    used = 0
    inference_gpus = gpus_for(_DEFAULT_INFERENCE_SHARE)
    for k, (wanted, share, hours) in enumerate(_DEFAULT_TRAINING):
        gpus = gpus_for(share)
        if used + gpus + inference_gpus > n_gpus:
            break
        used += gpus
        specs.append(
            TrainingJobSpec(
                job_id=f"train-{k + 1}-{cls(wanted)}",
                gpus=gpus,
                work_s=float(hours * 3600 * rng.uniform(0.8, 1.2)),
                priority_class=cls(wanted),
                migratable=wanted != "critical",
            )
        )
    inference_gpus = min(inference_gpus, n_gpus - used) // per_server * per_server
    if inference_gpus >= 1:
        # A replica is one server (tensor parallel across its GPUs). About 2.7 requests/s
        # per replica keeps ~16 decodes in flight, near saturation; the rate is capped
        # because each request costs memory for the hour of trace generated ahead.
        replicas = inference_gpus // per_server
        specs.append(
            InferenceServiceSpec(
                job_id="inference-azure",
                gpus=inference_gpus,
                gpus_per_replica=per_server,
                priority_class=cls("inference"),
                scale=min(max(replicas / 2, 1.0), _MAX_INFERENCE_SCALE),
                daily_amplitude=0.3,
            )
        )
    return specs


class SimRuntime:
    """Plant + scheduler + workloads in real time, behind Modbus, SNMP and fake NVML."""

    def __init__(
        self,
        site_or_tree: Site | PowerTree,
        *,
        seed: int = 0,
        workloads: Sequence[JobSpec] | None = None,
        time_scale: float = 1.0,
        step_s: float = 0.1,
        faults: FaultTable | None = None,
        host: str | None = None,
        port_offset: int = 0,
        ephemeral: bool = False,
        plant_config: PlantConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be a positive number (got {time_scale})")
        if not (step_s > 0 and math.isfinite(step_s)):
            raise ValueError(f"step_s must be a positive number (got {step_s})")
        self.tree = site_or_tree if isinstance(site_or_tree, PowerTree) else PowerTree(site_or_tree)
        self.site = self.tree.site
        self.seed = seed
        self.time_scale = time_scale
        self.step_s = step_s
        self.faults = faults if faults is not None else FaultTable()
        self.host = host
        self.port_offset = port_offset
        self.ephemeral = ephemeral
        self.plant = Plant(self.tree, plant_config)
        classes = tuple(c.name for c in self.site.policy.priority_classes)
        self.scheduler = SimScheduler(
            self.tree,
            seed=seed,
            config=scheduler_config or SchedulerConfig(priority_classes=classes),
        )
        specs = default_workloads(self.tree, seed, classes) if workloads is None else workloads
        for spec in specs:
            self.scheduler.submit(spec)
        # Meters settled on the load at t=0: a tool reading before the first step sees a
        # running site, not zeros.
        self._state: PlantState = self.plant.initial_state(demand_w=self.scheduler.demand_w(0.0))
        self.source = PlantSource(self.site, self.plant, self._state)
        self._limit_generation = 0
        self._lost: frozenset[str] = frozenset()
        self._extra_w: dict[str, float] = {}
        self._extra_vec: npt.NDArray[np.float64] | None = None
        self._devices = {d.id: d for d in self.site.devices}
        self._nvml: dict[str, FakeNvml] = {}
        self.modbus: list[ModbusFrontend] = []
        self.snmp: list[SnmpFrontend] = []
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.slips = 0  # times the stepping loop fell behind and dropped its backlog

    # -- the plant loop ----------------------------------------------------------------

    @property
    def state(self) -> PlantState:
        return self._state

    @property
    def t_s(self) -> float:
        return self._state.t_s

    def step(self, n: int = 1) -> PlantState:
        """Advance ``n`` steps now (the task does this in real time; tests may call it)."""
        for _ in range(n):
            t = self._state.t_s
            self._limit_generation, limits = self.source.take_limits(self._limit_generation)
            demand = self.scheduler.demand_w(t)
            state = self.plant.step(
                self._state,
                Setpoints(demand, limits, self._lost, extra_load_w=self._extra_vec),
                self.step_s,
            )
            self.scheduler.advance(t, self.step_s, state.gpu_power_w, state.dark_gpu)
            self.source.update(state)
            self._state = state
            self.steps += 1
        return self._state

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wall0, sim0 = loop.time(), self._state.t_s
        while True:
            target = sim0 + (loop.time() - wall0) * self.time_scale
            n = 0
            while self._state.t_s + self.step_s / 2 <= target:
                if n >= MAX_CATCHUP_STEPS:
                    self.slips += 1
                    log.warning("simulator fell behind real time at t=%.1f s", self._state.t_s)
                    wall0, sim0 = loop.time(), self._state.t_s
                    break
                self.step()
                n += 1
            due = wall0 + (self._state.t_s + self.step_s - sim0) / self.time_scale
            await asyncio.sleep(max(0.0, due - loop.time()))

    # -- frontends ---------------------------------------------------------------------

    def _port(self, port: int) -> int:
        return 0 if self.ephemeral else port + self.port_offset

    def _modbus_frontends(self) -> list[ModbusFrontend]:
        devices = [d for d in self.site.devices if d.driver == "modbus" and d.map]
        shared: dict[str, int] = {}
        for d in devices:
            shared[d.address or ""] = shared.get(d.address or "", 0) + 1
        by_host: dict[str, list[SimModbusDevice]] = {}
        for d in devices:
            if d.tls:
                log.warning("%s: Modbus/TCP over TLS is served in plain TCP by the sim", d.id)
            host, port = d.host_port(MODBUS_DEFAULT_PORT)
            address = d.address or ""
            by_host.setdefault(self.host or host, []).append(
                SimModbusDevice(
                    device_id=d.id,
                    map_name=d.map or "",
                    unit_id=d.modbus_unit_id,
                    port=self._port(port),
                    gateway=address if shared[address] > 1 else None,
                )
            )
        return [
            ModbusFrontend(devs, self.source, self.faults, host=h) for h, devs in by_host.items()
        ]

    def _snmp_frontends(self) -> list[SnmpFrontend]:
        groups: dict[tuple[str, int], list[SnmpSimDevice]] = {}
        for d in self.site.devices:
            if d.driver != "snmp" or not d.map:
                continue
            if d.snmp_version == "3":
                log.warning(
                    "%s: the sim's SNMP agent speaks v2c only; v3 requests go unanswered", d.id
                )
            host, port = d.host_port(SNMP_DEFAULT_PORT)
            community = (
                d.community
                or (os.environ.get(d.community_env) if d.community_env else None)
                or "public"
            )
            groups.setdefault((self.host or host, port), []).append(
                SnmpSimDevice(d.id, load_snmp_map(d.map), community)
            )
        return [
            SnmpFrontend(devs, self.source, self.faults, host=h, port=self._port(p))
            for (h, p), devs in groups.items()
        ]

    async def start(self) -> None:
        """Open every frontend, then start stepping. A port that cannot be bound raises
        OSError naming it (use ``ephemeral`` or ``port_offset``)."""
        if self._task is not None:
            return
        try:
            for fe in self._modbus_frontends():
                self.modbus.append(fe)  # before start: a half-started one is stopped too
                try:
                    await fe.start()
                except (OSError, RuntimeError) as exc:
                    ports = ", ".join(str(s.port) for s in fe.servers)
                    raise OSError(
                        f"cannot open Modbus port(s) {ports} on {fe.host}: {exc}"
                    ) from exc
            for sfe in self._snmp_frontends():
                self.snmp.append(sfe)
                try:
                    await sfe.start()
                except OSError as exc:
                    raise OSError(
                        f"cannot open SNMP port {sfe.port} on {sfe.host}: {exc.strerror or exc}"
                    ) from exc
        except OSError:
            await self._stop_frontends()
            raise
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-plant")

    async def _stop_frontends(self) -> None:
        for fe in self.modbus:
            with contextlib.suppress(Exception):
                await fe.stop()
        for sfe in self.snmp:
            with contextlib.suppress(Exception):
                await sfe.stop()
        self.modbus.clear()
        self.snmp.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_frontends()

    async def wait(self) -> None:
        """Return only if the stepping task dies (its exception is raised here)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aenter__(self) -> SimRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def endpoints(self) -> list[dict[str, Any]]:
        """Where each served device answers: ``device``, ``protocol``, ``host``, ``port``,
        ``unit_id`` (Modbus) or ``community`` (SNMP), and ``probe``: ``{"address": N}`` of
        a holding register (with its point, type and word order) or ``{"oid": ...}``."""
        out: list[dict[str, Any]] = []
        for fe in self.modbus:
            out.extend(e.to_json() for e in fe.endpoints())
        for sfe in self.snmp:
            for view in sfe.responder.views.values():
                dev = view.device
                oid = sfe.probe_oid(dev.device_id)
                out.append(
                    {
                        "device": dev.device_id,
                        "protocol": "snmp",
                        "host": sfe.host,
                        "port": sfe.port,
                        "community": dev.community,
                        "probe": {"oid": oid, "point": dev.map.by_oid().get(oid, "")},
                    }
                )
        order = {d.id: k for k, d in enumerate(self.site.devices)}
        out.sort(key=lambda e: order.get(e["device"], len(order)))
        return out

    def served_site(self) -> Site:
        """The site with each served device's address where the sim serves it (ephemeral
        ports, an offset, ``host``): what a controller in the same process polls."""
        where = {}
        for e in self.endpoints():
            host = f"[{e['host']}]" if ":" in e["host"] else e["host"]
            where[e["device"]] = f"{host}:{e['port']}"
        devices = tuple(
            d.model_copy(update={"address": where[d.id]}) if d.id in where else d
            for d in self.site.devices
        )
        return dataclasses.replace(self.site, devices=devices)

    # -- fake NVML ---------------------------------------------------------------------

    def fake_nvml(self, node_id: str) -> FakeNvml:
        """The NVML of GPU server ``node_id``: its GPUs ``<node>-g<k>`` read the plant,
        and a limit set through it becomes the plant's limit request (the plant models
        the actuation delay, so the fake applies at once). One instance per node."""
        nvml = self._nvml.get(node_id)
        if nvml is None:
            node = self.tree.node(node_id)
            if node.kind != "node" or node.gpus == 0:
                raise KeyError(f"{node_id!r} is not a GPU server")
            first, stop = self.tree.gpu_range(node_id)
            specs = [
                FakeGpuSpec(g.id, f"GPU-sim-{g.id}", g.min_w, g.max_w, g.default_w)
                for g in self.tree.gpus[first:stop]
            ]
            nvml = FakeNvml(specs, self.source, faults=self.faults, actuation_delay_s=0.0)
            self._nvml[node_id] = nvml
        return nvml

    def gpu_servers(self) -> tuple[str, ...]:
        return tuple(n for n in self.tree.of_kind("node") if self.tree.node(n).gpus > 0)

    # -- acting on the plant ---------------------------------------------------------------

    def load_step(self, scale: float) -> None:
        """Scale every GPU's uncapped demand (1.0 = the workloads as they are)."""
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"load scale must be a non-negative number (got {scale})")
        self.scheduler.demand_scale = scale

    @property
    def load_scale(self) -> float:
        return self.scheduler.demand_scale

    def lose_source(self, source_id: str) -> None:
        """Feed source ``source_id`` (A or B of a redundant feed) goes dead."""
        if source_id not in self.plant.source_index:
            raise KeyError(f"no feed source {source_id!r} (known: {list(self.plant.source_ids)})")
        self._lost = self._lost | {source_id}

    def restore_source(self, source_id: str) -> None:
        if source_id not in self.plant.source_index:
            raise KeyError(f"no feed source {source_id!r} (known: {list(self.plant.source_ids)})")
        self._lost = self._lost - {source_id}

    @property
    def lost_sources(self) -> frozenset[str]:
        return self._lost

    def set_extra_load(self, node_id: str, power_w: float) -> None:
        """Load no cap reaches at a tree node from now on (0 removes it).

        It stands for what the config does not know: a cooling fault running a server's
        fans flat out, kit plugged into a rack unmetered. The meters see it, the agents do
        not, so the controller reads it as unexplained load; large enough, no cap clears it.
        """
        if node_id not in self.plant.node_index:
            raise KeyError(f"no tree node {node_id!r} in site {self.site.name!r}")
        if not (power_w >= 0 and math.isfinite(power_w)):
            raise ValueError(f"extra load must be a non-negative number of watts (got {power_w})")
        if power_w > 0:
            self._extra_w[node_id] = float(power_w)
        else:
            self._extra_w.pop(node_id, None)
        self._extra_vec = self.plant.node_vector(self._extra_w)

    @property
    def extra_load_w(self) -> dict[str, float]:
        return dict(self._extra_w)

    def reclose(self, element_ids: Sequence[str] | None = None) -> list[str]:
        """Reset tripped breakers (all of them by default); returns those reset."""
        tripped = sorted(self.plant.tripped_ids(self._state))
        ids = tripped if element_ids is None else [e for e in element_ids if e in tripped]
        if ids:
            self._state = self.plant.reclose(self._state, ids)
            self.source.update(self._state)
        return ids

    def fault_targets(self) -> frozenset[str]:
        """Ids a fault can be set on: served devices and GPUs."""
        return frozenset(self._devices) | frozenset(self.tree.gpu_index)

    def set_fault(self, device_id: str, fault: Fault | None) -> None:
        """Switch a fault on (or off with None) for a device or a GPU, at once."""
        if device_id not in self.fault_targets():
            raise KeyError(f"no device or GPU {device_id!r} in site {self.site.name!r}")
        self.faults.set(device_id, fault)

    def value(self, device_id: str, point: str) -> float | None:
        """What the device serves for ``point`` right now (engineering units of its map)."""
        return self.source.value(device_id, point)

    def summary(self) -> dict[str, Any]:
        """The plant at a glance, for the control channel."""
        st = self._state
        return {
            "t_s": round(st.t_s, 3),
            "time_scale": self.time_scale,
            "steps": self.steps,
            "slips": self.slips,
            "load_scale": self.load_scale,
            "feed_power_w": round(st.feed_power_w, 1),
            "gpu_total_w": round(st.gpu_total_w, 1),
            "lost_sources": sorted(self._lost),
            "extra_load_w": self.extra_load_w,
            "tripped": sorted(self.plant.tripped_ids(st)),
            "jobs": len(self.scheduler.jobs()),
            "faults": {
                k: {"kind": f.kind.value, "delay_s": f.delay_s, "exception_code": f.exception_code}
                for k, f in self.faults.active().items()
            },
            "node_power_w": {k: round(v, 1) for k, v in self.plant.node_power(st).items()},
        }
