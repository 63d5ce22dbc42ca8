"""MQTT clients for tests that play one identity on a password-and-TLS broker.

The ACL tests (tests/integration/test_mqtt_acl.py, tests/e2e/test_acl_e2e.py) connect as
each user the generated broker files name, and record what that user is allowed to see;
the connection and the recorder are the same in both, so they live here.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiomqtt

from tests.fixtures.mosquitto import Mosquitto


def user_client(
    broker: Mosquitto,
    tls: ssl.SSLContext,
    password_files: Mapping[str, Path],
    user: str | None,
    password: str | None = None,
    prefix: str = "test",
) -> aiomqtt.Client:
    """A TLS client logged in as ``user`` with its password file (or ``password``, to forge)."""
    if user is not None and password is None:
        password = password_files[user].read_text()
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=password,
        identifier=f"{prefix}-{user}-{secrets.token_hex(3)}",
        tls_context=tls,
        timeout=5,
    )


class Recorder:
    """Every message one connection receives, in order, as (topic, payload)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, bytes]] = []

    async def pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((str(m.topic), payload))

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.messages]

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p in self.messages if t == topic]


@asynccontextmanager
async def recording(client: aiomqtt.Client, *topics: str) -> AsyncIterator[Recorder]:
    """Connect ``client`` and subscribe it to ``topics`` (SUBACK awaited: from here on)."""
    async with client:
        rec = Recorder(client)
        pump = asyncio.create_task(rec.pump())
        for t in topics:
            await client.subscribe(t, qos=1)
        try:
            yield rec
        finally:
            pump.cancel()
            with suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump


async def publish_qos1(client: aiomqtt.Client, topic: str, payload: bytes) -> None:
    """QoS 1: returns after the broker's PUBACK, i.e. after it routed or dropped it."""
    async with client:
        await client.publish(topic, payload, qos=1)
