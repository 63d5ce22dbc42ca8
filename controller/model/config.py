"""Site configuration: the YAML a facility engineer writes, validated before anything runs.

Two stages, so that every error points at the line the engineer wrote:

1. *Spec* models mirror the YAML (generators, templates and all) and are checked by
   pydantic with ``extra="forbid"``: types, ranges, NaN, unknown keys.
2. ``expand`` turns generators into concrete entries, and ``check_site`` applies the rules
   that need the whole site (unique ids, references, envelopes against parents, A/B
   redundancy). Expanded entries remember the spec path they came from.

This module holds the models (both stages' types); loading, expanding and the whole-site
rules are in :mod:`controller.model.loader`, so the rules can build on the models without
an import circle.

Errors from both stages are collected into one :class:`ConfigError` whose lines look like
``site.yaml: rows[3].racks[12].envelope_w: envelope_w 130000 W exceeds rating_w 120000 W``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from controller.model.config_urls import address_problem, host_problem, url_problem

# ---------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (a dotted path inside the file) and why."""

    path: str
    message: str

    def render(self, source: str) -> str:
        where = f"{source}: {self.path}" if self.path else source
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` gives one line per problem."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(p.render(source) for p in self.problems))

    def report(self) -> str:
        """What a command prints on stderr: a count, then one indented line per problem."""
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {p.render(self.source)}" for p in self.problems]
        return "\n".join(lines)


def format_loc(loc: Iterable[str | int]) -> str:
    """Render a pydantic location as ``rows[3].racks[12].envelope_w``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# ---------------------------------------------------------------------------
# Spec models (what the YAML says)

NonNegW = Annotated[float, Field(ge=0)]
PosW = Annotated[float, Field(gt=0)]
PosS = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Strict(BaseModel):
    """Base for every config model: unknown keys, NaN and infinity are errors."""

    # hide_input_in_errors: a ValidationError printed whole (a traceback) must not show a
    # password written into a URL; our own messages show inputs redacted.
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True
    )


class TripCurve(Strict):
    """Thermal-magnetic breaker curve: overload ratio (I/I_rated) -> seconds it may last.

    Breakers trip on heat, so overload is budgeted as I^2 t against this curve; above
    ``instant_ratio`` the magnetic element trips at once.
    """

    points: list[tuple[Annotated[float, Field(gt=1)], PosS]] = Field(min_length=1)
    instant_ratio: Annotated[float, Field(gt=1)] = 5.0

    @field_validator("points")
    @classmethod
    def _monotonic(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ratios = [r for r, _ in points]
        seconds = [s for _, s in points]
        if ratios != sorted(ratios) or len(set(ratios)) != len(ratios):
            raise ValueError("overload ratios must be strictly increasing")
        if any(b >= a for a, b in itertools.pairwise(seconds)):
            raise ValueError("allowed seconds must fall as the overload ratio rises")
        return points

    @model_validator(mode="after")
    def _instant_above_points(self) -> TripCurve:
        if self.instant_ratio <= self.points[-1][0]:
            raise ValueError("instant_ratio must be above the last curve point")
        return self


class Meter(Strict):
    """A point of a device that measures a tree node (summed when a node has several)."""

    device: str
    point: str = "power_w"


class EfficiencyCurve(Strict):
    """Converter efficiency against load fraction of rating; interpolated linearly."""

    points: list[tuple[Annotated[float, Field(ge=0, le=2)], Fraction]] = Field(min_length=1)

    @field_validator("points")
    @classmethod
    def _load_order(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        # Interpolation walks the points in order: out of order, a load between two of
        # them reads the efficiency of a segment that runs backwards (a wrong loss figure).
        if any(b <= a for (a, _), (b, _) in itertools.pairwise(points)):
            raise ValueError("load fractions must be strictly increasing")
        return points


class TreeNodeSpec(Strict):
    """Fields common to every constrained level of the power tree."""

    id: str = Field(min_length=1)
    count: Annotated[int, Field(ge=1)] | None = None
    start: Annotated[int, Field(ge=0)] = 1
    rating_w: PosW
    envelope_w: PosW
    trip_curve: TripCurve | str | None = None
    meters: list[Meter] = Field(default_factory=list)
    efficiency: EfficiencyCurve | None = None


class FeedSource(Strict):
    """One side (A or B) of a redundant feed: its own breaker, meters and envelope."""

    id: str = Field(min_length=1)
    rating_w: PosW
    envelope_w: PosW
    share: Fraction = 0.5
    trip_curve: TripCurve | str | None = None
    meters: list[Meter] = Field(default_factory=list)


class FeedSpec(TreeNodeSpec):
    """Utility feed. With ``sources`` it is an A/B pair carrying the load between them."""

    sources: list[FeedSource] = Field(default_factory=list)

    @field_validator("sources")
    @classmethod
    def _pair(cls, sources: list[FeedSource]) -> list[FeedSource]:
        if len(sources) == 1:
            raise ValueError("a redundant feed needs at least two sources (A and B)")
        return sources


class ChildSpec(TreeNodeSpec):
    """SST, bus or row: a level that hangs below a named parent."""

    parent: str = Field(min_length=1)


class NodeSpec(Strict):
    """A GPU server: GPUs (cappable) plus a baseline (CPU, fans, NICs: not cappable)."""

    id: str = Field(min_length=1)
    count: Annotated[int, Field(ge=1)] | None = None
    start: Annotated[int, Field(ge=0)] = 1
    gpus: Annotated[int, Field(ge=0, le=256)]
    gpu_model: str
    baseline_w: NonNegW
    floor_w: NonNegW | None = None
    agent: str | None = None
    rating_w: PosW | None = None
    envelope_w: PosW | None = None
    meters: list[Meter] = Field(default_factory=list)


class DeviceSpec(Strict):
    """A meter or actuator the controller polls: a Modbus unit, an SNMP agent, an NVML host."""

    id: str = Field(min_length=1)
    count: Annotated[int, Field(ge=1)] | None = None
    start: Annotated[int, Field(ge=0)] = 1
    driver: Literal["modbus", "snmp", "nvml", "agent", "sim"]
    address: str | None = None
    unit_id: Annotated[int, Field(ge=0, le=255)] | Annotated[str, Field(pattern=r"\{")] | None = (
        None
    )
    community: str | None = None
    community_env: str | None = None
    snmp_version: Literal["2c", "3"] = "2c"
    v3_user: str | None = None
    v3_auth_key_env: str | None = None
    v3_priv_key_env: str | None = None
    tls: bool = False
    map: str | None = None
    period_s: PosS = 1.0
    timeout_s: PosS = 0.5
    stale_s: PosS | None = None

    @model_validator(mode="after")
    def _timing(self) -> DeviceSpec:
        if self.timeout_s >= self.period_s:
            raise ValueError(
                f"timeout_s {self.timeout_s:g} must be shorter than period_s {self.period_s:g}"
            )
        if self.stale_s is not None and self.stale_s < self.period_s:
            raise ValueError(
                f"stale_s {self.stale_s:g} must be at least period_s {self.period_s:g}"
            )
        return self

    @model_validator(mode="after")
    def _protocol_fields(self) -> DeviceSpec:
        if self.driver in ("modbus", "snmp"):
            if not self.address:
                raise ValueError(f"a {self.driver} device needs an address (host:port)")
            if not self.map:
                raise ValueError(f"a {self.driver} device needs a device map (map:)")
        if self.driver == "snmp":
            self._snmp_auth()
        return self

    def _snmp_auth(self) -> None:
        # Each of these is silently ignored or fails on every poll at run time.
        if self.community is not None and self.community_env is not None:
            raise ValueError("give community or community_env, not both")
        v3 = (self.v3_user, self.v3_auth_key_env, self.v3_priv_key_env)
        if self.snmp_version == "2c" and any(v is not None for v in v3):
            raise ValueError("v3_user and v3 keys need snmp_version: '3' (2c ignores them)")
        if self.snmp_version == "3":
            if not self.v3_user:
                raise ValueError("snmp_version 3 needs v3_user")
            if self.v3_priv_key_env is not None and self.v3_auth_key_env is None:
                raise ValueError("v3 privacy needs authentication too (v3_auth_key_env)")

    @field_validator("address")
    @classmethod
    def _address_works(cls, value: str | None) -> str | None:
        # A generator's ``{i}`` is checked once filled in (each instance is validated).
        if value is not None and "{" not in value:
            problem = address_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("unit_id", mode="before")
    @classmethod
    def _unit_id_number(cls, value: object) -> object:
        # A generator writes ``unit_id: "{i}"``; once filled in it must be a number.
        if isinstance(value, str) and "{" not in value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"unit_id must be a number 0-255 (got {value!r})") from None
        return value

    @property
    def modbus_unit_id(self) -> int:
        """The Modbus unit (device) id; 1 unless set, the usual default of TCP gateways."""
        return self.unit_id if isinstance(self.unit_id, int) else 1

    @property
    def effective_stale_s(self) -> float:
        """Readings older than this are worst case; default three missed polls."""
        return self.stale_s if self.stale_s is not None else 3 * self.period_s

    def host_port(self, default_port: int) -> tuple[str, int]:
        """Split ``address`` into host and port (``[::1]:502`` works too)."""
        return split_address(self.address or "", default_port)


class RackSpec(TreeNodeSpec):
    """A rack: its busbar/PDU envelope and the GPU nodes in it."""

    template: str | None = None
    nodes: list[NodeSpec] = Field(default_factory=list)
    devices: list[DeviceSpec] = Field(default_factory=list)


class RowSpec(ChildSpec):
    """A row of racks below a bus; racks are written inline so paths read ``rows[i].racks[j]``."""

    # Validated per rack after its template is merged in, so paths stay ``rows[i].racks[j]``.
    racks: list[dict[str, Any]] = Field(default_factory=list)


class GpuModel(Strict):
    """NVML power-limit range of a GPU model (``nvmlDeviceGetPowerManagementLimitConstraints``)."""

    min_w: PosW
    max_w: PosW
    default_w: PosW | None = None

    @model_validator(mode="after")
    def _ordered(self) -> GpuModel:
        if self.min_w > self.max_w:
            raise ValueError(f"min_w {self.min_w:g} is above max_w {self.max_w:g}")
        if self.default_w is not None and not self.min_w <= self.default_w <= self.max_w:
            raise ValueError(f"default_w {self.default_w:g} is outside [min_w, max_w]")
        return self


class Bands(Strict):
    """Dynamo-style bands as fractions of a node's envelope.

    Cap when power rises above ``cap_above``, aim at ``target``, release caps only once
    power is below ``uncap_below``; uncapping ramps by ``uncap_step_fraction`` of the gap
    per cycle so the rebound does not overshoot.
    """

    cap_above: Fraction = 0.97
    target: Fraction = 0.94
    uncap_below: Fraction = 0.90
    uncap_step_fraction: Fraction = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> Bands:
        if not self.uncap_below <= self.target <= self.cap_above:
            raise ValueError("bands must satisfy uncap_below <= target <= cap_above")
        return self


class PriorityClass(Strict):
    name: str = Field(min_length=1)
    floor_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    # What a GPU-second of this class is worth, for reports (a scenario's work_value), not
    # for control: priority stays strict. None: twice the class below it, 1 for the lowest.
    weight: Annotated[float, Field(gt=0)] | None = None


def class_weights(classes: list[PriorityClass]) -> dict[str, float]:
    """Each class's weight, highest class first: its own, or twice the one below it."""
    out: dict[str, float] = {}
    below = 0.5
    for c in reversed(classes):
        below = c.weight if c.weight is not None else 2.0 * below
        out[c.name] = below
    return {c.name: out[c.name] for c in classes}


class Margin(Strict):
    """Safety margin for load no cap reaches, learned from the worst rise of the load the
    GPUs and baselines do not explain within one actuation latency. The GPUs' own rises
    need none: their caps bound them. ``min_fraction`` keeps a standing reserve."""

    min_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    max_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.15
    window_s: PosS = 600.0
    actuation_latency_s: PosS = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> Margin:
        if self.min_fraction > self.max_fraction:
            raise ValueError("min_fraction must not exceed max_fraction")
        return self


class Escalation(Strict):
    enabled: bool = True
    min_interval_s: PosS = 120.0
    trip_allowance_fraction: Fraction = 0.5


class PolicyConfig(Strict):
    name: Literal["rackpower", "none", "static", "three-band"] = "rackpower"
    cycle_s: PosS = 0.5
    bands: Bands = Bands()
    priority_classes: list[PriorityClass] = Field(
        default_factory=lambda: [
            PriorityClass(name="critical"),
            PriorityClass(name="training"),
            PriorityClass(name="inference"),
            PriorityClass(name="batch"),
        ],
        min_length=1,
    )
    default_class: str = "batch"
    gpu_floor_w: NonNegW | None = None
    margin: Margin = Margin()
    escalation: Escalation = Escalation()
    lease_s: PosS = 10.0

    @model_validator(mode="after")
    def _classes(self) -> PolicyConfig:
        names = [c.name for c in self.priority_classes]
        if len(set(names)) != len(names):
            raise ValueError("priority class names must be unique")
        if self.default_class not in names:
            raise ValueError(f"default_class {self.default_class!r} is not one of {names}")
        return self


MQTT_SCHEMES = ("mqtt", "mqtts")
HTTP_SCHEMES = ("http", "https")


def check_url(url: str, schemes: Sequence[str], *, path_allowed: bool = False) -> str:
    """``url`` itself, or ``ValueError`` saying why it cannot work (never its password)."""
    problem = url_problem(url, schemes, path_allowed=path_allowed)
    if problem is not None:
        raise ValueError(problem)
    return url


class MqttConfig(Strict):
    url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "rackpower"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    tls: bool = False
    telemetry_period_s: PosS = 5.0
    # BMS ``mode`` commands turn protection off; off unless the site's broker ACL lets
    # only the BMS publish commands (MQTT 3.1.1 carries no sender identity). See docs/mqtt.md.
    allow_mode_commands: bool = False
    max_advisory_s: Annotated[float, Field(gt=0, le=24 * 3600)] = 3600.0

    @field_validator("url")
    @classmethod
    def _url_works(cls, url: str) -> str:
        return check_url(url, MQTT_SCHEMES)


class InfluxConfig(Strict):
    url: str = "http://127.0.0.1:8086"
    org: str = "rackpower"
    bucket: str = "rackpower"
    token_env: str | None = None
    token_file: Path | None = None
    batch_size: Annotated[int, Field(ge=1)] = 5000
    flush_s: PosS = 1.0
    max_buffered_points: Annotated[int, Field(ge=1)] = 200_000

    @field_validator("url")
    @classmethod
    def _url_works(cls, url: str) -> str:
        return check_url(url, HTTP_SCHEMES, path_allowed=True)


class ApiConfig(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080  # 0: any free port
    token_env: str | None = None
    token_file: Path | None = None

    @field_validator("host")
    @classmethod
    def _host_works(cls, host: str) -> str:
        problem = host_problem(host.removeprefix("[").removesuffix("]"))
        if problem is not None:
            raise ValueError(problem)
        return host


class SchedulerConfig(Strict):
    """Which scheduler runs the site's jobs, and how GPU servers are named there.

    ``class_map`` maps the scheduler's QOS, partition or priority class to the
    controller's priority classes. Host names map to GPU server ids: the same id, an
    alias, or the named group ``node`` of ``host_pattern``.
    """

    kind: Literal["none", "slurm", "kubernetes", "sim"] = "none"
    url: str | None = None
    token_env: str | None = None
    token_file: Path | None = None
    class_map: dict[str, str] = Field(default_factory=dict)
    poll_s: PosS = 5.0
    stale_after_s: PosS = 30.0
    resume_hold_s: PosS = 60.0
    # A capped job gets a note saying why (Slurm AdminComment, a Kubernetes Event), again
    # when it is released, and at most this often in between; 0: never note caps.
    note_caps_every_s: Annotated[float, Field(ge=0)] = 300.0
    host_aliases: dict[str, str] = Field(default_factory=dict)
    host_pattern: str | None = None
    host_format: str | None = None
    # Slurm
    user: str = "root"
    unix_socket: str | None = None
    # Kubernetes
    ca_file: Path | None = None
    job_label: str = "job-name"
    class_label: str | None = None
    gpu_resource: str = "nvidia.com/gpu"
    requeueable_default: bool = False

    @field_validator("url")
    @classmethod
    def _url_works(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url, HTTP_SCHEMES, path_allowed=True)

    @model_validator(mode="after")
    def _reachable(self) -> SchedulerConfig:
        if self.kind == "slurm" and not (self.url or self.unix_socket):
            raise ValueError("a slurm scheduler needs url (slurmrestd) or unix_socket")
        if self.kind == "kubernetes" and not self.url:
            raise ValueError("a kubernetes scheduler needs url (the API server)")
        if self.kind == "kubernetes" and self.token_env:
            raise ValueError(
                "a kubernetes scheduler reads its token from token_file (a service-account"
                " token rotates on disk); token_env is for slurm"
            )
        if self.token_env and self.token_file:
            raise ValueError("give token_env or token_file, not both")
        return self


class AgentAuthConfig(Strict):
    """Where the controller finds each agent's link key: ``<keys_dir>/<agent_id>.key``
    (``<kid> <secret hex>`` per line, one or two during a rollover, mode 0600; the
    directory itself 0700). One file per agent: 9,000 agents are a directory, and a node
    is re-keyed alone. See docs/agent-link.md.

    Required (see :func:`agent_auth_problems`) when agents talk over MQTT: anyone who can
    publish on the broker could otherwise raise any GPU's cap (F2). ``allow_unsigned:
    true`` instead of ``keys_dir`` is the explicit, loud lab mode; both at once would
    leave a reader unsure which holds, so that is refused too.
    """

    keys_dir: Path | None = None
    allow_unsigned: bool = False
    check_every_s: Annotated[float, Field(gt=0, le=3600)] = 1.0

    @model_validator(mode="after")
    def _one_mode(self) -> AgentAuthConfig:
        if self.keys_dir is None and not self.allow_unsigned:
            raise ValueError(
                "set keys_dir (one key file per agent) or, for a lab only, allow_unsigned: true"
            )
        if self.keys_dir is not None and self.allow_unsigned:
            raise ValueError(
                "keys_dir and allow_unsigned: true contradict each other; drop allow_unsigned"
            )
        return self


def agent_auth_problems(spec: SiteSpec, nodes: Sequence[NodeDef]) -> list[Problem]:
    """Agents on an MQTT link need ``integrations.agent_auth``: refused at ``validate``,
    not discovered at ``run`` (which loads the site through the same rules).

    Without it every lease goes out unsigned and every report is believed, so any client
    of the broker can uncap GPUs or fake readings (F2). The in-process link (demo without
    ``--mqtt``, scenarios, the simulator) has no ``integrations.mqtt`` and is not concerned.
    """
    if spec.integrations.mqtt is None or spec.integrations.agent_auth is not None:
        return []
    agents = sorted({n.agent for n in nodes if n.kind == "node" and n.agent is not None})
    if not agents:
        return []
    return [
        Problem(
            "integrations.agent_auth",
            f"{len(agents)} node agent{'s' if len(agents) != 1 else ''} ({agents[0]}"
            f"{', ...' if len(agents) > 1 else ''}) talk over MQTT (integrations.mqtt)"
            " unauthenticated: set integrations.agent_auth.keys_dir (a directory of"
            " <agent_id>.key files, docs/agent-link.md) or, for a lab only,"
            " integrations.agent_auth.allow_unsigned: true",
        )
    ]


class Integrations(Strict):
    mqtt: MqttConfig | None = None
    agent_auth: AgentAuthConfig | None = None
    influx: InfluxConfig | None = None
    api: ApiConfig = ApiConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


class SiteSpec(Strict):
    """The whole file as written."""

    @model_validator(mode="after")
    def _class_map(self) -> SiteSpec:
        names = {c.name for c in self.policy.priority_classes}
        bad = sorted(v for v in self.integrations.scheduler.class_map.values() if v not in names)
        if bad:
            raise ValueError(
                f"integrations.scheduler.class_map maps to {bad}, not priority classes"
                f" ({sorted(names)})"
            )
        return self

    site: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    gpu_models: dict[str, GpuModel] = Field(min_length=1)
    trip_curves: dict[str, TripCurve] = Field(default_factory=dict)
    rack_templates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    devices: list[DeviceSpec] = Field(default_factory=list)
    feeds: list[FeedSpec] = Field(min_length=1)
    ssts: list[ChildSpec] = Field(default_factory=list)
    buses: list[ChildSpec] = Field(default_factory=list)
    rows: list[RowSpec] = Field(min_length=1)
    policy: PolicyConfig = PolicyConfig()
    integrations: Integrations = Integrations()


# ---------------------------------------------------------------------------
# Expanded site (what the rest of the program uses)

Kind = Literal["feed", "sst", "bus", "row", "rack", "node", "gpu"]
LEVELS: tuple[Kind, ...] = ("feed", "sst", "bus", "row", "rack", "node", "gpu")


@dataclass(frozen=True)
class NodeDef:
    """One concrete node of the power tree, with the spec path it was written at."""

    id: str
    kind: Kind
    parent: str | None
    rating_w: float
    envelope_w: float
    path: str
    trip_curve: TripCurve | None = None
    meters: tuple[Meter, ...] = ()
    efficiency: EfficiencyCurve | None = None
    sources: tuple[FeedSource, ...] = ()
    # GPU servers only
    gpus: int = 0
    gpu_model: str | None = None
    baseline_w: float = 0.0
    floor_w: float | None = None
    agent: str | None = None


@dataclass(frozen=True)
class Site:
    """A validated, expanded site: every node and device concrete, every reference resolved."""

    name: str
    source: str
    spec: SiteSpec
    nodes: tuple[NodeDef, ...]
    devices: tuple[DeviceSpec, ...]
    device_paths: Mapping[str, str]

    @property
    def policy(self) -> PolicyConfig:
        return self.spec.policy

    @property
    def integrations(self) -> Integrations:
        return self.spec.integrations

    @property
    def gpu_models(self) -> Mapping[str, GpuModel]:
        return self.spec.gpu_models


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` or bare host -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    return host, int(port) if port else default_port


def floor_draw_w(spec: SiteSpec, node: NodeDef) -> float:
    """The least a GPU server can be brought down to: baseline plus every GPU at its floor."""
    model = spec.gpu_models[node.gpu_model or ""]
    floor = max(model.min_w, node.floor_w or 0.0, spec.policy.gpu_floor_w or 0.0)
    return node.baseline_w + node.gpus * min(floor, model.max_w)
