"""Legal but suspicious settings: ``validate`` prints them (exit 0) and ``run`` logs them.

None of these makes the controller act on a wrong number, so none stops a start; each
is a setting where one more fault (a slow meter, a burst, a lost cycle) leaves no room:

- oversubscription above 2x: capping must take away more than half of what the GPUs
  could draw, so a missed cycle costs most of the headroom;
- a trip curve that allows less than three control cycles, at its first point or at the
  worst ratio the level could reach uncapped: the breaker can trip before the
  controller has seen, decided and been obeyed;
- a stale limit (a meter's ``stale_s``, an agent's) longer than the breaker allows at
  1.2x: a silent meter would be trusted past the time an overload may last;
- a level rated above its parent, GPU floors raised to a model's minimum, a device
  nobody reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.model.config import DeviceSpec, NodeDef, Problem, Site, TripCurve
from controller.model.config_semantics import level_sums
from controller.model.loader import collapse_instances
from controller.policy.escalation import allowed_s

OVERSUBSCRIPTION_WARN = 2.0
TRIP_MIN_CYCLES = 3
STALE_CHECK_RATIO = 1.2


def site_warnings(site: Site) -> list[Problem]:
    """Every warning of a valid site, in the order of the file."""
    spec = site.spec
    nodes = site.nodes
    by_id = {n.id: n for n in nodes}
    devices = {d.id: d for d in site.devices}
    sums = level_sums(spec, nodes)
    out: list[Problem] = []
    cycle_s = spec.policy.cycle_s
    agents_under = _agents_under(nodes, devices)
    for n in nodes:
        if n.kind == "gpu":
            continue
        ratio = sums[n.id].max_w / n.envelope_w
        if ratio > OVERSUBSCRIPTION_WARN:
            out.append(
                Problem(
                    f"{n.path}.envelope_w",
                    f"oversubscribed {ratio:.2f}x (every GPU at max and every baseline:"
                    f" {sums[n.id].max_w:g} W against envelope_w {n.envelope_w:g} W),"
                    f" above {OVERSUBSCRIPTION_WARN:g}x",
                )
            )
        parent = by_id.get(n.parent or "")
        if parent is not None and n.rating_w > parent.rating_w:
            out.append(
                Problem(
                    f"{n.path}.rating_w",
                    f"rating_w {n.rating_w:g} W is above its parent {parent.id!r}'s"
                    f" rating_w {parent.rating_w:g} W: the parent's breaker trips first",
                )
            )
        levels: list[tuple[str, TripCurve | None, float, Sequence[str]]] = [
            (n.path, n.trip_curve, n.rating_w, [m.device for m in n.meters])
        ]
        for s_i, src in enumerate(n.sources):
            curve = src.trip_curve
            if isinstance(curve, str):
                curve = spec.trip_curves.get(curve)
            levels.append(
                (f"{n.path}.sources[{s_i}]", curve, src.rating_w, [m.device for m in src.meters])
            )
        for where, curve, rating_w, meter_ids in levels:
            if curve is None:
                continue
            worst = min(sums[n.id].max_w / rating_w, curve.instant_ratio)
            out.extend(_trip_warnings(where, curve, worst, cycle_s))
            watchers = [*meter_ids, *agents_under.get(n.id, ())]
            out.extend(_stale_warnings(where, curve, watchers, devices))
    out.extend(_floor_warnings(site))
    out.extend(_unused_devices(site))
    return collapse_instances(out)


def render_warnings(site: Site) -> list[str]:
    """One line per warning: ``site.yaml: rows[0].envelope_w: warning: ...``."""
    return [
        Problem(p.path, f"warning: {p.message}").render(site.source) for p in site_warnings(site)
    ]


def _trip_warnings(where: str, curve: TripCurve, worst: float, cycle_s: float) -> list[Problem]:
    need_s = TRIP_MIN_CYCLES * cycle_s
    first_ratio, first_s = curve.points[0]
    if first_s < need_s:
        return [
            Problem(
                f"{where}.trip_curve",
                f"allows {first_s:g} s at {first_ratio:g}x, less than {TRIP_MIN_CYCLES}"
                f" control cycles ({need_s:g} s)",
            )
        ]
    if worst >= first_ratio and allowed_s(curve, worst) < need_s:
        return [
            Problem(
                f"{where}.trip_curve",
                f"allows {allowed_s(curve, worst):.3g} s at {worst:.2f}x (every GPU at max),"
                f" less than {TRIP_MIN_CYCLES} control cycles ({need_s:g} s)",
            )
        ]
    return []


def _stale_warnings(
    where: str, curve: TripCurve, watchers: Sequence[str], devices: dict[str, DeviceSpec]
) -> list[Problem]:
    allowance_s = allowed_s(curve, STALE_CHECK_RATIO)
    known = [devices[d] for d in watchers if d in devices]
    if not known:
        return []
    slowest = max(known, key=lambda d: d.effective_stale_s)
    if slowest.effective_stale_s <= allowance_s:
        return []
    return [
        Problem(
            where,
            f"device {slowest.id!r} counts as fresh for {slowest.effective_stale_s:g} s"
            f" (stale_s), longer than the breaker allows at {STALE_CHECK_RATIO:g}x"
            f" ({allowance_s:.3g} s)",
        )
    ]


def _agents_under(nodes: Sequence[NodeDef], devices: dict[str, DeviceSpec]) -> dict[str, list[str]]:
    """Level id -> the agent devices of the GPU servers below it."""
    out: dict[str, list[str]] = {}
    parent = {n.id: n.parent for n in nodes}
    for n in nodes:
        if n.kind != "node" or n.agent is None or n.agent not in devices:
            continue
        up = n.parent
        while up is not None:
            out.setdefault(up, []).append(n.agent)
            up = parent.get(up)
    return out


def _floor_warnings(site: Site) -> list[Problem]:
    out = []
    floor = site.policy.gpu_floor_w
    for name, model in site.gpu_models.items():
        if floor is not None and floor < model.min_w:
            out.append(
                Problem(
                    "policy.gpu_floor_w",
                    f"gpu_floor_w {floor:g} W is below GPU model {name!r}'s min_w"
                    f" {model.min_w:g} W: its GPUs are floored at min_w",
                )
            )
    for n in site.nodes:
        if n.kind == "node" and n.floor_w is not None:
            model = site.gpu_models[n.gpu_model or ""]
            if n.floor_w < model.min_w:
                out.append(
                    Problem(
                        f"{n.path}.floor_w",
                        f"floor_w {n.floor_w:g} W is below the GPU's min_w {model.min_w:g} W:"
                        " its GPUs are floored at min_w",
                    )
                )
    return out


def _unused_devices(site: Site) -> list[Problem]:
    used = {m.device for n in site.nodes for m in n.meters}
    used |= {m.device for n in site.nodes for s in n.sources for m in s.meters}
    used |= {n.agent for n in site.nodes if n.agent is not None}
    return [
        Problem(
            site.device_paths.get(d.id, "devices"),
            f"device {d.id!r} is not used by any meter or node",
        )
        for d in site.devices
        if d.id not in used
    ]
