"""One way to hold an MQTT connection open: broker URL, secrets, TLS, backoff, reconnect.

Shared by the BMS link and (later) the agent link, so that both resolve credentials the
same way, back off the same way after a broker outage, and resubscribe on every new
connection (the controller connects with a clean session: the broker forgets
subscriptions when the connection drops, so each session must subscribe again).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from controller.model.config import MqttConfig
from controller.model.config_urls import CREDENTIALS_REFUSED
from controller.model.secrets import redact_url

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def quiet_aiomqtt_close_race(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Turn aiomqtt 2.5's harmless close race into a debug line instead of a traceback.

    paho asks aiomqtt to watch its socket for writing from another thread; aiomqtt
    schedules ``loop.add_writer(fd)`` for later, and when the connection closes first
    (a publish as the client stops) that call fails with EBADF and asyncio logs it as an
    unhandled error with a traceback, though nothing was lost. Everything else goes to
    the loop's default handler. (aiomqtt 2.5.1 is the newest release.)
    """
    loop = loop or asyncio.get_running_loop()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        # asyncio shortens the callback in the handle's repr ("<function Cli...>"), so the
        # match is on the deferred call itself: add_writer on a descriptor already closed.
        if (
            isinstance(exc, OSError)
            and exc.errno == errno.EBADF
            and ".add_writer(" in repr(context.get("handle"))
        ):
            log.debug("MQTT socket closed before its write watch was set (harmless)")
            return
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


class MqttSetupError(ValueError):
    """The MQTT settings cannot be used (bad URL, missing secret): fail at start, not later."""


@dataclass(frozen=True)
class BrokerSettings:
    """Everything needed to open a connection; the password never appears in a repr."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port, tls).

    Messages show the URL with any userinfo redacted: this one is printed by ``run``.
    """
    shown = redact_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.username or parts.password or "@" in parts.netloc:
        # Secrets in URLs end up in logs and process lists.
        raise MqttSetupError(f"MQTT url {shown!r}: {CREDENTIALS_REFUSED}")
    if scheme not in DEFAULT_PORTS:
        raise MqttSetupError(f"MQTT url {shown!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise MqttSetupError(f"MQTT url {shown!r} has no host")
    if parts.path not in ("", "/"):
        raise MqttSetupError(f"MQTT url {shown!r}: a path is not supported")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise MqttSetupError(f"MQTT url {shown!r}: {exc}") from None
    return parts.hostname, port, scheme == "mqtts"


def resolve_password(cfg: MqttConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The broker password from the environment or a file, never from the YAML itself."""
    env = os.environ if environ is None else environ
    if cfg.password_env is not None and cfg.password_file is not None:
        raise MqttSetupError("set only one of password_env and password_file")
    if cfg.password_env is not None:
        value = env.get(cfg.password_env)
        if value is None:
            raise MqttSetupError(f"password_env {cfg.password_env!r} is not set in the environment")
        return value
    if cfg.password_file is not None:
        try:
            return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise MqttSetupError(
                f"password_file {str(cfg.password_file)!r}: cannot read: {exc.strerror}"
            ) from None
    return None


def broker_settings(cfg: MqttConfig, environ: Mapping[str, str] | None = None) -> BrokerSettings:
    """Resolve a config into settings once, at start, so a missing secret stops the start."""
    host, port, url_tls = parse_broker_url(cfg.url)
    password = resolve_password(cfg, environ)
    if password is not None and cfg.username is None:
        raise MqttSetupError("a password is configured but no username")
    return BrokerSettings(
        host=host, port=port, tls=url_tls or cfg.tls, username=cfg.username, password=password
    )


def default_tls_context() -> ssl.SSLContext:
    """System CAs with hostname checks; ``SSL_CERT_FILE`` points it at a private CA."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


PENDING_CALLS_WARN = 10_000


class Inbox(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, bounded in messages and bytes, counting what it drops.

    aiomqtt's own bound logs a warning per dropped message (a flood would flood the log
    too) and has no byte bound; this one drops silently and counts, and the link exports
    the count. Build it with :func:`inbox_type` (aiomqtt wants a class).
    """

    max_messages = 1_000
    max_bytes = 16 * 1024 * 1024

    def __init__(self, maxsize: int = 0) -> None:  # aiomqtt passes its own maxsize (0)
        super().__init__()
        self.dropped = 0
        self.bytes = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        size_b = _payload_size(item)
        if self.qsize() >= self.max_messages or self.bytes + size_b > self.max_bytes:
            self.dropped += 1
            self.on_drop()
            return
        self.bytes += size_b
        super().put_nowait(item)

    @staticmethod
    def on_drop() -> None:
        """Overridden by :func:`inbox_type` to count drops where they are exported."""

    def get_nowait(self) -> aiomqtt.Message:
        item = super().get_nowait()
        self.bytes -= _payload_size(item)
        return item


def _payload_size(m: aiomqtt.Message) -> int:
    p = m.payload
    return len(p) if isinstance(p, bytes | bytearray | str) else 8


def inbox_type(
    max_messages: int, max_bytes: int, on_drop: Callable[[], None] | None = None
) -> type[Inbox]:
    """An :class:`Inbox` class with these bounds, for ``make_client(queue_type=...)``;
    ``on_drop`` is called once per dropped message."""
    attrs: dict[str, object] = {"max_messages": max_messages, "max_bytes": max_bytes}
    if on_drop is not None:
        attrs["on_drop"] = staticmethod(on_drop)
    return type("BoundedInbox", (Inbox,), attrs)


def make_client(
    settings: BrokerSettings,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    keepalive_s: int = 15,
    timeout_s: float = 10.0,
    tls_context: ssl.SSLContext | None = None,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
) -> aiomqtt.Client:
    """A fresh client for one connection attempt (aiomqtt clients are used once here)."""
    context = tls_context
    if settings.tls and context is None:
        context = default_tls_context()
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier,
        will=will,
        clean_session=True,
        keepalive=keepalive_s,
        timeout=timeout_s,
        tls_context=context if settings.tls else None,
        queue_type=queue_type,
    )
    # aiomqtt warns once per publish beyond 10 in flight; a controller leasing to
    # hundreds of agents each cycle has hundreds in flight by design (bounded by its
    # own queues), so the warning would flood the log every cycle.
    client.pending_calls_threshold = PENDING_CALLS_WARN
    return client


class Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep.

    The delay before attempt *n* is drawn from ``[(1 - jitter) * d, d]`` with
    ``d = min(max_s, initial_s * factor ** n)``; :meth:`reset` after a session that
    got connected.
    """

    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        if factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("need factor >= 1 and 0 <= jitter <= 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor**self.attempt)
        self.attempt += 1
        return ceiling * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0


class SessionTaskEnded(aiomqtt.MqttError):
    """One task of a session ended while the others still ran: end the session, reconnect.

    An ``MqttError``, so :func:`run_with_reconnect` treats it like a lost connection.
    """


async def run_until_any_ends(
    tasks: Mapping[str, Coroutine[Any, Any, None]], *, grace_s: float = 2.0
) -> str:
    """Run a session's tasks; when ANY ends, cancel the rest and return the first's name.

    F4: with a TaskGroup, a receiver that died left the session running when the
    publisher's cancellation was swallowed inside aiomqtt's ``publish`` (Python 3.11
    ``wait_for``): connected, publishing ``online``, deaf to commands. Here the session
    ends whatever the others do: they get ``grace_s`` to finish after ``cancel()``; one
    that does not is left behind (logged; its publish fails once the client disconnects).

    A task that raised re-raises its error (an ``MqttError`` or ``OSError`` as is, anything
    else wrapped in :class:`SessionTaskEnded`); the caller decides whether a clean return
    of the one it got back is the end it expected.
    """
    running = {asyncio.create_task(coro, name=name): name for name, coro in tasks.items()}
    try:
        done, pending = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancel_all(running, grace_s)
        raise
    await _cancel_all({t: running[t] for t in pending}, grace_s)
    # Prefer a task that failed: its error is the reason the session ends.
    first = next((t for t in done if not t.cancelled() and t.exception() is not None), None)
    if first is None:
        first = next(iter(done))
    name = running[first]
    if first.cancelled():
        raise SessionTaskEnded(f"session task {name} was cancelled")
    exc = first.exception()
    if exc is None:
        return name
    if isinstance(exc, aiomqtt.MqttError | OSError):
        raise exc
    log.error("session task %s failed: %r", name, exc, exc_info=exc)
    raise SessionTaskEnded(f"session task {name} failed: {exc!r}") from exc


async def _cancel_all(tasks: Mapping[asyncio.Task[None], str], grace_s: float) -> None:
    for t in tasks:
        t.cancel()
    if not tasks:
        return
    _done, stuck = await asyncio.wait(tasks, timeout=grace_s)
    for t in stuck:
        log.warning("session task %s ignored its cancellation; left to end by itself", tasks[t])
        t.add_done_callback(_collect)
    for t in _done:
        _collect(t)


def _collect(task: asyncio.Task[None]) -> None:
    """Retrieve a finished task's outcome so asyncio does not report it as never retrieved."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("session task %s ended with %r", task.get_name(), exc)


def _only_mqtt_errors(group: BaseExceptionGroup[BaseException]) -> bool:
    return all(
        isinstance(e, aiomqtt.MqttError | OSError)
        or (isinstance(e, BaseExceptionGroup) and _only_mqtt_errors(e))
        for e in group.exceptions
    )


async def run_with_reconnect(
    connect: Callable[[], aiomqtt.Client],
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    backoff: Backoff,
    on_state: Callable[[bool], None] | None = None,
    name: str = "mqtt",
    stop: asyncio.Event | None = None,
) -> None:
    """Keep a session alive: connect, run ``session``, and on a broker error wait and retry.

    ``session`` subscribes (again) and does the work; it returns to end the loop (a clean
    stop) and raises ``aiomqtt.MqttError`` when the connection is lost. Any other
    exception is a bug and propagates. Cancellation propagates too. Setting ``stop``
    ends the loop while it waits to reconnect (a connected session watches it itself).
    """
    while stop is None or not stop.is_set():
        try:
            async with connect() as client:
                backoff.reset()
                if on_state is not None:
                    on_state(True)
                log.info("%s: connected", name)
                await session(client)
                return
        except (aiomqtt.MqttError, OSError) as exc:
            log.warning("%s: connection lost or refused: %s", name, exc)
        except BaseExceptionGroup as group:
            # A session that runs a TaskGroup reports a lost connection as a group.
            if not _only_mqtt_errors(group):
                raise
            log.warning("%s: connection lost: %s", name, group.exceptions[0])
        finally:
            if on_state is not None:
                on_state(False)
        delay_s = backoff.next_delay_s()
        log.info("%s: reconnecting in %.2f s", name, delay_s)
        if stop is None:
            await asyncio.sleep(delay_s)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay_s)
