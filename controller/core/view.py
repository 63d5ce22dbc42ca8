"""What the HTTP API, the status page and ``rackpower status`` may read of the running daemon.

The daemon owns the live state; the API only reads it through :class:`ControllerView`, a
small Protocol of plain frozen values, so the API can be tested against
:class:`MemoryView` and the daemon can change inside without breaking a client.

Headroom is computed here, not in the daemon, from the same three numbers for every
client: ``envelope - max(measured, estimated) - reserved``. A reading that cannot be
trusted (stale meter, nothing known) counts at the node's rating, as it does for the
policy: a scheduler must never be promised power that a silent meter might be hiding.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from controller.core.alarms import Alarm
from controller.model.config import LEVELS, Kind
from controller.model.topology import PowerTree
from drivers.reading import Quality

HealthStatus = Literal["starting", "ok", "degraded", "stopping"]
Mode = Literal["enforce", "advisory"]

# ---------------------------------------------------------------------------
# What the daemon hands over (frozen values, cheap to build once per cycle)


@dataclass(frozen=True, slots=True)
class NodeTelemetry:
    """One tree node at one moment, as the BMS sees it. ``ts_s`` is ``time.time()``."""

    node: str
    power_w: float
    envelope_w: float
    headroom_w: float
    ts_s: float
    quality: Quality = Quality.GOOD


@dataclass(frozen=True, slots=True)
class NodeLive:
    """The live numbers of one tree node as of the last cycle.

    ``envelope_w`` is the envelope in force (BMS overrides, demand response and lost feed
    sources applied), not the configured one. ``power_w`` is the meter reading (None
    when unmetered or unusable); ``estimated_w`` what the GPUs and baselines below add up
    to. ``stale`` marks a node whose meter went silent: it then counts at its rating.
    ``capped_gpus``/``cap_limit_w`` say how many GPUs below are held under their maximum
    and the lowest limit among them; ``mode`` is the policy's band state.
    """

    id: str
    envelope_w: float
    power_w: float | None = None
    estimated_w: float | None = None
    stale: bool = False
    capped_gpus: int = 0
    cap_limit_w: float | None = None
    mode: str = ""
    margin_w: float = 0.0
    trip_used: float = 0.0
    alarms: tuple[Alarm, ...] = ()


@dataclass(frozen=True, slots=True)
class CapRow:
    """One cap in force: a job (or a server's unassigned GPUs) held at ``limit_w`` per GPU.

    ``node_id`` is the constraint node whose envelope made the policy cap; ``servers``
    the GPU servers the capped GPUs sit in (a job spans several). ``lease_expires_s`` is
    when the agents fall back to their failsafe cap unless the lease is renewed.
    """

    job_id: str | None
    node_id: str
    servers: tuple[str, ...]
    gpu_count: int
    limit_w: float
    reason: str
    since_s: float
    lease_expires_s: float | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Whether the control loop is alive and keeping time; timestamps are ``time.time()``."""

    status: HealthStatus
    mode: Mode
    started_at_s: float
    last_cycle_at_s: float | None = None
    cycle_s: float = 0.0
    cycles: int = 0
    overruns: int = 0
    devices_total: int = 0
    devices_stale: int = 0
    agents_total: int = 0
    agents_lost: int = 0  # silent past their stale limit: their GPUs count at maximum
    agents_failsafe: int = 0  # reporting, but on their failsafe cap (no lease reaches them)
    reasons: tuple[str, ...] = ()  # why not ``ok``, one line per cause, naming what
    message: str = ""


class ControllerView(Protocol):
    """The read interface the daemon implements for the API.

    Every method is called on the event loop the daemon runs on and must return
    without awaiting or blocking (hand out what the last cycle built). ``tree`` may be
    a new object after a config reload; the API reads it on every request.
    """

    @property
    def tree(self) -> PowerTree: ...

    def health(self) -> Health: ...

    def nodes(self) -> Mapping[str, NodeLive]:
        """Live numbers per node id (constraint nodes and GPU servers; GPUs optional).

        A node missing from the mapping has no data yet and counts at its rating.
        """
        ...

    def caps(self) -> Sequence[CapRow]: ...


@dataclass
class MemoryView:
    """A :class:`ControllerView` that holds whatever it is given.

    For tests, tools and a status page over recorded numbers: nothing computes here,
    the fields are the state.
    """

    tree: PowerTree
    live: dict[str, NodeLive] = field(default_factory=dict)
    cap_rows: list[CapRow] = field(default_factory=list)
    health_info: Health = field(
        default_factory=lambda: Health(status="ok", mode="enforce", started_at_s=0.0)
    )

    def health(self) -> Health:
        return self.health_info

    def nodes(self) -> Mapping[str, NodeLive]:
        return self.live

    def caps(self) -> Sequence[CapRow]:
        return self.cap_rows


# ---------------------------------------------------------------------------
# Headroom arithmetic (shared by the API, the metrics and the reservation check)


def load_w(live: NodeLive | None, rating_w: float) -> float:
    """What the node counts as drawing: ``max(measured, estimated)``, rating when unknown."""
    if live is None or live.stale:
        return rating_w
    known = [v for v in (live.power_w, live.estimated_w) if v is not None and math.isfinite(v)]
    return max(known) if known else rating_w


def envelope_in_force_w(tree: PowerTree, node_id: str, live: NodeLive | None) -> float:
    if live is not None and math.isfinite(live.envelope_w):
        return live.envelope_w
    return tree.effective_envelope_w(node_id)


def free_w(
    tree: PowerTree, live: Mapping[str, NodeLive], node_ids: Sequence[str]
) -> dict[str, float]:
    """``envelope - load`` per node: headroom before reservations are taken off."""
    out: dict[str, float] = {}
    for nid in node_ids:
        node = tree.node(nid)
        row = live.get(nid)
        out[nid] = envelope_in_force_w(tree, nid, row) - load_w(row, node.rating_w)
    return out


def kinds_down_to(kind: Kind) -> tuple[Kind, ...]:
    """The tree levels from the feeds down to ``kind`` inclusive."""
    return LEVELS[: LEVELS.index(kind) + 1]


# ---------------------------------------------------------------------------
# Response models (the JSON contract; OpenAPI is generated from these)


class ApiModel(BaseModel):
    model_config = ConfigDict(frozen=True)


class AlarmOut(ApiModel):
    kind: str
    message: str
    since_s: float


class CapInfo(ApiModel):
    capped_gpus: int = Field(description="GPUs below this node held under their maximum limit")
    limit_w: float | None = Field(description="lowest per-GPU limit in force below, W")
    mode: str = Field(description="policy band state: cap, hold, release (empty if unknown)")


class NodeOut(ApiModel):
    id: str
    kind: str
    parent: str | None
    depth: int
    rating_w: float
    envelope_w: float = Field(description="envelope in force, overrides and lost sources applied")
    power_w: float | None = Field(description="measured power, null when unmetered or unusable")
    estimated_w: float | None = Field(description="GPUs and baselines below, summed")
    load_w: float = Field(description="max(measured, estimated); the rating when unknown")
    reserved_w: float = Field(description="reservations on this node and below")
    headroom_w: float = Field(description="envelope_w - load_w - reserved_w; negative = over")
    available_w: float = Field(
        description="least headroom along this node and its ancestors: what may be reserved"
    )
    stale: bool
    margin_w: float
    trip_used: float = Field(description="share of the breaker's trip allowance used, 0-1")
    cap: CapInfo
    alarms: list[AlarmOut]


class TreeOut(ApiModel):
    site: str
    now_s: float
    mode: str
    nodes: list[NodeOut]


class HeadroomRow(ApiModel):
    id: str
    kind: str
    envelope_w: float
    power_w: float | None
    reserved_w: float
    headroom_w: float
    available_w: float


class HeadroomOut(ApiModel):
    nodes: list[HeadroomRow]


class CapOut(ApiModel):
    job_id: str | None
    node_id: str
    servers: list[str]
    gpu_count: int
    limit_w: float
    reason: str
    since_s: float
    lease_expires_s: float | None


class CapsOut(ApiModel):
    caps: list[CapOut]


class HealthOut(ApiModel):
    """``status``: starting, ok, degraded (see ``reasons``) or stopping. Always served with
    HTTP 200 while the API runs: a probe reads the body, not the code."""

    status: str
    site: str
    mode: str
    now_s: float
    started_at_s: float
    last_cycle_at_s: float | None
    cycle_age_s: float | None
    cycle_s: float
    cycles: int
    overruns: int
    devices_total: int
    devices_stale: int
    agents_total: int
    agents_lost: int = Field(description="agents silent past their stale limit")
    agents_failsafe: int = Field(description="agents reporting on their failsafe cap")
    reservations: int
    reasons: list[str] = Field(description="why the status is not ok, one line per cause")
    message: str


_ORDERS: weakref.WeakKeyDictionary[PowerTree, dict[bool, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _order(tree: PowerTree, servers: bool) -> tuple[str, ...]:
    """``tree.order`` without the GPUs (and without the servers), computed once per tree:
    a hall has four GPUs and one server for every node above them."""
    orders = _ORDERS.get(tree)
    if orders is None:
        skip_servers = frozenset(("gpu", "node"))
        orders = _ORDERS[tree] = {
            True: tuple(n for n in tree.order if tree.node(n).kind != "gpu"),
            False: tuple(n for n in tree.order if tree.node(n).kind not in skip_servers),
        }
    return orders[servers]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def build_rows(
    tree: PowerTree,
    live: Mapping[str, NodeLive],
    reserved_w: Mapping[str, float],
    kinds: Sequence[Kind],
    only: str | None = None,
) -> list[NodeOut]:
    """Rows in tree order (parents first) for the nodes of ``kinds`` (or just ``only``).

    ``available_w`` needs every ancestor's headroom, so headroom is computed top-down in
    the same pass; a node's ancestors always come before it in ``tree.order``.
    """
    wanted = set(kinds)
    available: dict[str, float] = {}
    depth: dict[str, int] = {}
    rows: list[NodeOut] = []
    if only is not None:
        ids: Sequence[str] = [*reversed(tree.ancestors(only)), only]
    else:
        ids = _order(tree, servers="node" in wanted)
    for nid in ids:
        node = tree.node(nid)
        if node.kind == "gpu":
            continue
        row = live.get(nid)
        env = envelope_in_force_w(tree, nid, row)
        load = load_w(row, node.rating_w)
        res = reserved_w.get(nid, 0.0)
        room = env - load - res
        parent = node.parent
        # Levels not shown still bound what the levels below them may be given.
        available[nid] = room if parent is None else min(room, available[parent])
        depth[nid] = 0 if parent is None else depth[parent] + 1
        if node.kind not in wanted or (only is not None and nid != only):
            continue
        rows.append(
            NodeOut(
                id=nid,
                kind=node.kind,
                parent=node.parent,
                depth=depth[nid],
                rating_w=node.rating_w,
                envelope_w=env,
                power_w=None if row is None else _finite(row.power_w),
                estimated_w=None if row is None else _finite(row.estimated_w),
                load_w=load,
                reserved_w=res,
                headroom_w=room,
                available_w=available[nid],
                stale=row is None or row.stale,
                margin_w=0.0 if row is None else row.margin_w,
                trip_used=0.0 if row is None else row.trip_used,
                cap=CapInfo(
                    capped_gpus=0 if row is None else row.capped_gpus,
                    limit_w=None if row is None else _finite(row.cap_limit_w),
                    mode="" if row is None else row.mode,
                ),
                alarms=[]
                if row is None
                else [
                    AlarmOut(kind=str(a.kind), message=a.message, since_s=a.raised_at_s)
                    for a in row.alarms
                ],
            )
        )
    return rows
