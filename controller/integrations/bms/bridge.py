"""The BMS link: status, telemetry and alarms out over MQTT; commands in, each answered.

The control cycle never waits for the network. It hands over telemetry and alarms with
plain (non-async) calls that only touch in-memory queues; one publisher task per
connection drains them in priority order (status, alarms, acks, telemetry). Telemetry is
the only thing that may be dropped: its queue is bounded, the oldest frame goes first and
every drop is counted. Alarms are state, not events: the link keeps the set of active
alarms and republishes it (retained) on every new connection, so a broker that restarted
without persistence still shows them.

Topic tree (``<prefix>/<site>/...``; see docs/mqtt.md for payloads):

- ``status``            retained ``online``; ``offline`` as last will and on clean stop
- ``telemetry/<node>``  JSON per tree node, every ``telemetry_period_s``
- ``alarms/<alarm_id>`` retained JSON while active; empty retained payload clears it
- ``cmd``               commands in (JSON with ``type`` and ``command_id``)
- ``cmd/ack``           one ack per command: accepted or rejected, and why
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import aiomqtt

from controller.core.alarms import Alarm
from controller.core.overrides import EnvelopeOverrides
from controller.core.setpoints import (
    DEFAULT_LIMITS,
    Ack,
    Command,
    CommandLimits,
    CommandProcessor,
    CommandRefused,
    DemandResponse,
    EnvelopeOverride,
    format_ts,
)
from controller.core.view import NodeTelemetry
from controller.model.config import MqttConfig
from controller.model.topology import PowerTree
from controller.support.mqtt import (
    Backoff,
    SessionTaskEnded,
    broker_settings,
    inbox_type,
    make_client,
    run_until_any_ends,
    run_with_reconnect,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Topics


def topic_level(text: str) -> str:
    """Make an id safe as one topic level: ``/``, ``+``, ``#`` and NUL are percent-escaped."""
    return (
        text.replace("%", "%25")
        .replace("/", "%2F")
        .replace("+", "%2B")
        .replace("#", "%23")
        .replace("\0", "%00")
    )


@dataclass(frozen=True)
class BmsTopics:
    base: str

    @classmethod
    def for_site(cls, prefix: str, site: str) -> BmsTopics:
        return cls(f"{prefix.strip('/')}/{topic_level(site)}")

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def cmd(self) -> str:
        return f"{self.base}/cmd"

    @property
    def ack(self) -> str:
        return f"{self.base}/cmd/ack"

    def telemetry(self, node: str) -> str:
        return f"{self.base}/telemetry/{topic_level(node)}"

    def alarm(self, alarm_id: str) -> str:
        return f"{self.base}/alarms/{topic_level(alarm_id)}"


# ---------------------------------------------------------------------------
# The link


@dataclass(frozen=True)
class BmsStats:
    connected: bool
    connects: int
    published: int
    telemetry_dropped: int
    acks_dropped: int
    commands_accepted: int
    commands_rejected: int
    commands_duplicate: int
    retained_commands_ignored: int
    commands_dropped: int
    internal_errors: int


@dataclass
class _Counters:
    connected: bool = False
    connects: int = 0
    published: int = 0
    telemetry_dropped: int = 0
    acks_dropped: int = 0
    commands_accepted: int = 0
    commands_rejected: int = 0
    commands_duplicate: int = 0
    retained_commands_ignored: int = 0
    commands_dropped: int = 0  # the bounded inbox was full (a flood): no ack possible
    internal_errors: int = 0  # a bug, acked "rejected: internal error"


def _finite(value: float | str | None) -> float | str | None:
    """JSON has no NaN: a non-finite number is published as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class BmsLink:
    """One controller's presence on the BMS broker. Create once; ``run`` it as a task.

    ``telemetry`` is called every ``telemetry_period_s`` from the link's own task (it
    must be cheap and not block: return the latest snapshot). ``on_command`` receives
    every accepted command after validation and before the ack; it may raise
    :class:`~controller.core.setpoints.CommandRefused` to turn it down (the reason is acked).
    ``on_rejected`` gets the ack of a rejected command (for the audit trail), within the
    same budget as the log lines so a flood of junk does not flood the audit either.
    Accepted envelope overrides and demand responses are also written to ``overrides``.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        tree: PowerTree,
        *,
        telemetry: Callable[[], Iterable[NodeTelemetry]] | None = None,
        on_command: Callable[[Command], None] | None = None,
        on_rejected: Callable[[Ack], None] | None = None,
        overrides: EnvelopeOverrides | None = None,
        limits: CommandLimits | None = None,
        clock: Callable[[], float] = time.time,
        telemetry_queue_size: int = 2_000,
        ack_queue_size: int = 1_000,
        inbox_messages: int = 10_000,
        inbox_bytes: int = 16 * 1024 * 1024,
        max_commands_per_s: float = 500.0,
        backoff: Backoff | None = None,
        identifier: str | None = None,
        keepalive_s: int = 15,
        tls_context: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tree = tree
        self.topics = BmsTopics.for_site(cfg.topic_prefix, tree.site.name)
        self.settings = broker_settings(cfg, environ)  # a missing secret fails here, at start
        self.identifier = identifier or f"rackpower-{tree.site.name}-{secrets.token_hex(4)}"
        self.overrides = overrides
        self._telemetry_source = telemetry
        self._on_command = on_command
        self._on_rejected = on_rejected
        self._clock = clock
        if limits is None:
            limits = replace(
                DEFAULT_LIMITS,
                allow_mode_commands=cfg.allow_mode_commands,
                max_advisory_s=cfg.max_advisory_s,
            )
        self._processor = CommandProcessor(tree, limits)
        self._inbox_type = inbox_type(inbox_messages, inbox_bytes, self._count_inbox_drop)
        self._backoff = backoff or Backoff()
        self._keepalive_s = keepalive_s
        self._tls_context = tls_context

        self._telemetry: deque[_Outgoing] = deque()
        self._telemetry_max = telemetry_queue_size
        self._acks: deque[_Outgoing] = deque()
        self._acks_max = ack_queue_size
        self._ack_space = asyncio.Event()
        # Commands are handled at most this fast (a token bucket, 50 at once), so a flood
        # takes a bounded share of the loop the control cycle runs on; the excess waits
        # in the bounded inbox and what overflows it is counted as commands_dropped.
        self._cmd_rate_per_s = max_commands_per_s
        self._cmd_tokens = _CMD_BURST
        self._cmd_tokens_at_s = -math.inf
        self._log_window_s = -math.inf
        self._log_lines = 0
        self._log_suppressed = 0
        self._alarms: dict[str, Alarm] = {}
        self._alarms_dirty: set[str] = set()
        self._status_pending = False
        self._counters = _Counters()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None

    # -- called by the daemon (never block, never await) ------------------------------

    def publish_telemetry(self, frames: Iterable[NodeTelemetry]) -> None:
        """Queue one frame per node; when the queue is full the oldest frames go."""
        for f in frames:
            payload = {
                "node": f.node,
                "kind": self.tree.node(f.node).kind if f.node in self.tree else None,
                "power_w": _finite(f.power_w),
                "envelope_w": _finite(f.envelope_w),
                "headroom_w": _finite(f.headroom_w),
                "ts": format_ts(f.ts_s),
                "quality": f.quality.value,
            }
            if len(self._telemetry) >= self._telemetry_max:
                self._telemetry.popleft()
                self._counters.telemetry_dropped += 1
            self._telemetry.append(
                _Outgoing(self.topics.telemetry(f.node), _dumps(payload), 0, False)
            )
        self._wake.set()

    def raise_alarm(self, alarm: Alarm) -> None:
        """Make an alarm active (retained). Raising it again unchanged publishes nothing."""
        current = self._alarms.get(alarm.alarm_id)
        if current is not None and (current.severity, current.message, current.node) == (
            alarm.severity,
            alarm.message,
            alarm.node,
        ):
            return
        if current is not None:  # an update keeps the time it was first raised
            alarm = Alarm(
                alarm.kind,
                alarm.subject,
                alarm.message,
                current.raised_at_s,
                alarm.severity,
                alarm.node,
                alarm.details,
            )
        self._alarms[alarm.alarm_id] = alarm
        self._alarms_dirty.add(alarm.alarm_id)
        self._wake.set()

    def clear_alarm(self, alarm_id: str) -> bool:
        """Clear an active alarm (empty retained payload); False if it was not active."""
        if self._alarms.pop(alarm_id, None) is None:
            return False
        self._alarms_dirty.add(alarm_id)
        self._wake.set()
        return True

    def replace_tree(self, tree: PowerTree) -> None:
        """After a config reload: validate later commands against the new tree.

        The topic base stays (a renamed site needs a new link: the will is per connection).
        """
        if tree.site.name != self.tree.site.name:
            raise ValueError("the site was renamed: start a new BmsLink for the new topics")
        self.tree = tree
        self._processor.tree = tree
        if self.overrides is not None:
            self.overrides.replace_tree(tree)

    @property
    def active_alarms(self) -> tuple[str, ...]:
        return tuple(self._alarms)

    def stats(self) -> BmsStats:
        self._counters.internal_errors = self._processor.internal_errors
        return BmsStats(**asdict(self._counters))

    def _count_inbox_drop(self) -> None:
        self._counters.commands_dropped += 1

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, reconnect with backoff, until :meth:`stop` (or cancellation)."""
        self._run_task = asyncio.current_task()
        async with asyncio.TaskGroup() as tg:
            ticker = (
                tg.create_task(self._telemetry_ticker(), name="bms-telemetry")
                if self._telemetry_source is not None
                else None
            )
            await run_with_reconnect(
                self._connect,
                self._session,
                backoff=self._backoff,
                on_state=self._on_state,
                name=f"bms {self.settings.host}:{self.settings.port}",
                stop=self._stopping,
            )
            if ticker is not None:
                ticker.cancel()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued, publish ``offline``, disconnect; give up after ``timeout_s``."""
        self._stopping.set()
        self._wake.set()
        task = self._run_task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            log.warning("bms: clean stop took over %.1f s; dropping the connection", timeout_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- inside ----------------------------------------------------------------------

    def _connect(self) -> aiomqtt.Client:
        will = aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True)
        return make_client(
            self.settings,
            identifier=self.identifier,
            will=will,
            keepalive_s=self._keepalive_s,
            tls_context=self._tls_context,
            queue_type=self._inbox_type,
        )

    def _on_state(self, connected: bool) -> None:
        self._counters.connected = connected
        if connected:
            self._counters.connects += 1
            # A new session: say we are online and restate every alarm we hold, since a
            # broker that restarted may have lost its retained messages.
            self._status_pending = True
            self._alarms_dirty.update(self._alarms)
            self._wake.set()

    async def _session(self, client: aiomqtt.Client) -> None:
        """Receive and publish until either ends (F4): then the session is over.

        A clean stop is the publisher returning once ``stop()`` was asked and the queues
        are drained; any other end (the receiver returning or failing, a publish failing)
        ends the session with an error so :func:`run_with_reconnect` connects again.
        """
        await client.subscribe(self.topics.cmd, qos=1)
        over = asyncio.Event()

        async def publish_then_stop() -> None:
            await self._publish_loop(client, over)
            await client.publish(self.topics.status, b"offline", qos=1, retain=True)

        try:
            ended = await run_until_any_ends(
                {"bms-receive": self._receive(client), "bms-publish": publish_then_stop()}
            )
        except asyncio.CancelledError:
            # Cancelled from outside: the graceful disconnect that follows suppresses the
            # last will, so say offline ourselves (best effort, briefly).
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                await asyncio.wait_for(
                    client.publish(self.topics.status, b"offline", qos=1, retain=True), 1.0
                )
            raise
        finally:
            over.set()  # a task left behind by a swallowed cancellation stops at its next turn
            self._wake.set()
            self._ack_space.set()
        if ended != "bms-publish" or not self._stopping.is_set():
            raise SessionTaskEnded(f"bms: {ended} ended; reconnecting")

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(self.topics.cmd):
                continue
            if message.retain:
                # Replayed on subscribe: it was handled (or was stale) when first sent.
                self._counters.retained_commands_ignored += 1
                log.warning("bms: ignoring a retained command on %s", message.topic)
                continue
            # F6: backpressure instead of dropping acks. While the ack queue is full the
            # receiver waits for the publisher; commands wait in the bounded inbox
            # (whose overflow is counted as commands_dropped).
            while len(self._acks) >= self._acks_max:
                self._ack_space.clear()
                await self._ack_space.wait()
            await asyncio.sleep(self._take_command_token())
            try:
                self.handle_command(_as_bytes(message.payload))
            except Exception:  # last resort: one message must never end the receiver (F3)
                self._counters.internal_errors += 1
                log.exception("bms: a command could not be handled")

    def _take_command_token(self) -> float:
        """Seconds to wait before handling the next command (0: at once, but still yield
        to the loop so the control cycle and the publisher run between two commands)."""
        now_s = time.monotonic()
        self._cmd_tokens = min(
            _CMD_BURST, self._cmd_tokens + (now_s - self._cmd_tokens_at_s) * self._cmd_rate_per_s
        )
        self._cmd_tokens_at_s = now_s
        self._cmd_tokens -= 1.0
        return 0.0 if self._cmd_tokens >= 0 else -self._cmd_tokens / self._cmd_rate_per_s

    def handle_command(self, payload: bytes) -> None:
        """Validate, apply and queue the ack of one command (what the receiver calls)."""
        now_s = self._clock()

        def apply(cmd: Command) -> None:
            timed = isinstance(cmd, EnvelopeOverride | DemandResponse)
            if self._on_command is None and not (timed and self.overrides is not None):
                # Accepting what nobody acts on would tell the BMS a lie.
                raise CommandRefused(f"{cmd.type} commands are not handled by this controller")
            if self._on_command is not None:
                try:
                    self._on_command(cmd)
                except CommandRefused:
                    raise
                except Exception as exc:
                    log.exception("bms: on_command failed for %s", cmd.command_id)
                    raise CommandRefused(f"internal error: {exc}") from exc
            if self.overrides is not None and isinstance(cmd, EnvelopeOverride | DemandResponse):
                self.overrides.apply(cmd, now_s)

        ack, _cmd = self._processor.handle(payload, now_s, apply)
        if ack.duplicate:
            self._counters.commands_duplicate += 1
        elif ack.accepted:
            self._counters.commands_accepted += 1
        else:
            self._counters.commands_rejected += 1
        if self._log_outcome(ack) and not ack.accepted and self._on_rejected is not None:
            try:
                self._on_rejected(ack)
            except Exception:
                log.exception("bms: on_rejected failed for %s", ack.command_id)
        if len(self._acks) >= self._acks_max:
            self._acks.popleft()
            self._counters.acks_dropped += 1
        self._acks.append(_Outgoing(self.topics.ack, ack.payload(), 1, False))
        self._wake.set()

    def _log_outcome(self, ack: Ack) -> bool:
        """One line per command, at most ``_LOG_LINES_PER_WINDOW`` per 10 s (a flood must
        not flood the journal); the rest are counted and summarised. True if logged."""
        now_s = time.monotonic()
        if now_s - self._log_window_s >= _LOG_WINDOW_S:
            if self._log_suppressed:
                log.warning(
                    "bms: %d command outcomes not logged in the last %.0f s (see the counters)",
                    self._log_suppressed,
                    _LOG_WINDOW_S,
                )
            self._log_window_s, self._log_lines, self._log_suppressed = now_s, 0, 0
        if self._log_lines >= _LOG_LINES_PER_WINDOW:
            self._log_suppressed += 1
            return False
        self._log_lines += 1
        log.info(
            "bms: command %s %s%s%s",
            ack.command_id,
            ack.status,
            " (duplicate)" if ack.duplicate else "",
            f": {ack.reason}" if ack.reason else "",
        )
        return True

    def _next(self) -> tuple[_Outgoing, Callable[[], None]] | None:
        """The most urgent message and how to put it back if the connection fails."""
        if self._status_pending:
            self._status_pending = False

            def restore_status() -> None:
                self._status_pending = True

            return _Outgoing(self.topics.status, b"online", 1, True), restore_status
        if self._alarms_dirty:
            aid = self._alarms_dirty.pop()
            alarm = self._alarms.get(aid)
            payload = b"" if alarm is None else _dumps(alarm.to_json())
            return _Outgoing(self.topics.alarm(aid), payload, 1, True), (
                lambda: self._alarms_dirty.add(aid)
            )
        if self._acks:
            item = self._acks.popleft()
            self._ack_space.set()
            return item, lambda: self._acks.appendleft(item)
        if self._telemetry:
            return self._telemetry.popleft(), lambda: None  # stale by the reconnect anyway
        return None

    def _next_batch(self) -> list[tuple[_Outgoing, Callable[[], None]]]:
        """The most urgent message, and with an ack up to ``_ACK_WINDOW - 1`` more acks.

        F6: one QoS 1 publish at a time waits a PUBACK round trip each, so a burst of
        commands outran the acks; a window of acks in flight keeps up with the receiver.
        """
        first = self._next()
        if first is None:
            return []
        batch = [first]
        if first[0].topic == self.topics.ack:
            while (
                len(batch) < _ACK_WINDOW
                and self._acks
                and not self._status_pending
                and not self._alarms_dirty
            ):
                nxt = self._next()
                assert nxt is not None
                batch.append(nxt)
        return batch

    async def _publish_loop(self, client: aiomqtt.Client, over: asyncio.Event) -> None:
        """Drain the queues by priority; return once stopping and drained.

        ``over`` is set when the session has ended: a loop that outlived its session
        (its cancellation swallowed) must not take more from the queues.
        """
        while not over.is_set():
            self._wake.clear()
            while batch := self._next_batch():
                try:
                    results = await asyncio.gather(
                        *(
                            client.publish(i.topic, i.payload, qos=i.qos, retain=i.retain)
                            for i, _ in batch
                        ),
                        return_exceptions=True,
                    )
                except BaseException:  # cancelled: which ones went out is unknown
                    for _, restore in reversed(batch):
                        restore()
                    raise
                failed = [
                    (restore, r)
                    for (_, restore), r in zip(batch, results, strict=True)
                    if isinstance(r, BaseException)
                ]
                self._counters.published += len(batch) - len(failed)
                for restore, _ in reversed(failed):
                    restore()
                if failed:
                    raise failed[0][1]
                if over.is_set():
                    break
            if self._stopping.is_set() and not over.is_set():
                return
            if not over.is_set():
                await self._wake.wait()
        raise SessionTaskEnded("bms: the session ended under the publisher")

    async def _telemetry_ticker(self) -> None:
        """Poll the daemon's snapshot on a fixed deadline; missed ticks are skipped."""
        assert self._telemetry_source is not None
        loop = asyncio.get_running_loop()
        period_s = self.cfg.telemetry_period_s
        next_s = loop.time() + period_s
        while not self._stopping.is_set():
            await asyncio.sleep(max(0.0, next_s - loop.time()))
            next_s += period_s
            if next_s < loop.time():
                next_s = loop.time() + period_s
            try:
                frames = list(self._telemetry_source())
            except Exception:
                log.exception("bms: telemetry source failed; skipping this period")
                continue
            self.publish_telemetry(frames)


_CMD_BURST = 50.0  # commands handled back to back before the rate limit applies
_ACK_WINDOW = 20  # acks in flight at once (paho's default max_inflight_messages)
_LOG_WINDOW_S = 10.0
_LOG_LINES_PER_WINDOW = 50


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()
