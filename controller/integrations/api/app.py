"""The HTTP API: headroom and reservations for schedulers, the tree for people, metrics.

FastAPI on uvicorn, served *inside the daemon's event loop* (:class:`ApiServer`), so
handlers read the live state through :class:`~controller.core.view.ControllerView` without
locks or copies. Every handler is ``async def`` for that reason: a plain ``def`` handler
would run in a worker thread and race the control cycle.

Authentication: ``POST``/``DELETE`` need ``Authorization: Bearer <token>``, the token
read from ``integrations.api.token_env`` or ``token_file`` at start (never inline),
compared in constant time. With no token configured the mutating endpoints answer 503
"not configured" unless the app was made with ``allow_unauthenticated=True`` (the demo
on loopback does this). Reading endpoints are open: they expose what a BMS screen shows.

Bad input answers 4xx with the reason, never 5xx: 422 names the field (FastAPI's
validation), 404 an unknown node or reservation, 409 a reservation the headroom does not
cover, 401 a missing or wrong token.

Hostile clients (audit F1 and friends), because the API shares the one event loop the
control cycle runs on, so anything that holds the loop holds the cycle:
- :class:`RequestGuard`, the outermost ASGI layer, answers a mutating call's missing or
  wrong token with 401 *before a byte of its body is read* (the audit's 63 MB POST got
  its 401 after 3 s of parsing, and all agents were flagged lost meanwhile), then caps
  the body at ``MAX_BODY_BYTES`` (413: from ``Content-Length`` and counted while a
  chunked body streams in) and the time to send it (408), and a head over
  ``MAX_HEAD_BYTES`` is a 431. Refusals close the connection.
- :class:`ApiServer` closes a connection that has not sent a complete request head
  within ``header_timeout_s`` (half-open and slowloris connections), and answers 503 to
  connections beyond ``max_connections`` at once.
- A 422 shows at most ``MAX_ECHO_CHARS`` of each rejected input, never the whole of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from controller.core import audit as audit_kinds
from controller.core.audit import AuditLog
from controller.core.metrics import CONTENT_TYPE, Metrics
from controller.core.reservations import MAX_TTL_S, Refusal, Reservation, ReservationStore
from controller.core.view import (
    CapOut,
    CapsOut,
    ControllerView,
    HeadroomOut,
    HeadroomRow,
    HealthOut,
    NodeOut,
    TreeOut,
    build_rows,
    free_w,
    kinds_down_to,
)
from controller.model.config import ApiConfig, Kind
from controller.model.secrets import read_secret
from controller.model.topology import CONSTRAINT_KINDS, PowerTree
from drivers.shipped import package_path

log = logging.getLogger("rackpower.api")

# drivers/shipped.py: the one lookup
STATIC_DIR = package_path("controller.integrations.api", "static")
DownTo = Literal["feed", "sst", "bus", "row", "rack", "node"]
Clock = Callable[[], float]

# A reservation is ~100 bytes of JSON; 64 KiB leaves room for any honest client and
# bounds what one request can make the loop parse.
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0  # to send a whole body once the head is in (slow-body clients)
HEADER_TIMEOUT_S = 10.0  # to send a complete request head after connecting or a response
MAX_CONNECTIONS = 64  # open at once; a scheduler and a few screens need a handful
MAX_HEAD_BYTES = 16 * 1024  # request line plus headers (h11's incomplete-event limit)
MAX_ECHO_CHARS = 200  # of a rejected input shown back in a 422

# Module level: handlers' annotations are strings (``from __future__ import annotations``)
# that FastAPI resolves in this module's namespace, not in create_app's.
_bearer = HTTPBearer(auto_error=False, description="the token from integrations.api")
# The trail is open to kinds beyond controller.core.audit.KINDS (the daemon adds alarm:*).
EventKindName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


# ---------------------------------------------------------------------------
# Token


def resolve_api_token(cfg: ApiConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from the environment or a file; None when neither is configured.

    A configured source that is missing or empty stops the start: an API that silently
    accepts nothing (or everything) is worse than one that does not come up.
    """
    return read_secret("api token", cfg.token_env, cfg.token_file, environ)


Refusal_ = tuple[int, str, dict[str, str]]  # status, detail, extra headers


def token_refusal(
    token: str | None, authorization: str | None, *, allow_unauthenticated: bool
) -> Refusal_ | None:
    """Why a mutating call with this ``Authorization`` header is refused; None: allowed.

    One rule for both places that check it: :class:`RequestGuard` (before the body) and
    the route dependency (which also puts the bearer scheme into the OpenAPI schema).
    """
    if token is None:
        if allow_unauthenticated:
            return None
        return (
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "changes through the API are disabled: no API token is configured"
            " (set integrations.api.token_env or token_file)",
            {},
        )
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return status.HTTP_401_UNAUTHORIZED, "missing bearer token", challenge
    if not hmac.compare_digest(credentials.encode(), token.encode()):
        return status.HTTP_401_UNAUTHORIZED, "wrong token", challenge
    return None


async def _send_refusal(send: Send, code: int, detail: str, headers: Mapping[str, str]) -> None:
    """A JSON ``{"detail": ...}`` answer that closes the connection: the rest of the
    request (an unread body) is never read, and h11 cannot reuse the connection anyway."""
    body = JSONResponse({"detail": detail}).body
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": code, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Outermost ASGI layer: token first, then a bounded body, then the app.

    ``needs_token(scope)`` says whether the request goes to a mutating route; its token
    is checked from the head alone, so a bad token costs no body read (F1). Every body is
    then read here, up to ``max_body_bytes`` within ``body_timeout_s``, and handed to the
    app whole: the app never starts on a body that will turn out too large, and a slow
    sender is cut off instead of holding a request open.
    """

    log_every_s = 10.0

    def __init__(
        self,
        app: ASGIApp,
        *,
        needs_token: Callable[[Scope], bool],
        refusal: Callable[[str | None], Refusal_ | None],
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.needs_token = needs_token
        self.refusal = refusal
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.refused: Counter[str] = Counter()  # by reason, since start
        self._logged_at_s: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # h11 bounds only a head still arriving: one that comes in a single read is parsed
        # whole, however large. Bounded here, before anything reads its fields.
        head_bytes = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        head_bytes += sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head_bytes > MAX_HEAD_BYTES:
            await _send_refusal(
                send,
                status.HTTP_431_REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request head too large: at most {MAX_HEAD_BYTES} bytes",
                {},
            )
            return
        headers = Headers(scope=scope)
        if self.needs_token(scope):
            refused = self.refusal(headers.get("authorization"))
            if refused is not None:
                self._note_refusal(scope, refused[1])
                await _send_refusal(send, *refused)
                return
        too_large = f"request body too large: at most {self.max_body_bytes} bytes"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_refusal(send, status.HTTP_413_CONTENT_TOO_LARGE, too_large, {})
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                messages = await self._read_body(receive)
        except _BodyTooLarge:
            await _send_refusal(send, status.HTTP_413_CONTENT_TOO_LARGE, too_large, {})
            return
        except TimeoutError:
            await _send_refusal(
                send,
                status.HTTP_408_REQUEST_TIMEOUT,
                f"request body not sent within {self.body_timeout_s:g} s",
                {},
            )
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _note_refusal(self, scope: Scope, detail: str) -> None:
        """Count it; log the first and then at most one summary per ``log_every_s``, so a
        client that hammers the API with bad tokens cannot flood the journal."""
        self.refused[detail] += 1
        now = time.monotonic()
        if self._logged_at_s is not None and now - self._logged_at_s < self.log_every_s:
            return
        self._logged_at_s = now
        client = scope.get("client") or ("?", 0)
        log.warning(
            "API: %s %s from %s refused before its body: %s (refused so far: %s)",
            scope["method"],
            scope["path"],
            client[0],
            detail,
            dict(self.refused),
        )

    async def _read_body(self, receive: Receive) -> list[Message]:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # a disconnect: the app sees it too
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            if not message.get("more_body", False):
                return messages


# ---------------------------------------------------------------------------
# Request and response models that only the API uses

JobId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\w.:@/+-]+$")]


class ReservationIn(BaseModel):
    """What a scheduler asks for before it starts a job under ``node``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    node: str = Field(min_length=1, max_length=200, description="tree node id (rack, row, ...)")
    watts: float = Field(ge=1, le=1e9, description="power to hold for the job, W")
    ttl_s: float = Field(ge=1, le=MAX_TTL_S, description="seconds until it expires by itself")
    job_id: JobId


class ReservationOut(BaseModel):
    id: str
    node: str
    watts: float
    job_id: str
    created_at_s: float
    expires_at_s: float

    @classmethod
    def of(cls, r: Reservation) -> ReservationOut:
        return cls(
            id=r.id,
            node=r.node,
            watts=r.power_w,
            job_id=r.job_id,
            created_at_s=r.created_at_s,
            expires_at_s=r.expires_at_s,
        )


class ReservationsOut(BaseModel):
    reservations: list[ReservationOut]


class RefusalOut(BaseModel):
    detail: str
    node: str
    limiting_node: str
    requested_w: float
    available_w: float


class ErrorOut(BaseModel):
    detail: str


class EventOut(BaseModel):
    seq: int
    ts_s: float
    kind: str
    reason: str
    node: str | None
    job_id: str | None
    readings: dict[str, float | None]
    details: dict[str, Any]
    advisory: bool


class EventsOut(BaseModel):
    last_seq: int
    events: list[EventOut]


class HistoryOut(BaseModel):
    """Columns of the last minutes for one node (what the status page plots)."""

    node: str
    period_s: float
    ts_s: list[float]
    load_w: list[float]
    power_w: list[float | None]
    envelope_w: list[float]


# ---------------------------------------------------------------------------
# History for the status page's plot


class History:
    """The last ``span_s`` of load and envelope per constraint node, sampled by the API.

    Kept in the API so a freshly opened status page has minutes to plot at once; the
    TSDB holds the long history. Large sites keep rows and above only, to bound memory.
    """

    def __init__(self, *, span_s: float = 600.0, period_s: float = 1.0, max_nodes: int = 256):
        self.period_s = period_s
        self.max_nodes = max_nodes
        self._len = max(2, int(span_s / period_s))
        self._series: dict[str, deque[tuple[float, float, float | None, float]]] = {}

    def kinds(self, tree: PowerTree) -> tuple[Kind, ...]:
        if len(tree.constraint_nodes()) <= self.max_nodes:
            return CONSTRAINT_KINDS
        return kinds_down_to("row")

    def sample(self, now_s: float, rows: Sequence[NodeOut]) -> None:
        seen = set()
        for row in rows:
            seen.add(row.id)
            series = self._series.get(row.id)
            if series is None:
                series = self._series[row.id] = deque(maxlen=self._len)
            series.append((now_s, row.load_w, row.power_w, row.envelope_w))
        for gone in set(self._series) - seen:
            del self._series[gone]

    def series(self, node: str) -> HistoryOut:
        points = list(self._series.get(node, ()))
        return HistoryOut(
            node=node,
            period_s=self.period_s,
            ts_s=[p[0] for p in points],
            load_w=[p[1] for p in points],
            power_w=[p[2] for p in points],
            envelope_w=[p[3] for p in points],
        )


# ---------------------------------------------------------------------------
# The app


def _static(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


_STATIC_TYPES = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}


def create_app(
    view: ControllerView,
    api_config: ApiConfig,
    *,
    reservations: ReservationStore | None = None,
    audit: AuditLog | None = None,
    metrics: Metrics | None = None,
    clock: Clock = time.time,
    allow_unauthenticated: bool = False,
    environ: Mapping[str, str] | None = None,
    history: History | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The API over a running controller's view.

    ``reservations``, ``audit`` and ``metrics`` are shared with the daemon (it feeds
    reservations into the policy's snapshot, records its actions in the same trail and
    reports polls and cycles to the same metrics); fresh ones are made when not given
    and are reachable as ``app.state.reservations`` etc. ``clock`` gives ``time.time()``
    seconds: reservation expiries are wall-clock times clients can read.
    """
    token = resolve_api_token(api_config, environ)
    store = reservations if reservations is not None else ReservationStore()
    trail = audit if audit is not None else AuditLog()
    mets = metrics if metrics is not None else Metrics(view.tree.site.name)
    hist = history if history is not None else History()
    page = {name: _static(name) for name in ("status.html", *_STATIC_TYPES)}

    def rows_now(kinds: Sequence[Kind], only: str | None = None) -> list[NodeOut]:
        tree = view.tree
        return build_rows(tree, view.nodes(), store.reserved_w(tree, clock()), kinds, only)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def sampler() -> None:
            while True:
                try:
                    hist.sample(clock(), rows_now(hist.kinds(view.tree)))
                except Exception:  # a view bug must not kill the plot for good
                    log.exception("status history: sampling the view failed")
                await asyncio.sleep(hist.period_s)

        task = asyncio.create_task(sampler(), name="api-history")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="rackpower",
        version="1",
        description=(
            "Power headroom, reservations and live state of the power tree (feed, SST, bus,"
            " row, rack, GPU server). Headroom = envelope - max(measured, estimated) -"
            " reserved. POST and DELETE need `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
    )
    app.state.reservations = store
    app.state.audit = trail
    app.state.metrics = mets
    app.state.history = hist

    def refusal(authorization: str | None) -> Refusal_ | None:
        return token_refusal(token, authorization, allow_unauthenticated=allow_unauthenticated)

    async def require_token(request: Request, _: BearerCredentials) -> None:
        # RequestGuard has checked this already, before the body; checked again here so a
        # route can never be reached unchecked, whatever the middleware order becomes.
        refused = refusal(request.headers.get("authorization"))
        if refused is not None:
            raise HTTPException(refused[0], refused[1], headers=refused[2] or None)

    authorized = [Depends(require_token)]
    auth_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
        503: {"model": ErrorOut, "description": "no API token configured"},
    }
    body_errors: dict[int | str, dict[str, Any]] = {
        408: {"model": ErrorOut, "description": "body not sent in time"},
        413: {"model": ErrorOut, "description": f"body larger than {MAX_BODY_BYTES} bytes"},
    }

    def known_node(node: str) -> str:
        tree = view.tree
        if node not in tree or tree.node(node).kind == "gpu":
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"no node {node!r} in site {tree.site.name!r}"
                + (" (GPUs have no headroom of their own)" if node in tree else ""),
            )
        return node

    not_found: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}}

    @app.get("/v1/health", response_model=HealthOut, tags=["state"])
    async def health() -> HealthOut:
        """Whether the control loop runs and keeps time (``cycle_age_s`` since the last),
        and whether it sees everything it controls: ``degraded`` with ``reasons`` when a
        device is stale or an agent is lost or on its failsafe cap. Always HTTP 200."""
        h = view.health()
        now = clock()
        return HealthOut(
            status=h.status,
            site=view.tree.site.name,
            mode=h.mode,
            now_s=now,
            started_at_s=h.started_at_s,
            last_cycle_at_s=h.last_cycle_at_s,
            cycle_age_s=None if h.last_cycle_at_s is None else max(0.0, now - h.last_cycle_at_s),
            cycle_s=h.cycle_s,
            cycles=h.cycles,
            overruns=h.overruns,
            devices_total=h.devices_total,
            devices_stale=h.devices_stale,
            agents_total=h.agents_total,
            agents_lost=h.agents_lost,
            agents_failsafe=h.agents_failsafe,
            reservations=len(store.active(now)),
            reasons=list(h.reasons),
            message=h.message,
        )

    @app.get("/v1/tree", response_model=TreeOut, tags=["state"])
    async def tree(down_to: DownTo = "node") -> TreeOut:
        """Every node down to ``down_to`` (GPU servers by default), parents first."""
        return TreeOut(
            site=view.tree.site.name,
            now_s=clock(),
            mode=view.health().mode,
            nodes=rows_now(kinds_down_to(down_to)),
        )

    @app.get("/v1/headroom", response_model=HeadroomOut, tags=["scheduling"], responses=not_found)
    async def headroom(
        node: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        down_to: DownTo = "node",
    ) -> HeadroomOut:
        """Headroom of one node (``?node=ID``) or of every node down to ``down_to``.

        ``available_w`` is the least headroom from the node up to the feed: what a
        reservation on it can get.
        """
        if node is not None:
            known_node(node)
            rows = rows_now(kinds_down_to("node"), only=node)
        else:
            rows = rows_now(kinds_down_to(down_to))
        return HeadroomOut(
            nodes=[
                HeadroomRow(
                    id=r.id,
                    kind=r.kind,
                    envelope_w=r.envelope_w,
                    power_w=r.power_w,
                    reserved_w=r.reserved_w,
                    headroom_w=r.headroom_w,
                    available_w=r.available_w,
                )
                for r in rows
            ]
        )

    @app.get("/v1/reservations", response_model=ReservationsOut, tags=["scheduling"])
    async def list_reservations() -> ReservationsOut:
        return ReservationsOut(reservations=[ReservationOut.of(r) for r in store.active(clock())])

    @app.post(
        "/v1/reservations",
        status_code=status.HTTP_201_CREATED,
        response_model=ReservationOut,
        tags=["scheduling"],
        dependencies=authorized,
        responses={
            400: {"model": ErrorOut, "description": "body is not decodable"},
            409: {"model": RefusalOut},
            **not_found,
            **auth_errors,
            **body_errors,
        },
    )
    async def reserve(body: ReservationIn, response: Response) -> ReservationOut | JSONResponse:
        """Hold ``watts`` under ``node`` for ``ttl_s`` seconds, or 409 with the reason.

        Granted only if the node and every level above it have the headroom; it then
        counts in all of their ``reserved_w`` until it expires or is deleted.
        """
        known_node(body.node)
        tree_now = view.tree
        now = clock()
        chain = [body.node, *tree_now.ancestors(body.node)]
        free = free_w(tree_now, view.nodes(), chain)
        got = store.add(
            tree_now,
            node=body.node,
            power_w=body.watts,
            ttl_s=body.ttl_s,
            job_id=body.job_id,
            now_s=now,
            free_w=free,
        )
        readings = {f"{nid}.free_w": free[nid] for nid in chain}
        if isinstance(got, Refusal):
            trail.record(
                audit_kinds.REFUSAL,
                got.reason,
                now_s=now,
                node=body.node,
                job_id=body.job_id,
                readings=readings,
                details={"requested_w": body.watts, "ttl_s": body.ttl_s},
            )
            mets.count_action(audit_kinds.REFUSAL)
            return JSONResponse(
                status_code=status.HTTP_409_CONFLICT,
                content=RefusalOut(
                    detail=got.reason,
                    node=got.node,
                    limiting_node=got.limiting_node,
                    requested_w=got.requested_w,
                    available_w=got.available_w if math.isfinite(got.available_w) else 0.0,
                ).model_dump(),
            )
        trail.record(
            audit_kinds.RESERVATION,
            f"reserved {got.power_w:g} W under {got.node!r} for {body.ttl_s:g} s",
            now_s=now,
            node=got.node,
            job_id=got.job_id,
            readings=readings,
            details={
                "reservation_id": got.id,
                "watts": got.power_w,
                "expires_at_s": got.expires_at_s,
            },
        )
        mets.count_action(audit_kinds.RESERVATION)
        response.headers["Location"] = f"/v1/reservations/{got.id}"
        return ReservationOut.of(got)

    @app.delete(
        "/v1/reservations/{reservation_id}",
        response_model=ReservationOut,
        tags=["scheduling"],
        dependencies=authorized,
        responses={**not_found, **auth_errors},
    )
    async def release(reservation_id: str) -> ReservationOut:
        """Release a reservation before it expires; answers with what was released."""
        now = clock()
        gone = store.delete(reservation_id, now)
        if gone is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no active reservation {reservation_id!r}"
            )
        trail.record(
            audit_kinds.RELEASE,
            f"released {gone.power_w:g} W under {gone.node!r}",
            now_s=now,
            node=gone.node,
            job_id=gone.job_id,
            details={"reservation_id": gone.id},
        )
        mets.count_action(audit_kinds.RELEASE)
        return ReservationOut.of(gone)

    @app.get("/v1/caps", response_model=CapsOut, tags=["state"])
    async def caps() -> CapsOut:
        """Caps in force: per job (or server), the limit per GPU and why."""
        return CapsOut(
            caps=[
                CapOut(
                    job_id=c.job_id,
                    node_id=c.node_id,
                    servers=list(c.servers),
                    gpu_count=c.gpu_count,
                    limit_w=c.limit_w,
                    reason=c.reason,
                    since_s=c.since_s,
                    lease_expires_s=c.lease_expires_s,
                )
                for c in view.caps()
            ]
        )

    @app.get("/v1/events", response_model=EventsOut, tags=["state"])
    async def events(
        limit: Annotated[int, Query(ge=1, le=5000)] = 100,
        since: Annotated[int, Query(ge=0, description="only events with seq above this")] = 0,
        # A plain array, not ``list | None``: a query cannot tell a one-item list from a
        # string, and the nullable anyOf made fuzzers call ``?kind=x`` invalid input.
        kind: Annotated[
            list[EventKindName],
            Query(description="only these kinds (cap, uncap, refusal, ...); repeat for more"),
        ] = [],  # noqa: B006 - FastAPI copies parameter defaults per request
    ) -> EventsOut:
        """The audit trail, oldest first: actions with their reasons and readings."""
        picked = trail.recent(limit=limit, since_seq=since, kinds=kind)
        return EventsOut(
            last_seq=trail.last_seq,
            events=[EventOut.model_validate(e.to_json()) for e in picked],
        )

    @app.get("/v1/history", response_model=HistoryOut, tags=["state"], responses=not_found)
    async def history_of(
        node: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    ) -> HistoryOut:
        """The last minutes of load and envelope of a constraint node (default: a feed)."""
        nid = node if node is not None else view.tree.roots[0]
        known_node(nid)
        return hist.series(nid)

    @app.get("/metrics", tags=["state"], response_class=Response)
    async def metrics_text() -> Response:
        """Prometheus text exposition."""
        now = clock()
        mets.refresh(
            rows_now(mets.kinds),
            view.caps(),
            health=view.health(),
            reservations=len(store.active(now)),
        )
        return Response(mets.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(page["status.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC_TYPES:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name!r}")
        return Response(page[name], media_type=_STATIC_TYPES[name])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and an input of NaN or 1e400 then
        # fails to render as JSON: a 500 for bad input. Same body, numbers made safe.
        # The input is shown cut to MAX_ECHO_CHARS: a 10 MB field echoed whole made the
        # error as big as the attack, and its render held the loop a second time.
        return JSONResponse(
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
            content={
                "detail": [_short_error(e) for e in _json_safe(jsonable_encoder(exc.errors()))]
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Starlette answers a wrong method from the first route with the path, so a
        # path with a GET and a POST route said ``Allow: GET`` (schemathesis, ST205).
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            path = request.scope["path"]
            methods = sorted(
                {
                    m
                    for r in app.routes
                    if isinstance(r, APIRoute) and r.path_regex.match(path)
                    for m in r.methods or ()
                }
            )
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
        return await http_exception_handler(request, exc)

    # The guard must know which routes take a token; every route exists by now.
    protected = [
        r
        for r in app.routes
        if isinstance(r, APIRoute) and any(d.dependency is require_token for d in r.dependencies)
    ]

    def needs_token(scope: Scope) -> bool:
        return any(r.matches(scope)[0] is Match.FULL for r in protected)

    app.add_middleware(
        RequestGuard,
        needs_token=needs_token,
        refusal=refusal,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
    )
    return app


def _shortened(value: Any) -> Any:
    """``value`` if its text is short, else its first MAX_ECHO_CHARS and how long it was."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= MAX_ECHO_CHARS:
        return value
    return f"{text[:MAX_ECHO_CHARS]}... (truncated, {len(text)} chars)"


def _short_error(error: Any) -> Any:
    """One 422 entry with its input, loc parts and ctx values shortened (a key can be
    the long part: ``loc`` names an unknown field by the name it was sent with)."""
    if not isinstance(error, dict):
        return _shortened(error)
    out = dict(error)
    if "input" in out:
        out["input"] = _shortened(out["input"])
    if isinstance(out.get("loc"), list):
        out["loc"] = [_shortened(part) if isinstance(part, str) else part for part in out["loc"]]
    if isinstance(out.get("ctx"), dict):
        out["ctx"] = {k: _shortened(v) for k, v in out["ctx"].items()}
    if isinstance(out.get("msg"), str):
        out["msg"] = _shortened(out["msg"])
    return out


def _json_safe(value: Any) -> Any:
    """Non-finite floats (not JSON) as their text, everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Serving inside the daemon's loop


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signals alone: SIGTERM and SIGHUP belong to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclasses.dataclass
class ConnectionStats:
    """What the connection limits did, for tests and logs."""

    header_timeouts: int = 0
    refused_full: int = 0


def _guarded_protocol(
    header_timeout_s: float, max_connections: int, stats: ConnectionStats
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head timeout and a connection cap.

    uvicorn (0.30-0.55) times out only an idle *kept-alive* connection, and only from
    its first response on: a client that connects and sends nothing, or half a head,
    holds its socket for good (the audit left 2,000 such open). Here the head must be
    complete within ``header_timeout_s`` of connecting or of the last response, else
    the connection is closed. ``limit_concurrency`` would answer 503 only once a head
    has been read, so the cap is taken at accept: beyond ``max_connections`` a
    connection gets a 503 straight away, is half-closed and dropped a second later
    (data it sends meanwhile is discarded, so its client reads the 503 and not a reset).
    """

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            full = len(self.connections) >= max_connections
            super().connection_made(transport)  # type: ignore[arg-type]
            if full:
                self._refuse()
                return
            self._arm_header_timer()

        def _refuse(self) -> None:
            self._refused = True
            self.connections.discard(self)
            stats.refused_full += 1
            log.warning("API: %d connections open, one more refused with 503", max_connections)
            self.transport.write(_FULL_RESPONSE)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(1.0, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a complete head was parsed: a request began
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            self._arm_header_timer()  # before: a pipelined request in super() disarms it
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                stats.header_timeouts += 1
                log.info("API: no complete request head within %g s; closed", header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol


_FULL_BODY = b'{"detail":"too many connections to the API; retry shortly"}'
_FULL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_FULL_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\nconnection: close\r\n\r\n" + _FULL_BODY
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binding_note(host: str) -> str:
    """One line saying who can reach an API bound to ``host`` (the demo prints it)."""
    if is_loopback(host):
        return f"{host} only (loopback): not reachable from other machines"
    return (
        f"{host}: reachable from other machines (integrations.api.host); reading endpoints"
        " are open, changes need the token"
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket of our own: a taken port is an ``OSError`` here, where uvicorn
    would ``sys.exit``, and port 0 tells us the port the kernel picked."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """Runs an app on uvicorn as one task of the daemon: ``await serve()`` until
    ``await shutdown()``; :meth:`bind` first if the port is needed before serving."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        header_timeout_s: float = HEADER_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self.connection_stats = ConnectionStats()
        self._config = uvicorn.Config(
            app,
            http=_guarded_protocol(header_timeout_s, max_connections, self.connection_stats),
            log_config=None,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=5,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        self._server = _EmbeddedServer(self._config)
        self._sock: socket.socket | None = None
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._serving = False

    @classmethod
    def from_config(cls, app: FastAPI, cfg: ApiConfig) -> ApiServer:
        return cls(app, host=cfg.host, port=cfg.port)

    def bind(self) -> int:
        """Open the listening socket (idempotent); returns the bound port."""
        if self._sock is None:
            self._sock = _bind(self.host, self._requested_port)
            if not is_loopback(self.host):
                log.warning("API listens on %s", binding_note(self.host))
        return self.port

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("ApiServer is not bound yet: call bind() or serve() first")
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def serve(self) -> None:
        """Serve until :meth:`shutdown`; cancelling the task closes the socket too."""
        try:
            self.bind()
        except OSError:
            self._stopped.set()  # wait_started() callers learn it will never start
            raise
        sock = self._sock
        assert sock is not None
        self._serving = True
        watcher = asyncio.create_task(self._watch_started(), name="api-started")
        try:
            await self._server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits when the lifespan fails
            raise RuntimeError(f"API server failed to start (exit {exc.code})") from None
        finally:
            watcher.cancel()
            for srv in getattr(self._server, "servers", ()):
                srv.close()
            sock.close()
            self._stopped.set()

    async def _watch_started(self) -> None:
        # uvicorn has no started event, only a flag. The socket listens already, so a
        # client that connects earlier waits in the backlog; this is for callers that log.
        while not self._server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._started.set()

    async def wait_started(self) -> None:
        """Return once requests are being answered; raise if serving ended first."""
        waits = {
            asyncio.create_task(self._started.wait()),
            asyncio.create_task(self._stopped.wait()),
        }
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not self._started.is_set():
            raise RuntimeError("the API server stopped before it started")

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (2 s at most), return when done."""
        self._server.should_exit = True
        if self._serving:
            await self._stopped.wait()
        elif self._sock is not None:
            self._sock.close()
