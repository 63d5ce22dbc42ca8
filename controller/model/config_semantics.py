"""Whole-site rules on meaning: every number the controller acts on has the right unit,
a feasible value and one owner.

The schema (``controller.model.config``) checks that a number is a number in range; these rules
check what a number *means* against the rest of the site, because each mistake here makes
the controller act on a wrong figure without any error at run time:

- a meter on a point that is not a power in W (it would read volts as watts);
- a level that cannot be held inside its envelope even with every GPU at its floor
  and every baseline on (the controller would cap to the floor and still overload);
- one physical device under two ids (its power counted twice, or polled twice);
- a meter listed twice on one node (summed twice);
- GPU power limits that no GPU has (a 9,000 "W" limit was written in mW or for a rack);
- a site-wide GPU floor above a model's maximum (silently clamped: the floor sums lie);
- a lease shorter than two cycles (every agent falls into failsafe between renewals);
- a node's agent that is not an agent, a scheduler view that is stale on arrival.

Legal but suspicious settings are warnings, in :mod:`controller.cli.config_warnings`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.model.config import DeviceSpec, NodeDef, Problem, SiteSpec, floor_draw_w
from controller.model.devices import DEFAULT_PORTS
from controller.model.wire_limits import MAX_LEASE_S

# No GPU's NVML power limit is near this; a value above it is a unit slip (mW, or a rack).
MAX_GPU_W = 5000.0
POWER_UNIT = "W"
AGENT_DRIVERS = ("agent", "nvml", "sim")


@dataclass
class LevelSums:
    """What a tree level carries: at least (floors and baselines), at most (every GPU at max)."""

    floor_w: float = 0.0
    max_w: float = 0.0


def level_sums(spec: SiteSpec, nodes: Sequence[NodeDef]) -> dict[str, LevelSums]:
    """Floor and maximum draw under every level (GPU servers included), in one pass.

    Children are built after their parents, so walking the list backwards adds each
    finished child into its parent.
    """
    sums = {n.id: LevelSums() for n in nodes if n.kind != "gpu"}
    for n in reversed(nodes):
        if n.kind == "gpu":
            continue
        own = sums[n.id]
        if n.kind == "node":
            model = spec.gpu_models[n.gpu_model or ""]
            own.floor_w = floor_draw_w(spec, n)
            own.max_w = n.baseline_w + n.gpus * model.max_w
        parent = sums.get(n.parent or "")
        if parent is not None:
            parent.floor_w += own.floor_w
            parent.max_w += own.max_w
    return sums


def check_semantics(
    spec: SiteSpec,
    nodes: Sequence[NodeDef],
    devices: Sequence[DeviceSpec],
    device_paths: Mapping[str, str],
    point_units: Mapping[str, Mapping[str, str]],
) -> list[Problem]:
    """Every rule above; ``point_units`` is device id -> point name -> unit from its map."""
    return [
        *_gpu_models(spec),
        *_policy(spec),
        *_floors(spec, nodes),
        *_meters(nodes, point_units),
        *_agents(nodes, devices),
        *_same_device(devices, device_paths),
    ]


def _gpu_models(spec: SiteSpec) -> list[Problem]:
    problems = []
    floor = spec.policy.gpu_floor_w
    for name, model in spec.gpu_models.items():
        if model.max_w > MAX_GPU_W:
            problems.append(
                Problem(
                    f"gpu_models.{name}.max_w",
                    f"max_w {model.max_w:g} W is not a GPU power limit (above"
                    f" {MAX_GPU_W:g} W): is it in mW, or the whole server's?",
                )
            )
        if floor is not None and floor > model.max_w:
            problems.append(
                Problem(
                    "policy.gpu_floor_w",
                    f"gpu_floor_w {floor:g} W is above GPU model {name!r}'s max_w"
                    f" {model.max_w:g} W: no cap can honour it",
                )
            )
    return problems


def _policy(spec: SiteSpec) -> list[Problem]:
    p = spec.policy
    problems = []
    if p.lease_s < 2 * p.cycle_s:
        problems.append(
            Problem(
                "policy.lease_s",
                f"lease_s {p.lease_s:g} s is shorter than two cycles ({2 * p.cycle_s:g} s):"
                " agents would fall into their failsafe cap between renewals",
            )
        )
    if p.lease_s > MAX_LEASE_S:
        problems.append(
            Problem(
                "policy.lease_s",
                f"lease_s {p.lease_s:g} s is above the longest lease agents accept"
                f" ({MAX_LEASE_S:g} s)",
            )
        )
    sched = spec.integrations.scheduler
    if sched.kind != "none" and sched.stale_after_s < sched.poll_s:
        problems.append(
            Problem(
                "integrations.scheduler.stale_after_s",
                f"stale_after_s {sched.stale_after_s:g} s is shorter than poll_s"
                f" {sched.poll_s:g} s: every job list would be stale when it arrives",
            )
        )
    return problems


def _floors(spec: SiteSpec, nodes: Sequence[NodeDef]) -> list[Problem]:
    """Every level must hold its floors inside its envelope (A/B sources: _check_redundancy)."""
    problems = []
    sums = level_sums(spec, nodes)
    for n in nodes:
        if n.kind == "gpu":
            continue
        if n.kind == "node" and n.baseline_w > n.rating_w:
            problems.append(
                Problem(
                    f"{n.path}.baseline_w",
                    f"baseline_w {n.baseline_w:g} W is above the node's rating_w {n.rating_w:g} W",
                )
            )
            continue
        must = sums[n.id].floor_w
        if must > n.envelope_w:
            problems.append(
                Problem(
                    f"{n.path}.envelope_w",
                    f"{n.kind} {n.id!r} cannot be held inside envelope_w {n.envelope_w:g} W"
                    f" even with every GPU at its floor: {must:g} W of baseline and GPU"
                    " floors under it",
                )
            )
    return problems


def _meters(
    nodes: Sequence[NodeDef], point_units: Mapping[str, Mapping[str, str]]
) -> list[Problem]:
    problems = []
    for n in nodes:
        meters = [(f"{n.path}.meters", n.meters)]
        meters += [
            (f"{n.path}.sources[{i}].meters", tuple(s.meters)) for i, s in enumerate(n.sources)
        ]
        for base, group in meters:
            seen: dict[tuple[str, str], int] = {}
            for k, m in enumerate(group):
                where = f"{base}[{k}]"
                first = seen.setdefault((m.device, m.point), k)
                if first != k:
                    problems.append(
                        Problem(
                            where,
                            f"device {m.device!r} point {m.point!r} is already meter [{first}]"
                            " of this node: it would be counted twice",
                        )
                    )
                unit = point_units.get(m.device, {}).get(m.point)
                if unit is not None and unit != POWER_UNIT:
                    shown = repr(unit) if unit else "no unit"
                    problems.append(
                        Problem(
                            f"{where}.point",
                            f"point {m.point!r} of device {m.device!r} is in {shown}, not W:"
                            " a meter must measure power",
                        )
                    )
    return problems


def _agents(nodes: Sequence[NodeDef], devices: Sequence[DeviceSpec]) -> list[Problem]:
    drivers = {d.id: d.driver for d in devices}
    problems = []
    for n in nodes:
        if n.kind != "node" or n.agent is None or n.agent not in drivers:
            continue
        if drivers[n.agent] not in AGENT_DRIVERS:
            problems.append(
                Problem(
                    f"{n.path}.agent",
                    f"device {n.agent!r} is a {drivers[n.agent]} device, not a node agent"
                    f" (driver: {', '.join(AGENT_DRIVERS)})",
                )
            )
    return problems


def device_identity(d: DeviceSpec) -> tuple[object, ...] | None:
    """What one physical device (or one virtual agent behind a shared port) is known by.

    Modbus: the gateway's host and port plus the unit id. SNMP: host and port plus the
    community (or its variable) for v2c, the user for v3 (one agent serves many PDUs by
    community on the simulator and on some gateways). Other drivers have no address.
    """
    if d.address is None or d.driver not in DEFAULT_PORTS:
        return None
    host, port = d.host_port(DEFAULT_PORTS[d.driver])
    host = host.lower().rstrip(".")
    if d.driver == "modbus":
        return ("modbus", host, port, d.modbus_unit_id)
    if d.snmp_version == "3":
        return ("snmp", host, port, "v3", d.v3_user)
    who = f"env:{d.community_env}" if d.community_env else (d.community or "public")
    return ("snmp", host, port, "v2c", who)


def _same_device(devices: Sequence[DeviceSpec], device_paths: Mapping[str, str]) -> list[Problem]:
    problems = []
    first: dict[tuple[object, ...], DeviceSpec] = {}
    for d in devices:
        key = device_identity(d)
        if key is None:
            continue
        other = first.setdefault(key, d)
        if other is not d and other.id != d.id:
            what = "unit_id" if d.driver == "modbus" else "community/user"
            problems.append(
                Problem(
                    device_paths.get(d.id, "devices"),
                    f"device {d.id!r} is the same physical device as {other.id!r}"
                    f" (at {device_paths.get(other.id, 'devices')}): same address and {what}",
                )
            )
    return problems
