"""The controller-agent link: leases down, telemetry up, over MQTT or in-process.

Both transports have the same two faces, so the daemon and the agent do not know which
one they run on:

- controller side (:class:`ControllerLink`): ``send_lease(agent_id, lease)`` and
  ``telemetry()``, an async iterator of every agent's reports;
- agent side (:class:`AgentLink`): ``leases()``, an async iterator of what the
  controller sent (a :class:`BadMessage` for a payload that failed validation, so the
  agent can say so), and ``send_telemetry(t)``.

Sending never blocks and never awaits: the control cycle and the agent's sampling loop
must not wait on a broker. Only the newest message matters in both directions, so a
send replaces what is still queued for the same agent instead of queuing behind it;
telemetry the controller has not consumed yet is dropped oldest first (and counted).
Every link has ``run()`` (a task for its lifetime) and ``stop()``.

MQTT topics (see docs/agent-link.md): ``<prefix>/<site>/agent/<agent_id>/lease``
(controller -> agent, QoS 1, never retained), ``.../telemetry`` (agent -> controller,
QoS 0) and ``.../status`` (the agent's retained ``online``/``offline`` with a last will).

Authentication (controller.agentlink.msgauth): given keys, the MQTT sides seal what they send and
open what they receive, and a message that fails is refused and counted
(``auth_refused``), never decoded: the agent gets an :class:`Unauthenticated` in place of
the lease, the controller drops the report. Without keys both sides send plain JSON and
accept anything well-formed (a lab without keys; ``run`` and ``agent`` warn loudly). The
in-process link carries Python objects between tasks of one process, which nobody else
can reach; it does not sign.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Generic, Protocol, TypeVar

import aiomqtt

from controller.agentlink.lease import (
    Lease,
    MessageError,
    Telemetry,
    decode_lease,
    decode_telemetry,
)
from controller.agentlink.msgauth import (
    AuthError,
    KeyFile,
    KeyStore,
    RefusalLog,
    is_sealed,
    open_sealed,
    seal,
    unwrap,
)
from controller.model.config import MqttConfig
from controller.model.wire_limits import ID_PATTERN
from controller.support.mqtt import Backoff, broker_settings, make_client, run_with_reconnect

log = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)

ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A lease payload that failed validation: handed to the agent so it can say why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unauthenticated:
    """A lease payload that failed authentication: nothing of it may be trusted or used."""

    reason: str


LeaseMessage = Lease | BadMessage | Unauthenticated


class ControllerLink(Protocol):
    def send_lease(self, agent_id: str, lease: Lease) -> None:
        """Queue a lease for one agent (replacing one still queued for it); never blocks."""
        ...

    def telemetry(self) -> AsyncIterator[Telemetry]:
        """Every agent's reports as they arrive; one consumer. Ends when the link stops."""
        ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


class AgentLink(Protocol):
    def leases(self) -> AsyncIterator[LeaseMessage]:
        """Leases addressed to this agent as they arrive. Ends when the link stops."""
        ...

    def send_telemetry(self, telemetry: Telemetry) -> None:
        """Queue a report (replacing one not sent yet); never blocks."""
        ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class LinkStats:
    """Counters for /metrics and tests; what a side does not do stays 0."""

    connected: bool = False
    connects: int = 0
    leases_sent: int = 0
    leases_superseded: int = 0  # replaced by a newer lease before they went out
    leases_dropped: int = 0  # too old to send, link cut, or no such agent
    telemetry_received: int = 0
    telemetry_sent: int = 0
    telemetry_dropped: int = 0
    bad_messages: int = 0
    retained_leases_ignored: int = 0
    auth_refused: int = 0  # unsigned, unknown key or bad MAC (leases at the agent, reports here)
    leases_no_key: int = 0  # not sent: no usable key file for the agent


class _Counters:
    def __init__(self) -> None:
        self.values = asdict(LinkStats())

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n

    def snapshot(self) -> LinkStats:
        return LinkStats(**self.values)


T = TypeVar("T")


class _Inbox(Generic[T]):
    """A bounded FIFO for one consumer that drops the oldest when full and can be closed."""

    def __init__(self, maxlen: int, on_drop: Callable[[], None]) -> None:
        self._items: deque[T] = deque()
        self._maxlen = maxlen
        self._on_drop = on_drop
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, item: T) -> None:
        if self._closed:
            return
        if len(self._items) >= self._maxlen:
            self._items.popleft()
            self._on_drop()
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def reopen(self) -> None:
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            while self._items:
                yield self._items.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()


# ---------------------------------------------------------------------------
# In-process


class InProcessLink:
    """The link for the demo and the simulator: asyncio queues, one event loop, no network.

    ``controller()`` is the (single) controller side, ``agent(agent_id)`` an agent's
    side. ``cut(agent_id)`` drops everything to and from that agent, ``cut()`` drops
    everything (a dead controller, or a network split); ``heal`` undoes it. With
    ``through_json`` every message is encoded and decoded on the way, as on the wire.
    """

    def __init__(
        self,
        *,
        telemetry_queue_size: int = 20_000,
        lease_queue_size: int = 16,
        through_json: bool = False,
    ) -> None:
        self._counters = _Counters()
        self._through_json = through_json
        self._lease_queue_size = lease_queue_size
        self._telemetry: _Inbox[Telemetry] = _Inbox(
            telemetry_queue_size, lambda: self._counters.add("telemetry_dropped")
        )
        self._agents: dict[str, InProcessAgentSide] = {}
        self._cut_all = False
        self._cut: set[str] = set()
        self._controller = InProcessControllerSide(self)

    def controller(self) -> InProcessControllerSide:
        return self._controller

    def agent(self, agent_id: str) -> InProcessAgentSide:
        side = self._agents.get(agent_id)
        if side is None:
            side = self._agents[agent_id] = InProcessAgentSide(self, agent_id)
        return side

    def cut(self, agent_id: str | None = None) -> None:
        if agent_id is None:
            self._cut_all = True
        else:
            self._cut.add(agent_id)

    def heal(self, agent_id: str | None = None) -> None:
        if agent_id is None:
            self._cut_all = False
            self._cut.clear()
        else:
            self._cut.discard(agent_id)

    def is_cut(self, agent_id: str) -> bool:
        return self._cut_all or agent_id in self._cut

    def stats(self) -> LinkStats:
        return self._counters.snapshot()

    # -- used by the sides --

    def _deliver_lease(self, agent_id: str, lease: Lease) -> None:
        side = self._agents.get(agent_id)
        if side is None or self.is_cut(agent_id):
            self._counters.add("leases_dropped")
            return
        msg: LeaseMessage = lease
        if self._through_json:
            try:
                msg = decode_lease(lease.encode())
            except MessageError as exc:
                msg = BadMessage(str(exc))
        side._inbox.put(msg)
        self._counters.add("leases_sent")

    def _deliver_telemetry(self, agent_id: str, telemetry: Telemetry) -> None:
        if self.is_cut(agent_id):
            self._counters.add("telemetry_dropped")
            return
        if self._through_json:
            telemetry = decode_telemetry(telemetry.encode())
        self._telemetry.put(telemetry)
        self._counters.add("telemetry_sent")
        self._counters.add("telemetry_received")


class InProcessControllerSide:
    def __init__(self, hub: InProcessLink) -> None:
        self._hub = hub
        self._stopped = asyncio.Event()

    def send_lease(self, agent_id: str, lease: Lease) -> None:
        self._hub._deliver_lease(agent_id, lease)

    def telemetry(self) -> AsyncIterator[Telemetry]:
        return self._hub._telemetry.__aiter__()

    def stats(self) -> LinkStats:
        return self._hub.stats()

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()
        self._hub._telemetry.close()


class InProcessAgentSide:
    def __init__(self, hub: InProcessLink, agent_id: str) -> None:
        self._hub = hub
        self.agent_id = agent_id
        self._inbox: _Inbox[LeaseMessage] = _Inbox(
            hub._lease_queue_size, lambda: hub._counters.add("leases_superseded")
        )
        self._stopped = asyncio.Event()

    def leases(self) -> AsyncIterator[LeaseMessage]:
        return self._inbox.__aiter__()

    def send_telemetry(self, telemetry: Telemetry) -> None:
        self._hub._deliver_telemetry(self.agent_id, telemetry)

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()
        self._inbox.close()


# ---------------------------------------------------------------------------
# MQTT


def check_topic_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level (use A-Z a-z 0-9 _.:-)")
    return value


@dataclass(frozen=True)
class AgentTopics:
    """``<prefix>/<site>/agent/<agent_id>/{lease,telemetry,status}``."""

    base: str

    @classmethod
    def for_site(cls, prefix: str, site: str) -> AgentTopics:
        return cls(f"{prefix.strip('/')}/{check_topic_id(site, 'site')}/agent")

    def lease(self, agent_id: str) -> str:
        return f"{self.base}/{check_topic_id(agent_id, 'agent id')}/lease"

    def telemetry(self, agent_id: str) -> str:
        return f"{self.base}/{check_topic_id(agent_id, 'agent id')}/telemetry"

    def status(self, agent_id: str) -> str:
        return f"{self.base}/{check_topic_id(agent_id, 'agent id')}/status"

    @property
    def all_telemetry(self) -> str:
        return f"{self.base}/+/telemetry"

    @property
    def all_status(self) -> str:
        return f"{self.base}/+/status"

    def agent_of(self, topic: str) -> str | None:
        """The agent id in one of this site's agent topics, else None."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        return parts[0] if len(parts) == 2 and parts[0] else None


def _payload(message: aiomqtt.Message) -> bytes:
    p = message.payload
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return b"" if p is None else str(p).encode()


class _MqttEndpoint:
    """Connection lifecycle shared by both sides: reconnect loop, stop, wake-ups."""

    name = "agent-link"

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        identifier: str,
        will: aiomqtt.Will | None,
        backoff: Backoff | None,
        keepalive_s: int,
        tls_context: ssl.SSLContext | None,
        environ: Mapping[str, str] | None,
    ) -> None:
        self.settings = broker_settings(cfg, environ)  # a missing secret fails here, at start
        self.identifier = identifier
        self._will = will
        self._backoff = backoff or Backoff()
        self._keepalive_s = keepalive_s
        self._tls_context = tls_context
        self._counters = _Counters()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def stats(self) -> LinkStats:
        return self._counters.snapshot()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run(self) -> None:
        """Connect, and reconnect with backoff, until :meth:`stop` (or cancellation)."""
        self._run_task = asyncio.current_task()
        try:
            await run_with_reconnect(
                self._connect,
                self._session,
                backoff=self._backoff,
                on_state=self._on_state,
                name=f"{self.name} {self.settings.host}:{self.settings.port}",
                stop=self._stopping,
            )
        finally:
            self._closed()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """End the session cleanly (the agent says ``offline``); give up after ``timeout_s``."""
        self._stopping.set()
        self._wake.set()
        task = self._run_task
        if task is None or task.done():
            self._closed()
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            log.warning(
                "%s: clean stop took over %.1f s; dropping the connection", self.name, timeout_s
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _connect(self) -> aiomqtt.Client:
        return make_client(
            self.settings,
            identifier=self.identifier,
            will=self._will,
            keepalive_s=self._keepalive_s,
            tls_context=self._tls_context,
        )

    def _on_state(self, connected: bool) -> None:
        self._counters.values["connected"] = connected
        if connected:
            self._counters.add("connects")
            self._connected.set()
            self._wake.set()
        else:
            self._connected.clear()

    async def _session(self, client: aiomqtt.Client) -> None:
        await self._subscribe(client)
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive(client), name=f"{self.name}-receive")

                async def publish_then_stop() -> None:
                    await self._publish_loop(client)
                    receiver.cancel()

                tg.create_task(publish_then_stop(), name=f"{self.name}-publish")
        except asyncio.CancelledError:
            # Cancelled from outside: the graceful disconnect that follows suppresses the
            # last will, so do its job ourselves (best effort, briefly).
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                await asyncio.wait_for(self._on_session_end(client), 1.0)
            raise

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        await self._on_session_start(client)
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            await self._flush(client)
        await self._flush(client)
        await self._on_session_end(client)

    # hooks

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        raise NotImplementedError

    async def _receive(self, client: aiomqtt.Client) -> None:
        raise NotImplementedError

    async def _flush(self, client: aiomqtt.Client) -> None:
        raise NotImplementedError

    async def _on_session_start(self, client: aiomqtt.Client) -> None:
        return None

    async def _on_session_end(self, client: aiomqtt.Client) -> None:
        return None

    def _closed(self) -> None:
        return None


class MqttControllerLink(_MqttEndpoint):
    """The controller's side of the link on a broker: one per controller (site).

    Leases go out QoS 1, not retained: a lease held by the broker would be handed to an
    agent that restarts, possibly long after the controller that sent it stopped. A
    lease that waited in the queue longer than ``max_queue_s`` (default: half its
    ``lease_s``) while the broker was away is dropped instead of sent late: the agent
    counts a lease from its receipt, so a late one would extend an old cap.
    """

    name = "agent-link(controller)"

    def __init__(
        self,
        cfg: MqttConfig,
        site: str,
        *,
        identifier: str | None = None,
        backoff: Backoff | None = None,
        keepalive_s: int = 15,
        tls_context: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
        telemetry_queue_size: int = 20_000,
        max_queue_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        keys: KeyStore | None = None,
    ) -> None:
        super().__init__(
            cfg,
            identifier=identifier or f"rackpower-{site}-ctl-{secrets.token_hex(4)}",
            will=None,
            backoff=backoff,
            keepalive_s=keepalive_s,
            tls_context=tls_context,
            environ=environ,
        )
        self.topics = AgentTopics.for_site(cfg.topic_prefix, site)
        self._max_queue_s = max_queue_s
        self._clock = clock
        self._pending: dict[str, tuple[Lease, float]] = {}
        self._telemetry: _Inbox[Telemetry] = _Inbox(
            telemetry_queue_size, lambda: self._counters.add("telemetry_dropped")
        )
        self._status: dict[str, bool] = {}
        self.keys = keys
        self._refusals = RefusalLog(log, "agent telemetry")
        self._no_key = RefusalLog(log, "to send a lease")

    @property
    def authenticated(self) -> bool:
        return self.keys is not None

    def send_lease(self, agent_id: str, lease: Lease) -> None:
        check_topic_id(agent_id, "agent id")
        if agent_id in self._pending:
            self._counters.add("leases_superseded")
        self._pending[agent_id] = (lease, self._clock())
        self._wake.set()

    def telemetry(self) -> AsyncIterator[Telemetry]:
        return self._telemetry.__aiter__()

    def agents_online(self) -> dict[str, bool]:
        """Each agent's last retained status (``online``/``offline``, its last will)."""
        return dict(self._status)

    def _closed(self) -> None:
        self._telemetry.close()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.all_telemetry, qos=0)
        await client.subscribe(self.topics.all_status, qos=1)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            agent_id = self.topics.agent_of(topic)
            if agent_id is None:
                continue
            if topic.endswith("/status"):
                state = _payload(message)
                if state in (ONLINE, OFFLINE):
                    self._status[agent_id] = state == ONLINE
                continue
            payload = _payload(message)
            try:
                payload = self._open(agent_id, payload)
            except AuthError as exc:
                self._counters.add("auth_refused")
                self._refusals.refused(f"{topic}: {exc}")
                continue
            try:
                report = decode_telemetry(payload)
            except MessageError as exc:
                self._counters.add("bad_messages")
                log.warning("%s: %s on %s", self.name, exc, topic)
                continue
            if report.agent_id != agent_id:
                self._counters.add("bad_messages")
                log.warning(
                    "%s: telemetry from %r on %s's topic", self.name, report.agent_id, agent_id
                )
                continue
            self._counters.add("telemetry_received")
            self._telemetry.put(report)

    def _open(self, agent_id: str, payload: bytes) -> bytes:
        if self.keys is None:  # unauthenticated: take a sealed report's content unchecked
            return unwrap(payload)[2] if is_sealed(payload) else payload
        keys = self.keys.keys(agent_id)
        if keys is None:
            raise AuthError(f"no usable key for {agent_id}: {self.keys.problem(agent_id)}")
        return open_sealed("telemetry", agent_id, payload, keys)

    def _wire(self, agent_id: str, lease: Lease) -> bytes | None:
        if self.keys is None:
            return lease.encode()
        keys = self.keys.keys(agent_id)
        if keys is None:
            self._counters.add("leases_no_key")
            self._no_key.refused(f"no usable key for {agent_id}: {self.keys.problem(agent_id)}")
            return None
        return seal("lease", agent_id, lease.encode(), keys[0])

    async def _flush(self, client: aiomqtt.Client) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        now = self._clock()
        sends = []
        for agent_id, (lease, queued_s) in batch.items():
            limit_s = self._max_queue_s if self._max_queue_s is not None else lease.lease_s / 2
            if now - queued_s > limit_s:
                self._counters.add("leases_dropped")
                log.warning(
                    "%s: lease %d for %s waited %.1f s for the broker; dropped, not sent late",
                    self.name, lease.seq, agent_id, now - queued_s,
                )  # fmt: skip
                continue
            wire = self._wire(agent_id, lease)
            if wire is not None:
                sends.append((agent_id, lease, queued_s, wire))
        # QoS 1 publishes wait for the broker's PUBACK: send them side by side.
        results = await asyncio.gather(
            *(client.publish(self.topics.lease(a), w, qos=1) for a, _, _, w in sends),
            return_exceptions=True,
        )
        failed: BaseException | None = None
        for (agent_id, lease, queued_s, _), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                failed = failed or result
                self._pending.setdefault(agent_id, (lease, queued_s))  # unless a newer one
            else:
                self._counters.add("leases_sent")
        if failed is not None:
            raise failed


class MqttAgentLink(_MqttEndpoint):
    """An agent's side of the link on a broker.

    On every connection it publishes its retained ``status`` as ``online`` (with
    ``offline`` as its last will, and published itself on a clean stop), subscribes to
    its lease topic, and sends telemetry QoS 0. A retained lease (which this project
    never publishes) is ignored and counted: it could be any age.
    """

    name = "agent-link(agent)"

    def __init__(
        self,
        cfg: MqttConfig,
        site: str,
        agent_id: str,
        *,
        identifier: str | None = None,
        backoff: Backoff | None = None,
        keepalive_s: int = 15,
        tls_context: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
        lease_queue_size: int = 16,
        keys: KeyFile | None = None,
    ) -> None:
        topics = AgentTopics.for_site(cfg.topic_prefix, site)
        super().__init__(
            cfg,
            identifier=identifier or f"rackpower-agent-{agent_id}-{secrets.token_hex(3)}",
            will=aiomqtt.Will(topics.status(agent_id), OFFLINE, qos=1, retain=True),
            backoff=backoff,
            keepalive_s=keepalive_s,
            tls_context=tls_context,
            environ=environ,
        )
        self.topics = topics
        self.agent_id = agent_id
        self._leases: _Inbox[LeaseMessage] = _Inbox(
            lease_queue_size, lambda: self._counters.add("leases_superseded")
        )
        self._outgoing: Telemetry | None = None
        self.keys = keys

    @property
    def authenticated(self) -> bool:
        return self.keys is not None

    def leases(self) -> AsyncIterator[LeaseMessage]:
        return self._leases.__aiter__()

    def send_telemetry(self, telemetry: Telemetry) -> None:
        if self._outgoing is not None:
            self._counters.add("telemetry_dropped")
        self._outgoing = telemetry
        self._wake.set()

    def _closed(self) -> None:
        self._leases.close()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.lease(self.agent_id), qos=1)

    async def _on_session_start(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.status(self.agent_id), ONLINE, qos=1, retain=True)

    async def _on_session_end(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.status(self.agent_id), OFFLINE, qos=1, retain=True)

    async def _receive(self, client: aiomqtt.Client) -> None:
        topic = self.topics.lease(self.agent_id)
        async for message in client.messages:
            if not message.topic.matches(topic):
                continue
            if message.retain:
                self._counters.add("retained_leases_ignored")
                log.warning(
                    "%s: ignoring a retained lease on %s (could be any age)", self.name, topic
                )
                continue
            self._leases.put(self._open(_payload(message)))

    def _open(self, payload: bytes) -> LeaseMessage:
        """Authenticate, then decode; what fails either is handed on as why, not as a lease."""
        try:
            if self.keys is not None:
                payload = open_sealed("lease", self.agent_id, payload, self.keys.current())
            elif is_sealed(payload):  # unauthenticated agent: take the content unchecked
                payload = unwrap(payload)[2]
        except AuthError as exc:
            self._counters.add("auth_refused")
            return Unauthenticated(str(exc))
        try:
            return decode_lease(payload)
        except MessageError as exc:
            self._counters.add("bad_messages")
            return BadMessage(str(exc))

    async def _flush(self, client: aiomqtt.Client) -> None:
        report, self._outgoing = self._outgoing, None
        if report is None:
            return
        wire = report.encode()
        if self.keys is not None:
            wire = seal("telemetry", self.agent_id, wire, self.keys.current()[0])
        try:
            await client.publish(self.topics.telemetry(self.agent_id), wire, qos=0)
        except aiomqtt.MqttError:
            self._counters.add("telemetry_dropped")
            raise
        self._counters.add("telemetry_sent")
