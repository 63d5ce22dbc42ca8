"""The BMS link against a real Mosquitto on loopback, checked by a real MQTT subscriber.

Every assertion is on what another client received from the broker (or on what the link
stored after a command came through the broker): retained status and last will, telemetry
JSON, retained alarms and their clearing, command acks, dedupe, reconnect after the
broker restarts, and username/password over TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.core.alarms import Alarm, AlarmKind, alarm_id
from controller.core.overrides import EnvelopeOverrides
from controller.core.setpoints import Command, DemandResponse, format_ts
from controller.core.view import NodeTelemetry
from controller.integrations.bms.bridge import BmsLink
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.support.mqtt import Backoff
from drivers.reading import Quality
from tests.fixtures.mosquitto import Mosquitto, MosquittoFactory, make_tls_files
from tests.helpers.waiting import eventually
from tests.sites import tiny_site

pytest_plugins = ["tests.fixtures.mosquitto"]

REPO = Path(__file__).resolve().parents[2]
BASE = "rackpower/tiny"
WAIT_S = 15.0  # generous: only a broken link ever waits this long


@pytest.fixture
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


class Subscriber:
    """A plain MQTT client that records everything it receives on its subscriptions."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()

    async def _pump(self) -> None:
        async for m in self.client.messages:
            self.messages.append(m)
            self._arrived.set()

    async def next(
        self, topic: str, predicate: Callable[[aiomqtt.Message], bool] = lambda m: True
    ) -> aiomqtt.Message:
        """The first message (received so far or later) on ``topic`` matching ``predicate``;
        it is consumed, so the next call finds the one after it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            for i, m in enumerate(self.messages):
                if m.topic.matches(topic) and predicate(m):
                    del self.messages[i]
                    return m
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(str(m.topic), m.payload) for m in self.messages]
                raise AssertionError(f"nothing on {topic} matched; have {seen}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def publish(self, topic: str, payload: bytes | str) -> None:
        await self.client.publish(topic, payload, qos=1)


@asynccontextmanager
async def subscriber(
    broker: Mosquitto, *topics: str, tls_context: ssl.SSLContext | None = None, **kw: Any
) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(broker.host, broker.port, tls_context=tls_context, **kw) as client:
        sub = Subscriber(client)
        pump = asyncio.create_task(sub._pump())
        for t in topics:
            await client.subscribe(t, qos=1)
        try:
            yield sub
        finally:
            pump.cancel()
            with suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump


@asynccontextmanager
async def running(link: BmsLink) -> AsyncIterator[BmsLink]:
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        await link.stop(timeout_s=5.0)
        if not task.done():
            task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def make_link(broker: Mosquitto, tree: PowerTree, **kw: Any) -> BmsLink:
    cfg = kw.pop("cfg", None) or MqttConfig(url=broker.url, telemetry_period_s=0.1)
    kw.setdefault("backoff", Backoff(initial_s=0.05, max_s=0.5))
    return BmsLink(cfg, tree, **kw)


def payload_json(m: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(m.payload, bytes)
    out: dict[str, Any] = json.loads(m.payload)
    return out


# ---------------------------------------------------------------------------
# status and last will


async def test_status_is_retained_online_then_offline_on_clean_stop(
    mosquitto: Mosquitto, tree: PowerTree
) -> None:
    link = make_link(mosquitto, tree)
    async with running(link):
        await eventually(lambda: link.stats().published >= 1, "the link to publish its status")
        # Subscribing only now: the broker hands over the retained status.
        async with subscriber(mosquitto, f"{BASE}/status") as late:
            m = await late.next(f"{BASE}/status")
            assert (m.payload, m.retain) == (b"online", True)
            await link.stop()
            m = await late.next(f"{BASE}/status")
            assert m.payload == b"offline"
    async with subscriber(mosquitto, f"{BASE}/status") as later:
        m = await later.next(f"{BASE}/status")
        assert (m.payload, m.retain) == (b"offline", True)


async def test_cancelled_link_still_says_offline(mosquitto: Mosquitto, tree: PowerTree) -> None:
    """Cancelling the task (not ``stop()``) still disconnects gracefully, which suppresses
    the will; the link must say ``offline`` itself."""
    link = make_link(mosquitto, tree)
    async with subscriber(mosquitto, f"{BASE}/status") as sub:
        task = asyncio.create_task(link.run())
        await sub.next(f"{BASE}/status", lambda m: m.payload == b"online")
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        m = await sub.next(f"{BASE}/status")
        assert m.payload == b"offline"


CHILD = """
import asyncio, sys
from controller.integrations.bms.bridge import BmsLink
from controller.model.config import MqttConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

async def main() -> None:
    tree = PowerTree(parse_site(tiny_site()))
    await BmsLink(MqttConfig(url=sys.argv[1]), tree, keepalive_s=60).run()

asyncio.run(main())
"""


@contextmanager
def child_link(url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_last_will_says_offline_when_the_controller_is_killed(mosquitto: Mosquitto) -> None:
    """The link runs in a child process that is SIGKILLed: no DISCONNECT is ever sent, so
    the broker publishes the will (keepalive is 60 s: the will comes from the dead socket)."""
    async with subscriber(mosquitto, f"{BASE}/status") as sub:
        with child_link(mosquitto.url) as proc:
            m = await sub.next(f"{BASE}/status", lambda m: m.payload == b"online")
            os.kill(proc.pid, signal.SIGKILL)
            m = await sub.next(f"{BASE}/status")
            assert m.payload == b"offline"
    async with subscriber(mosquitto, f"{BASE}/status") as later:
        m = await later.next(f"{BASE}/status")
        assert (m.payload, m.retain) == (b"offline", True)


# ---------------------------------------------------------------------------
# telemetry


async def test_telemetry_json_per_node(mosquitto: Mosquitto, tree: PowerTree) -> None:
    ts_s = 1_750_000_000.25

    def snapshot() -> list[NodeTelemetry]:
        return [
            NodeTelemetry("rack-1", 6500.5, 7000.0, 500.0 - 0.5, ts_s),
            NodeTelemetry("row", float("nan"), 15000.0, 0.0, ts_s, Quality.STALE),
        ]

    link = make_link(mosquitto, tree, telemetry=snapshot)
    async with subscriber(mosquitto, f"{BASE}/telemetry/#") as sub, running(link):
        rack = payload_json(await sub.next(f"{BASE}/telemetry/rack-1"))
        row = payload_json(await sub.next(f"{BASE}/telemetry/row"))
        again = payload_json(await sub.next(f"{BASE}/telemetry/rack-1"))  # periodic
    assert rack == {
        "node": "rack-1",
        "kind": "rack",
        "power_w": 6500.5,
        "envelope_w": 7000.0,
        "headroom_w": 499.5,
        "ts": "2025-06-15T15:06:40.250Z",
        "quality": "good",
    }
    assert row["quality"] == "stale" and row["power_w"] is None  # NaN is not JSON
    assert again == rack


async def test_full_telemetry_queue_drops_the_oldest_and_counts(
    mosquitto: Mosquitto, tree: PowerTree
) -> None:
    link = make_link(mosquitto, tree, telemetry_queue_size=5)
    # Queued while not connected: the call returns at once, whatever the broker does.
    link.publish_telemetry(NodeTelemetry("rack-1", float(i), 7000, 0, 0) for i in range(8))
    assert link.stats().telemetry_dropped == 3
    async with subscriber(mosquitto, f"{BASE}/telemetry/#") as sub, running(link):
        got = [payload_json(await sub.next(f"{BASE}/telemetry/rack-1")) for _ in range(5)]
    assert [g["power_w"] for g in got] == [3.0, 4.0, 5.0, 6.0, 7.0]


# ---------------------------------------------------------------------------
# alarms


async def absent_retained(broker: Mosquitto, topic_filter: str) -> list[aiomqtt.Message]:
    """Retained messages under a filter: subscribe, then publish a probe on the same
    connection; the broker sends retained messages at subscribe time, before the probe."""
    probe = f"{BASE}/alarms/~probe"
    async with subscriber(broker, topic_filter) as sub:
        await sub.publish(probe, b"probe")
        await sub.next(probe)
        return [m for m in sub.messages if m.retain]


async def test_alarm_is_retained_until_cleared(mosquitto: Mosquitto, tree: PowerTree) -> None:
    alarm = Alarm(
        AlarmKind.ENVELOPE_EXCEEDED,
        "rack-1",
        "rack-1 draws 7400 W against a 7000 W envelope",
        1_750_000_000.0,
        "critical",
        node="rack-1",
        details={"power_w": 7400.0, "envelope_w": 7000.0},
    )
    aid = alarm_id(AlarmKind.ENVELOPE_EXCEEDED, "rack-1")
    topic = f"{BASE}/alarms/{aid}"
    link = make_link(mosquitto, tree)
    async with running(link):
        await eventually(lambda: link.stats().connected, "the link to connect")
        link.raise_alarm(alarm)
        await eventually(lambda: link.stats().published >= 2, "status and alarm published")
        async with subscriber(mosquitto, f"{BASE}/alarms/#") as late:
            m = await late.next(topic)
        assert m.retain
        assert payload_json(m) == {
            "alarm_id": "envelope_exceeded:rack-1",
            "kind": "envelope_exceeded",
            "severity": "critical",
            "subject": "rack-1",
            "node": "rack-1",
            "message": "rack-1 draws 7400 W against a 7000 W envelope",
            "raised_at": "2025-06-15T15:06:40.000Z",
            "details": {"power_w": 7400.0, "envelope_w": 7000.0},
        }
        published = link.stats().published
        link.raise_alarm(alarm)  # raised again every cycle: published once
        assert link.stats().published == published and link.active_alarms == (aid,)

        async with subscriber(mosquitto, f"{BASE}/alarms/#") as sub:
            await sub.next(topic, lambda m: m.payload != b"")
            assert link.clear_alarm(aid) is True
            cleared = await sub.next(topic)
            assert cleared.payload == b""
            assert not link.active_alarms
        assert link.clear_alarm(aid) is False
        assert await absent_retained(mosquitto, f"{BASE}/alarms/#") == []


# ---------------------------------------------------------------------------
# commands


class CommandSink:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    def __call__(self, cmd: Command) -> None:
        self.commands.append(cmd)


async def send(sub: Subscriber, payload: dict[str, Any] | bytes) -> dict[str, Any]:
    """Publish a command like a BMS would and return the ack that answers it."""
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    await sub.publish(f"{BASE}/cmd", raw)
    cid = payload.get("command_id") if isinstance(payload, dict) else None
    m = await sub.next(f"{BASE}/cmd/ack", lambda m: payload_json(m)["command_id"] == cid)
    return payload_json(m)


@asynccontextmanager
async def bms_session(
    broker: Mosquitto, tree: PowerTree, **cfg: Any
) -> AsyncIterator[tuple[BmsLink, Subscriber, CommandSink, EnvelopeOverrides]]:
    """A running link with a recorder and a store; ``cfg`` adds ``MqttConfig`` fields."""
    sink, overrides = CommandSink(), EnvelopeOverrides(tree)
    mqtt_cfg = MqttConfig(url=broker.url, telemetry_period_s=0.1, **cfg)
    link = make_link(broker, tree, cfg=mqtt_cfg, on_command=sink, overrides=overrides)
    async with subscriber(broker, f"{BASE}/cmd/ack", f"{BASE}/status") as sub, running(link):
        await sub.next(f"{BASE}/status", lambda m: m.payload == b"online")
        await eventually(lambda: link.stats().connected, "the link to subscribe")
        yield link, sub, sink, overrides


async def test_demand_response_is_acked_and_in_force(mosquitto: Mosquitto, tree: PowerTree) -> None:
    expires_s = time.time() + 900
    async with bms_session(mosquitto, tree) as (link, sub, sink, overrides):
        ack = await send(
            sub,
            {
                "type": "demand_response",
                "command_id": "dr-42",
                "node": "rack-1",
                "limit_w": 5000,
                "expires_at": format_ts(expires_s),
            },
        )
        assert (ack["status"], ack["reason"], ack["duplicate"]) == ("accepted", None, False)
        assert ack["expires_at"] == format_ts(expires_s)
        [cmd] = sink.commands
        assert isinstance(cmd, DemandResponse) and (cmd.node, cmd.limit_w) == ("rack-1", 5000)
        assert overrides.active(time.time()) == {"rack-1": 5000.0}
        assert overrides.active(expires_s + 1) == {}
        assert link.stats().commands_accepted == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (
            {"type": "demand_response", "command_id": "c1", "node": "rack-1",
             "limit_w": 9000, "ttl_s": 600},
            "limit_w 9000 W is above the rating of rack-1 (8000 W)",
        ),
        (
            {"type": "demand_response", "command_id": "c2", "node": "rack-1", "limit_w": 5000},
            "an expiry is required",
        ),
        (
            {"type": "envelope_override", "command_id": "c3", "node": "rack-7",
             "envelope_w": 5000, "ttl_s": 600},
            "unknown node 'rack-7'",
        ),
        (b'{"type": "mode", "command_id": ', "not valid JSON"),
    ],
    ids=["above-rating", "no-expiry", "unknown-node", "bad-json"],
)  # fmt: skip
async def test_invalid_command_is_rejected_with_the_reason(
    mosquitto: Mosquitto, tree: PowerTree, payload: dict[str, Any] | bytes, reason: str
) -> None:
    async with bms_session(mosquitto, tree) as (link, sub, sink, overrides):
        ack = await send(sub, payload)
        assert ack["status"] == "rejected"
        assert reason in ack["reason"], ack["reason"]
        assert ack["command_id"] == (
            payload.get("command_id") if isinstance(payload, dict) else None
        )
        assert sink.commands == [] and overrides.active(time.time()) == {}
        assert link.stats().commands_rejected == 1


async def test_repeated_command_id_is_not_applied_twice(
    mosquitto: Mosquitto, tree: PowerTree
) -> None:
    cmd = {"type": "envelope_override", "command_id": "ovr-1", "node": "row",
           "envelope_w": 14000, "ttl_s": 300}  # fmt: skip
    async with bms_session(mosquitto, tree) as (link, sub, sink, overrides):
        first = await send(sub, cmd)
        second = await send(sub, {**cmd, "envelope_w": 12000})
        assert (first["status"], first["duplicate"]) == ("accepted", False)
        assert (second["status"], second["duplicate"]) == ("accepted", True)
        assert second["expires_at"] == first["expires_at"]
        assert "payload differs" in second["reason"]
        assert len(sink.commands) == 1
        assert overrides.active(time.time()) == {"row": 14000.0}
        assert link.stats().commands_duplicate == 1


MODES_ON = {"allow_mode_commands": True}


async def test_mode_switch_reaches_the_daemon(mosquitto: Mosquitto, tree: PowerTree) -> None:
    async with bms_session(mosquitto, tree, **MODES_ON) as (_link, sub, sink, overrides):
        ack = await send(
            sub, {"type": "mode", "command_id": "m-1", "mode": "advisory", "ttl_s": 600}
        )
        assert ack["status"] == "accepted"
        assert [getattr(c, "mode", None) for c in sink.commands] == ["advisory"]
        assert len(overrides) == 0


async def test_command_nobody_handles_is_refused(mosquitto: Mosquitto, tree: PowerTree) -> None:
    """Without ``on_command`` a mode switch has no taker; acking it would mislead the BMS."""
    cfg = MqttConfig(url=mosquitto.url, telemetry_period_s=0.1, **MODES_ON)
    link = make_link(mosquitto, tree, cfg=cfg, overrides=EnvelopeOverrides(tree))
    async with subscriber(mosquitto, f"{BASE}/cmd/ack", f"{BASE}/status") as sub, running(link):
        await sub.next(f"{BASE}/status", lambda m: m.payload == b"online")
        ack = await send(sub, {"type": "mode", "command_id": "m-2", "mode": "enforce"})
        assert ack["status"] == "rejected"
        assert (
            ack["reason"]
            == "refused by the controller: mode commands are not handled by this controller"
        )
        ok = await send(sub, {"type": "demand_response", "command_id": "d-2", "node": "row",
                              "limit_w": 9000, "ttl_s": 60})  # fmt: skip
        assert ok["status"] == "accepted"


# ---------------------------------------------------------------------------
# reconnect


async def test_link_comes_back_after_the_broker_restarts(
    mosquitto: Mosquitto, tree: PowerTree
) -> None:
    """The broker is stopped and started on the same port without persistence: the link
    must reconnect, restate ``online`` and its alarms, and take commands again (so it
    subscribed again)."""
    sink, overrides = CommandSink(), EnvelopeOverrides(tree)
    link = make_link(mosquitto, tree, on_command=sink, overrides=overrides)
    stale = Alarm(AlarmKind.DEVICE_STALE, "pdu-1", "pdu-1 silent for 3 s", time.time())
    async with running(link):
        link.raise_alarm(stale)
        await eventually(lambda: link.stats().published >= 2, "status and alarm published")
        mosquitto.stop()
        await eventually(lambda: not link.stats().connected, "the link to notice")
        link.publish_telemetry([NodeTelemetry("rack-1", 1.0, 7000, 0, time.time())])  # no block
        mosquitto.start()
        await eventually(lambda: link.stats().connects == 2, "the link to reconnect")
        async with subscriber(
            mosquitto, f"{BASE}/status", f"{BASE}/alarms/#", f"{BASE}/cmd/ack"
        ) as sub:
            status = await sub.next(f"{BASE}/status")
            assert (status.payload, status.retain) == (b"online", True)
            restated = await sub.next(f"{BASE}/alarms/{stale.alarm_id}")
            assert payload_json(restated)["message"] == "pdu-1 silent for 3 s"
            ack = await send(
                sub,
                {"type": "demand_response", "command_id": "after-restart",
                 "node": "row", "limit_w": 9000, "ttl_s": 60},
            )  # fmt: skip
        assert ack["status"] == "accepted"
        assert overrides.active(time.time()) == {"row": 9000.0}


# ---------------------------------------------------------------------------
# credentials and TLS


async def test_password_over_tls(
    mosquitto_factory: MosquittoFactory, tree: PowerTree, tmp_path: Path
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    broker = mosquitto_factory(users={"bms": "s3cret", "viewer": "v"}, tls=tls)
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    cfg = MqttConfig(url=broker.url, username="bms", password_env="RP_MQTT_PW")
    link = make_link(broker, tree, cfg=cfg, tls_context=context, environ={"RP_MQTT_PW": "s3cret"})
    assert link.settings.tls and link.settings.port == broker.port
    async with (
        running(link),
        subscriber(
            broker, f"{BASE}/status", tls_context=context, username="viewer", password="v"
        ) as sub,
    ):
        m = await sub.next(f"{BASE}/status")
        assert m.payload == b"online"


async def test_wrong_password_keeps_retrying_and_never_connects(
    mosquitto_factory: MosquittoFactory, tree: PowerTree
) -> None:
    broker = mosquitto_factory(users={"bms": "s3cret"})
    backoff = Backoff(initial_s=0.05, max_s=0.1)
    cfg = MqttConfig(url=broker.url, username="bms", password_env="PW")
    link = make_link(broker, tree, cfg=cfg, backoff=backoff, environ={"PW": "wrong"})
    async with running(link):
        await eventually(lambda: backoff.attempt >= 3, "three refused attempts")
        assert link.stats().connects == 0
    assert "not authorised" in broker.log_tail(50) or "not authorized" in broker.log_tail(50)
