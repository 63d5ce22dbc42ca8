"""Loading a site: read the YAML, validate the spec, expand the generators, check the whole.

Apart from the models in :mod:`controller.model.config` so the whole-site rules
(here and in :mod:`controller.model.config_semantics`) can build on the models without an
import circle: models <- semantic rules <- loader.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from controller.model.config import (
    ConfigError,
    DeviceSpec,
    Kind,
    NodeDef,
    NodeSpec,
    Problem,
    RackSpec,
    Site,
    SiteSpec,
    TripCurve,
    agent_auth_problems,
    floor_draw_w,
    format_loc,
    split_address,
)
from controller.model.config_semantics import check_semantics
from controller.model.secrets import redact_url
from drivers.devicemap import DeviceMapError, ModbusMap, SnmpMap, load_map

# ---------------------------------------------------------------------------
# Generators


class _PatternError(ValueError):
    pass


def expand_pattern(pattern: str, context: Mapping[str, object]) -> str:
    """Fill ``{i:03d}``-style fields from ``context``; an unknown name is a clear error."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise _PatternError(f"bad pattern {pattern!r}: {exc}") from exc
    for name in fields:
        base = name.split(".")[0].split("[")[0]
        if base not in context:
            known = ", ".join(sorted(context))
            raise _PatternError(
                f"pattern {pattern!r} uses {{{base}}}, which is not defined here (known: {known})"
            )
    try:
        return pattern.format_map(dict(context))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise _PatternError(f"bad pattern {pattern!r}: {exc}") from exc


def _instances(
    spec_id: str, count: int | None, start: int, context: Mapping[str, object]
) -> list[tuple[str, dict[str, object]]]:
    """The (id, context) of each instance a generator entry stands for (one if no count)."""
    out: list[tuple[str, dict[str, object]]] = []
    for k in range(count or 1):
        ctx = dict(context)
        if count is not None:
            ctx["i"] = start + k
            ctx["i0"] = k
        out.append((expand_pattern(spec_id, ctx), ctx))
    return out


def _fill(value: Any, ctx: Mapping[str, object]) -> Any:
    """Expand patterns in every string of a nested spec dump (numbers are left alone)."""
    if isinstance(value, str):
        return expand_pattern(value, ctx)
    if isinstance(value, list):
        return [_fill(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ctx) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read: {exc.strerror}")]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [Problem(where, f"not valid YAML: {problem}")]) from exc


def pydantic_problems(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [*prefix, *err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            shown = redact_url(err["input"]) if isinstance(err["input"], str) else err["input"]
            msg = f"{msg} (got {shown!r})"
        problems.append(Problem(format_loc(loc), msg))
    return problems


def parse_site(data: Any, source: str = "<config>") -> Site:
    """Validate a parsed YAML document into a :class:`Site` or raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the file must be a mapping (key: value) at top")])
    try:
        spec = SiteSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, pydantic_problems(exc)) from None
    return _build(spec, source)


def load_site(path: str | Path) -> Site:
    """Read, validate and expand a site file; every error names the file and path."""
    p = Path(path)
    return parse_site(_read_yaml(p), str(p))


class _Builder:
    """Expands generators and collects problems instead of stopping at the first."""

    def __init__(self, spec: SiteSpec) -> None:
        self.spec = spec
        self.problems: list[Problem] = []
        self.nodes: list[NodeDef] = []
        self.devices: list[DeviceSpec] = []
        self.device_paths: dict[str, str] = {}
        self.bad_templates: set[str] = set()

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def curve(self, value: TripCurve | str | None, path: str) -> TripCurve | None:
        if value is None or isinstance(value, TripCurve):
            return value
        if value not in self.spec.trip_curves:
            known = ", ".join(sorted(self.spec.trip_curves)) or "none defined"
            self.problem(f"{path}.trip_curve", f"unknown trip curve {value!r} (known: {known})")
            return None
        return self.spec.trip_curves[value]

    def expand(
        self,
        spec: Any,
        path: str,
        ctx: Mapping[str, object],
        name: str,
    ) -> list[tuple[Any, str, dict[str, object]]]:
        """Instances of a generator entry as validated copies with patterns filled in.

        Inside an entry, ``{i}`` is the instance number, ``{<name>}`` (``{rack}``,
        ``{row}``, ...) the instance's own id and ``{<name>_i}`` its number, so
        ``pdu-{rack}`` names its meter; entries below see their ancestors' names too.
        """
        try:
            instances = _instances(spec.id, spec.count, spec.start, ctx)
        except _PatternError as exc:
            self.problem(f"{path}.id", str(exc))
            return []
        out: list[tuple[Any, str, dict[str, object]]] = []
        dump = spec.model_dump(exclude={"count", "start", "id", "racks", "nodes", "devices"})
        for inst_id, ictx in instances:
            where = path if spec.count is None else f"{path}[id={inst_id}]"
            ictx[name] = inst_id
            ictx[f"{name}_i"] = ictx.get("i", 0)
            try:
                filled = _fill(dump, ictx)
            except _PatternError as exc:
                self.problem(where, str(exc))
                continue
            try:
                inst = type(spec).model_validate({**filled, "id": inst_id})
            except ValidationError as exc:
                for prob in pydantic_problems(exc):
                    self.problem(f"{where}.{prob.path}", prob.message)
                continue
            out.append((inst, where, ictx))
        return out

    def add_devices(
        self, specs: Sequence[DeviceSpec], path: str, ctx: Mapping[str, object]
    ) -> None:
        for d_i, dspec in enumerate(specs):
            for dev, where, _ in self.expand(dspec, f"{path}[{d_i}]", ctx, "device"):
                self.devices.append(dev)
                self.device_paths.setdefault(dev.id, where)

    def add_tree_node(self, kind: Kind, spec: Any, parent: str | None, where: str) -> NodeDef:
        node = NodeDef(
            id=spec.id,
            kind=kind,
            parent=parent,
            rating_w=spec.rating_w,
            envelope_w=spec.envelope_w,
            path=where,
            trip_curve=self.curve(spec.trip_curve, where),
            meters=tuple(spec.meters),
            efficiency=spec.efficiency,
            sources=tuple(getattr(spec, "sources", ())),
        )
        self.nodes.append(node)
        return node

    def rack_spec(self, raw: Mapping[str, Any], path: str) -> RackSpec | None:
        """Merge a rack entry over its template (the entry's own keys win), then validate."""
        name = raw.get("template")
        merged = dict(raw)
        if name is not None:
            tmpl = self.spec.rack_templates.get(str(name))
            if tmpl is None:
                known = ", ".join(sorted(self.spec.rack_templates)) or "none defined"
                self.problem(f"{path}.template", f"unknown rack template {name!r} (known: {known})")
                return None
            if str(name) in self.bad_templates:
                return None  # already reported at rack_templates.NAME
            merged = {**tmpl, **raw}
        try:
            return RackSpec.model_validate(merged)
        except ValidationError as exc:
            where = f" (rack uses template {name!r})" if name is not None else ""
            for p in pydantic_problems(exc):
                self.problem(f"{path}.{p.path}", p.message + where)
            return None

    def build(self) -> None:
        spec = self.spec
        # Template bodies are checked on their own so an error points at the template.
        for name, body in spec.rack_templates.items():
            try:
                RackSpec.model_validate({"id": "template", **body})
            except ValidationError as exc:
                self.bad_templates.add(name)
                self.problems.extend(pydantic_problems(exc, ("rack_templates", name)))
        self.add_devices(spec.devices, "devices", {})
        for f_i, fspec in enumerate(spec.feeds):
            for feed, where, _ in self.expand(fspec, f"feeds[{f_i}]", {}, "feed"):
                self.add_tree_node("feed", feed, None, where)
                for s_i, src in enumerate(feed.sources):
                    self.curve(src.trip_curve, f"{where}.sources[{s_i}]")
        for kind, key, specs in (("sst", "ssts", spec.ssts), ("bus", "buses", spec.buses)):
            for c_i, cspec in enumerate(specs):
                for child, where, _ in self.expand(cspec, f"{key}[{c_i}]", {}, kind):
                    self.add_tree_node(kind, child, child.parent, where)  # type: ignore[arg-type]
        for r_i, rspec in enumerate(spec.rows):
            for row, rwhere, rctx in self.expand(rspec, f"rows[{r_i}]", {}, "row"):
                self.add_tree_node("row", row, row.parent, rwhere)
                self.build_racks(rspec.racks, f"rows[{r_i}]", row.id, rctx)

    def build_racks(
        self, racks: Sequence[Mapping[str, Any]], path: str, row_id: str, rctx: Mapping[str, object]
    ) -> None:
        row_ctx = {"row": row_id, "row_i": rctx.get("i", 0)}
        for k_i, raw in enumerate(racks):
            kpath = f"{path}.racks[{k_i}]"
            kspec = self.rack_spec(raw, kpath)
            if kspec is None:
                continue
            for rack, kwhere, kctx in self.expand(kspec, kpath, row_ctx, "rack"):
                self.add_tree_node("rack", rack, row_id, kwhere)
                rack_ctx = {**row_ctx, "rack": rack.id, "rack_i": kctx.get("i", 0)}
                self.add_devices(kspec.devices, f"{kpath}.devices", rack_ctx)
                for n_i, nspec in enumerate(kspec.nodes):
                    self.build_nodes(nspec, f"{kpath}.nodes[{n_i}]", rack.id, rack_ctx)

    def build_nodes(
        self, nspec: NodeSpec, path: str, rack_id: str, ctx: Mapping[str, object]
    ) -> None:
        model = self.spec.gpu_models.get(nspec.gpu_model)
        if model is None:
            known = ", ".join(sorted(self.spec.gpu_models))
            self.problem(
                f"{path}.gpu_model", f"unknown GPU model {nspec.gpu_model!r} (known: {known})"
            )
            return
        for node, where, _ in self.expand(nspec, path, ctx, "node"):
            max_draw = node.baseline_w + node.gpus * model.max_w
            rating = node.rating_w if node.rating_w is not None else max_draw
            envelope = node.envelope_w if node.envelope_w is not None else rating
            self.nodes.append(
                NodeDef(
                    id=node.id,
                    kind="node",
                    parent=rack_id,
                    rating_w=rating,
                    envelope_w=envelope,
                    path=where,
                    meters=tuple(node.meters),
                    gpus=node.gpus,
                    gpu_model=node.gpu_model,
                    baseline_w=node.baseline_w,
                    floor_w=node.floor_w,
                    agent=node.agent,
                )
            )
            for g in range(node.gpus):
                self.nodes.append(
                    NodeDef(
                        id=f"{node.id}-g{g}",
                        kind="gpu",
                        parent=node.id,
                        rating_w=model.max_w,
                        envelope_w=model.max_w,
                        path=f"{where}.gpus[{g}]",
                        gpu_model=node.gpu_model,
                        floor_w=node.floor_w,
                        agent=node.agent,
                    )
                )


def _build(spec: SiteSpec, source: str) -> Site:
    b = _Builder(spec)
    b.build()
    if not b.problems:
        b.problems.extend(check_site(spec, b.nodes, b.devices, b.device_paths))
    if b.problems:
        raise ConfigError(source, collapse_instances(b.problems))
    return Site(
        name=spec.site,
        source=source,
        spec=spec,
        nodes=tuple(b.nodes),
        devices=tuple(b.devices),
        device_paths=b.device_paths,
    )


_INSTANCE = re.compile(r"\[id=[^\]]*\]")


def collapse_instances(problems: Sequence[Problem]) -> list[Problem]:
    """A generator repeats one mistake in every instance: report it once, with a count."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((_INSTANCE.sub("[id=*]", p.path), p.message), []).append(p)
    out = []
    for group in groups.values():
        first = group[0]
        more = f" (and {len(group) - 1} more instances)" if len(group) > 1 else ""
        out.append(Problem(first.path, first.message + more))
    return out


# ---------------------------------------------------------------------------
# Whole-site rules

_PARENT_KIND: dict[str, tuple[str, ...]] = {
    "sst": ("feed",),
    "bus": ("sst", "feed"),
    "row": ("bus", "sst", "feed"),
}


def check_site(
    spec: SiteSpec,
    nodes: Sequence[NodeDef],
    devices: Sequence[DeviceSpec],
    device_paths: Mapping[str, str],
) -> list[Problem]:
    """Rules that need the whole expanded site; returns every problem found."""
    problems: list[Problem] = []
    by_id: dict[str, NodeDef] = {}
    for n in nodes:
        if n.id in by_id:
            problems.append(Problem(n.path, f"duplicate id {n.id!r} (first at {by_id[n.id].path})"))
        else:
            by_id[n.id] = n
    dev_ids: dict[str, str] = {}
    for d in devices:
        where = device_paths.get(d.id, "devices")
        if d.id in dev_ids and dev_ids[d.id] != where:
            problems.append(
                Problem(where, f"duplicate device id {d.id!r} (first at {dev_ids[d.id]})")
            )
        dev_ids.setdefault(d.id, where)
        if d.address:
            try:
                split_address(d.address, 1)
            except ValueError:
                shown = redact_url(d.address)
                problems.append(Problem(f"{where}.address", f"not host:port: {shown!r}"))
    source_ids = {s.id for n in nodes for s in n.sources}
    for sid in source_ids & set(by_id):
        problems.append(Problem(by_id[sid].path, f"id {sid!r} is also a feed source id"))

    for n in nodes:
        if n.envelope_w > n.rating_w:
            problems.append(
                Problem(
                    f"{n.path}.envelope_w",
                    f"envelope_w {n.envelope_w:g} W exceeds rating_w {n.rating_w:g} W",
                )
            )
        if n.parent is not None:
            parent = by_id.get(n.parent)
            if parent is None:
                problems.append(Problem(f"{n.path}.parent", f"unknown parent {n.parent!r}"))
            else:
                allowed = _PARENT_KIND.get(n.kind)
                if allowed and parent.kind not in allowed:
                    problems.append(
                        Problem(
                            f"{n.path}.parent",
                            f"a {n.kind} cannot hang below {parent.kind} {parent.id!r}"
                            f" (expected one of: {', '.join(allowed)})",
                        )
                    )
                if n.kind != "gpu" and n.envelope_w > parent.envelope_w:
                    problems.append(
                        Problem(
                            f"{n.path}.envelope_w",
                            f"envelope_w {n.envelope_w:g} W is above its parent {parent.id!r}'s"
                            f" envelope_w {parent.envelope_w:g} W",
                        )
                    )
        for m_i, meter in enumerate(n.meters):
            if meter.device not in dev_ids:
                problems.append(
                    Problem(f"{n.path}.meters[{m_i}].device", f"unknown device {meter.device!r}")
                )
        if n.kind == "node" and n.agent is not None and n.agent not in dev_ids:
            problems.append(Problem(f"{n.path}.agent", f"unknown device {n.agent!r}"))
        if n.kind == "gpu" and n.floor_w is not None:
            model = spec.gpu_models[n.gpu_model or ""]
            if n.floor_w > model.max_w:
                problems.append(
                    Problem(
                        n.path,
                        f"floor_w {n.floor_w:g} W is above the GPU's max_w {model.max_w:g} W",
                    )
                )

    problems.extend(_check_redundancy(spec, nodes, by_id, dev_ids))
    point_units: dict[str, dict[str, str]] = {}
    problems.extend(_check_maps(nodes, devices, device_paths, point_units))
    problems.extend(check_semantics(spec, nodes, devices, device_paths, point_units))
    problems.extend(agent_auth_problems(spec, nodes))
    return problems


def _check_maps(
    nodes: Sequence[NodeDef],
    devices: Sequence[DeviceSpec],
    device_paths: Mapping[str, str],
    point_units: dict[str, dict[str, str]],
) -> list[Problem]:
    """Each device's map exists and speaks its protocol; each meter names a point of it.

    Fills ``point_units`` (device id -> point -> unit) for the unit rules.
    """
    problems: list[Problem] = []
    points: dict[str, set[str]] = {}
    maps: dict[str, ModbusMap | SnmpMap | DeviceMapError] = {}
    for d in devices:
        if d.map is None:
            continue
        where = device_paths.get(d.id, "devices")
        if d.map not in maps:  # a hall has a thousand PDUs of one model
            try:
                maps[d.map] = load_map(d.map)
            except DeviceMapError as exc:
                maps[d.map] = exc
        dmap = maps[d.map]
        if isinstance(dmap, DeviceMapError):
            problems.append(Problem(f"{where}.map", str(dmap).splitlines()[-1].strip()))
            continue
        if dmap.protocol != d.driver:
            problems.append(
                Problem(f"{where}.map", f"map {d.map!r} is for {dmap.protocol}, not {d.driver}")
            )
        points[d.id] = set(dmap.point_names())
        point_units[d.id] = {name: p.unit for name, p in dmap.points.items()}
    for n in nodes:
        meters = [(f"{n.path}.meters[{k}]", m) for k, m in enumerate(n.meters)]
        for s_i, src in enumerate(n.sources):
            meters += [
                (f"{n.path}.sources[{s_i}].meters[{k}]", m) for k, m in enumerate(src.meters)
            ]
        for where, m in meters:
            known = points.get(m.device)
            if known is not None and m.point not in known:
                problems.append(
                    Problem(
                        f"{where}.point",
                        f"device {m.device!r} has no point {m.point!r} in its map",
                    )
                )
    return problems


def _check_redundancy(
    spec: SiteSpec,
    nodes: Sequence[NodeDef],
    by_id: Mapping[str, NodeDef],
    dev_ids: Mapping[str, str],
) -> list[Problem]:
    """Each source of an A/B feed must alone carry what the controller cannot shed."""
    problems: list[Problem] = []
    children: dict[str, list[NodeDef]] = {}
    for n in nodes:
        if n.parent is not None:
            children.setdefault(n.parent, []).append(n)

    def floor_under(node_id: str) -> float:
        total = 0.0
        stack = [node_id]
        while stack:
            nid = stack.pop()
            for c in children.get(nid, []):
                if c.kind == "node":
                    total += floor_draw_w(spec, c)
                elif c.kind != "gpu":
                    stack.append(c.id)
        return total

    for n in nodes:
        if not n.sources:
            continue
        share = sum(s.share for s in n.sources)
        if not math.isclose(share, 1.0, abs_tol=1e-6):
            problems.append(Problem(f"{n.path}.sources", f"shares add up to {share:g}, not 1"))
        must = floor_under(n.id)
        for s_i, src in enumerate(n.sources):
            where = f"{n.path}.sources[{s_i}]"
            if src.envelope_w > src.rating_w:
                problems.append(
                    Problem(
                        f"{where}.envelope_w",
                        f"envelope_w {src.envelope_w:g} W exceeds rating_w {src.rating_w:g} W",
                    )
                )
            if src.envelope_w < must:
                problems.append(
                    Problem(
                        f"{where}.envelope_w",
                        f"feed {src.id!r} alone cannot carry what must stay on when the other"
                        f" side fails: {must:g} W of baseline and GPU floors under {n.id!r},"
                        f" envelope_w is {src.envelope_w:g} W",
                    )
                )
            if src.envelope_w * len(n.sources) < n.envelope_w:
                problems.append(
                    Problem(
                        f"{where}.envelope_w",
                        f"sources together ({src.envelope_w * len(n.sources):g} W) cannot carry"
                        f" the feed's envelope_w {n.envelope_w:g} W",
                    )
                )
            for m_i, meter in enumerate(src.meters):
                if meter.device not in dev_ids:
                    problems.append(
                        Problem(f"{where}.meters[{m_i}].device", f"unknown device {meter.device!r}")
                    )
    return problems
