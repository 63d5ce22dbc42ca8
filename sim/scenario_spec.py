"""Scenario files: a site, seeded workloads, a duration and timed events, validated.

A scenario is data (``configs/scenarios/*.yaml``), not code, so that an operator can
describe the day they fear (a feed lost at peak, a demand response during a telemetry
outage) and run every policy against it. It is checked the same way as a site: pydantic
with ``extra="forbid"``, and every problem reported as ``FILE: path.inside: message``
through :class:`controller.model.config.ConfigError`. The site is either a path (relative to
the scenario file) or written inline; its own errors keep their own file and path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controller.model.config import ConfigError, Problem, Site, format_loc
from controller.model.loader import load_site, parse_site
from sim.trace import TraceError, load_azure_trace

PosS = Annotated[float, Field(gt=0)]
NonNegS = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class TrainingSpec(_Strict):
    """Synchronous training jobs; ``count`` stamps out ``id`` with ``{i}`` (1-based)."""

    id: str = Field(min_length=1)
    count: Annotated[int, Field(ge=1)] | None = None
    gpus: Annotated[int, Field(ge=1)]
    work_s: PosS = 1e9  # seconds of uncapped progress; the default never finishes
    priority_class: str = "training"
    migratable: bool = True
    submit_s: NonNegS = 0.0

    @model_validator(mode="after")
    def _ids(self) -> TrainingSpec:
        _check_id_pattern(self.id, self.count)
        return self


class BatchSpec(TrainingSpec):
    """Batch work: training-shaped, in the lowest class, and movable by default."""

    priority_class: str = "batch"


class TraceArrivals(_Strict):
    """Arrivals replayed from a trace file in the Azure format (see :mod:`sim.trace`).

    ``trace`` is relative to the scenario file's directory (or absolute); the file is
    read and checked when the scenario is validated.
    """

    trace: str = Field(min_length=1)


class InferenceSpec(_Strict):
    """An inference service replaying the Azure LLM trace, a trace file, or Poisson arrivals."""

    id: str = Field(min_length=1)
    count: Annotated[int, Field(ge=1)] | None = None
    gpus: Annotated[int, Field(ge=1)]
    gpus_per_replica: Annotated[int, Field(ge=1)] = 1
    priority_class: str = "inference"
    migratable: bool = False
    submit_s: NonNegS = 0.0
    arrivals: Literal["azure", "poisson"] | TraceArrivals = "azure"
    rate_per_s: PosS = 5.4
    scale: Annotated[float, Field(ge=0)] = 1.0
    daily_amplitude: Annotated[float, Field(ge=0, le=1)] = 0.0
    start_hour: Annotated[float, Field(ge=0, lt=24)] = 14.0

    @model_validator(mode="after")
    def _replicas(self) -> InferenceSpec:
        _check_id_pattern(self.id, self.count)
        if self.gpus % self.gpus_per_replica:
            raise ValueError(
                f"gpus ({self.gpus}) must be a multiple of gpus_per_replica"
                f" ({self.gpus_per_replica})"
            )
        return self


class Workloads(_Strict):
    training: list[TrainingSpec] = Field(default_factory=list)
    inference: list[InferenceSpec] = Field(default_factory=list)
    batch: list[BatchSpec] = Field(default_factory=list)


class _Event(_Strict):
    at_s: NonNegS


class LoadStep(_Event):
    """Every GPU's demand multiplied by ``factor`` at once (a synchronized step)."""

    kind: Literal["load_step"]
    factor: Annotated[float, Field(gt=0, le=3)]


class FeedLoss(_Event):
    """A feed source (A or B of a redundant feed) lost; back after ``duration_s``."""

    kind: Literal["feed_loss"]
    source: str = Field(min_length=1)
    duration_s: PosS | None = None


class DemandResponse(_Event):
    """The BMS asks a node to stay under ``fraction`` of its envelope for a while."""

    kind: Literal["demand_response"]
    node: str = Field(min_length=1)
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.75
    duration_s: PosS = 3600.0


class TelemetryOutage(_Event):
    """Readings stop: meters (None in the snapshot), GPU telemetry (NaN), or both."""

    kind: Literal["telemetry_outage"]
    duration_s: PosS
    scope: Literal["meters", "gpus", "all"] = "all"
    nodes: list[str] = Field(default_factory=list)  # empty: the whole site


class ActuationDelay(_Event):
    """From now on a requested limit lands after ``delay_s`` (in-band 0.1-2 s, BMC 10-40 s)."""

    kind: Literal["actuation_delay"]
    delay_s: NonNegS


class ExtraLoad(_Event):
    """Load no cap reaches appears at a node: a cooling fault running a server's fans flat
    out, kit plugged into a rack unmetered. Large enough, caps alone cannot clear it and
    only moving work can; gone after ``duration_s`` (default: for the rest of the run)."""

    kind: Literal["extra_load"]
    node: str = Field(min_length=1)
    power_w: Annotated[float, Field(gt=0)]
    duration_s: PosS | None = None


class JobArrival(_Event):
    """A job submitted mid-run (e.g. one whose power does not fit where it lands)."""

    kind: Literal["job_arrival"]
    training: TrainingSpec | None = None
    inference: InferenceSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> JobArrival:
        if (self.training is None) == (self.inference is None):
            raise ValueError("give exactly one of training: or inference:")
        return self


Event = Annotated[
    LoadStep
    | FeedLoss
    | DemandResponse
    | TelemetryOutage
    | ActuationDelay
    | ExtraLoad
    | JobArrival,
    Field(discriminator="kind"),
]


class Telemetry(_Strict):
    """What the controller sees, and how late: realistic, never better than a real one."""

    delay_s: NonNegS | None = None  # None: one policy cycle (the previous cycle's values)
    gpu_power: Literal["instant", "average"] = "instant"  # NVML instant field or 1 s average
    meter_noise_fraction: Annotated[float, Field(ge=0, le=0.05)] = 0.002
    meter_quantum_w: Annotated[float, Field(ge=0)] = 10.0


class PlantSettings(_Strict):
    actuation_delay_s: NonNegS = 0.2
    response_tau_s: NonNegS = 0.05


class SchedulerSettings(_Strict):
    requeue_delay_s: NonNegS = 60.0
    migrate_delay_s: NonNegS = 30.0


class ScenarioSpec(_Strict):
    """The whole file as written."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    site: str | dict[str, Any]
    seed: int = 0
    duration_s: PosS
    step_s: PosS = 0.1
    policy_cycle_s: PosS | None = None  # None: the site's policy.cycle_s
    demand_scale: Annotated[float, Field(gt=0, le=3)] = 1.0
    # The site's policy section for this run, key by key over the site's own (bands,
    # margin, classes, ...): an operator's settings, validated with the site.
    policy: dict[str, Any] | None = None
    drain: list[str] = Field(default_factory=list)  # servers kept free of jobs (maintenance)
    workloads: Workloads
    events: list[Event] = Field(default_factory=list)
    telemetry: Telemetry = Telemetry()
    plant: PlantSettings = PlantSettings()
    scheduler: SchedulerSettings = SchedulerSettings()

    @model_validator(mode="after")
    def _timing(self) -> ScenarioSpec:
        if self.step_s > self.duration_s:
            raise ValueError(f"step_s {self.step_s:g} is longer than duration_s")
        if self.policy_cycle_s is not None and self.policy_cycle_s < self.step_s:
            raise ValueError(f"policy_cycle_s {self.policy_cycle_s:g} is shorter than step_s")
        return self


@dataclass(frozen=True)
class Scenario:
    """A validated scenario with its site loaded and expanded."""

    spec: ScenarioSpec
    site: Site
    source: str
    base_dir: Path = Path()  # what relative paths in the file (trace files) are relative to

    def trace_path(self, arrivals: TraceArrivals) -> Path:
        """Where a trace file named in the scenario is."""
        return self.base_dir / arrivals.trace

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cycle_s(self) -> float:
        return self.spec.policy_cycle_s or self.site.policy.cycle_s


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file and its site; :class:`ConfigError` names file+path."""
    p = Path(path)
    source = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [Problem("", f"cannot read: {exc.strerror}")]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [Problem(where, f"not valid YAML: {exc}")]) from exc
    return parse_scenario(data, source, base_dir=p.parent)


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Validate a parsed document; a site path is resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", "the file must be a mapping (key: value) at top")])
    try:
        spec = ScenarioSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None
    if isinstance(spec.site, str):
        site_path = (base_dir or Path.cwd()) / spec.site
        if not site_path.is_file():
            raise ConfigError(source, [Problem("site", f"no site file at {site_path}")])
        if spec.policy is None:
            site = load_site(site_path)
        else:
            site_data = _site_yaml(site_path)
            site = parse_site(
                _with_policy(site_data, spec.policy), f"{site_path} (+ {source} policy)"
            )
    else:
        site = parse_site(_with_policy(spec.site, spec.policy), f"{source} (inline site)")
    problems = check_scenario(spec, site)
    scenario = Scenario(spec=spec, site=site, source=source, base_dir=base_dir or Path.cwd())
    problems += check_traces(scenario)
    if problems:
        raise ConfigError(source, problems)
    return scenario


def check_traces(scenario: Scenario) -> list[Problem]:
    """Read every trace file the scenario names, so a bad one is refused before a run."""
    problems: list[Problem] = []
    spec = scenario.spec
    entries = [(f"workloads.inference[{i}]", j) for i, j in enumerate(spec.workloads.inference)]
    entries += [
        (f"events[{i}].inference", ev.inference)
        for i, ev in enumerate(spec.events)
        if isinstance(ev, JobArrival) and ev.inference is not None
    ]
    for where, j in entries:
        if isinstance(j.arrivals, TraceArrivals):
            try:
                load_azure_trace(scenario.trace_path(j.arrivals))
            except TraceError as exc:
                problems.append(Problem(f"{where}.arrivals.trace", str(exc)))
    return problems


def _site_yaml(path: Path) -> Any:
    load_site(path)  # its own errors name its own file
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _with_policy(site: Any, policy: dict[str, Any] | None) -> Any:
    if policy is None or not isinstance(site, dict):
        return site
    merged = dict(site)
    merged["policy"] = {**(site.get("policy") or {}), **policy}
    return merged


def _problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        # Drop pydantic's union tag from paths: events[2].feed_loss.source -> events[2].source
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _EVENT_KINDS)]
        out.append(Problem(format_loc(loc), msg))
    return out


_EVENT_KINDS = frozenset(
    {
        "load_step",
        "feed_loss",
        "demand_response",
        "telemetry_outage",
        "actuation_delay",
        "extra_load",
        "job_arrival",
    }
)


def check_scenario(spec: ScenarioSpec, site: Site) -> list[Problem]:
    """Rules that need the site: classes, node and source ids, GPU counts, unique job ids."""
    problems: list[Problem] = []
    classes = {c.name for c in site.policy.priority_classes}
    nodes = {n.id for n in site.nodes if n.kind != "gpu"}
    sources = {s.id for n in site.nodes for s in n.sources}
    n_gpus = sum(1 for n in site.nodes if n.kind == "gpu")
    seen: dict[str, str] = {}
    total = 0

    def job(path: str, j: TrainingSpec | InferenceSpec, at_start: bool) -> None:
        nonlocal total
        if j.priority_class not in classes:
            problems.append(
                Problem(
                    f"{path}.priority_class",
                    f"unknown class {j.priority_class!r} (site classes: {sorted(classes)})",
                )
            )
        for jid in expand_ids(j):
            if jid in seen:
                problems.append(Problem(f"{path}.id", f"duplicate job id {jid!r} (at {seen[jid]})"))
            seen.setdefault(jid, path)
        if j.gpus > n_gpus:
            problems.append(Problem(f"{path}.gpus", f"{j.gpus} GPUs, the site has {n_gpus}"))
        if at_start and j.submit_s == 0:
            total += j.gpus * (j.count or 1)

    for key in ("training", "inference", "batch"):
        for i, j in enumerate(getattr(spec.workloads, key)):
            job(f"workloads.{key}[{i}]", j, True)
    for i, nid in enumerate(spec.drain):
        if nid not in nodes:
            problems.append(Problem(f"drain[{i}]", f"unknown node {nid!r}"))
    for i, ev in enumerate(spec.events):
        where = f"events[{i}]"
        if ev.at_s >= spec.duration_s:
            problems.append(Problem(f"{where}.at_s", f"at {ev.at_s:g} s, after the run ends"))
        if isinstance(ev, FeedLoss) and ev.source not in sources:
            known = ", ".join(sorted(sources)) or "the site has no A/B feed"
            problems.append(
                Problem(f"{where}.source", f"unknown feed source {ev.source!r} ({known})")
            )
        if isinstance(ev, DemandResponse | ExtraLoad) and ev.node not in nodes:
            problems.append(Problem(f"{where}.node", f"unknown node {ev.node!r}"))
        if isinstance(ev, TelemetryOutage):
            for k, nid in enumerate(ev.nodes):
                if nid not in nodes:
                    problems.append(Problem(f"{where}.nodes[{k}]", f"unknown node {nid!r}"))
        if isinstance(ev, JobArrival):
            j = ev.training or ev.inference
            assert j is not None
            job(f"{where}.{'training' if ev.training else 'inference'}", j, False)
    if total > n_gpus:
        problems.append(
            Problem("workloads", f"jobs submitted at 0 s need {total} GPUs, the site has {n_gpus}")
        )
    return problems


def expand_ids(j: TrainingSpec | InferenceSpec) -> Sequence[str]:
    """Job ids of an entry: ``{i}`` in the id is the instance number, 1-based."""
    if j.count is None:
        return [j.id]
    return [j.id.format(i=i) for i in range(1, j.count + 1)]


def _check_id_pattern(job_id: str, count: int | None) -> str:
    if count is not None:
        try:
            job_id.format(i=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"id {job_id!r}: only {{i}} may be filled in ({exc})") from None
        if count > 1 and "{i" not in job_id:
            raise ValueError(f"id {job_id!r} needs {{i}} to tell its {count} jobs apart")
    return job_id
