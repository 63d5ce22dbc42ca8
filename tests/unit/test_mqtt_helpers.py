"""Broker URL parsing, secrets from env/file, and the jittered backoff (pure, no broker)."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from controller.model.config import MqttConfig
from controller.support.mqtt import (
    Backoff,
    MqttSetupError,
    broker_settings,
    parse_broker_url,
    quiet_aiomqtt_close_race,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", ("broker", 1883, False)),
        ("mqtts://broker", ("broker", 8883, True)),
        ("mqtt://10.0.0.5:11883", ("10.0.0.5", 11883, False)),
        ("MQTTS://[::1]:8884/", ("::1", 8884, True)),
    ],
)
def test_broker_urls(url: str, expected: tuple[str, int, bool]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://broker", "scheme must be mqtt:// or mqtts://"),
        ("broker:1883", "scheme must be"),
        ("mqtt://", "has no host"),
        ("mqtt://u:secret@broker", "credentials in the URL are not allowed"),
        ("mqtt://broker/topic", "a path is not supported"),
        ("mqtt://broker:99999", "out of range"),
    ],
)
def test_bad_broker_urls(url: str, reason: str) -> None:
    with pytest.raises(MqttSetupError, match=reason):
        parse_broker_url(url)


def test_password_from_env_and_tls_from_flag() -> None:
    cfg = MqttConfig(url="mqtt://b", username="bms", password_env="BMS_PW", tls=True)
    s = broker_settings(cfg, {"BMS_PW": "hunter2"})
    assert (s.host, s.port, s.tls, s.username, s.password) == ("b", 1883, True, "bms", "hunter2")
    assert "hunter2" not in repr(s)


def test_password_from_file_without_trailing_newline(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    cfg = MqttConfig(username="bms", password_file=f)
    assert broker_settings(cfg, {}).password == "s3cret"


@pytest.mark.parametrize(
    ("cfg", "reason"),
    [
        (MqttConfig(username="u", password_env="NOPE"), "'NOPE' is not set"),
        (MqttConfig(username="u", password_file=Path("/nonexistent/pw")), "cannot read"),
        (MqttConfig(password_env="PW"), "no username"),
        (
            MqttConfig(username="u", password_env="PW", password_file=Path("/x")),
            "only one of",
        ),
    ],
)
def test_secret_problems_stop_the_start(cfg: MqttConfig, reason: str) -> None:
    with pytest.raises(MqttSetupError, match=reason):
        broker_settings(cfg, {"PW": "x"})


def test_backoff_grows_to_its_ceiling_with_jitter_below_it() -> None:
    b = Backoff(initial_s=0.5, max_s=4.0, factor=2.0, jitter=0.5, rng=random.Random(1))
    delays = [b.next_delay_s() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for d, c in zip(delays, ceilings, strict=True):
        assert c * 0.5 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered, not lockstep
    b.reset()
    assert b.next_delay_s() <= 0.5


def test_backoff_without_jitter_is_exact() -> None:
    b = Backoff(initial_s=1, max_s=3, jitter=0)
    assert [b.next_delay_s() for _ in range(4)] == [1, 2, 3, 3]


def test_aiomqtt_close_race_is_quiet_and_everything_else_still_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The race itself, for real: ``add_writer`` deferred with ``call_soon_threadsafe`` (as
    aiomqtt does) on a socket that closes before it runs fails with EBADF. That is a debug
    line; any other unhandled error still reaches asyncio's default handler."""

    async def main() -> None:
        quiet_aiomqtt_close_race()
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        fd = sock.fileno()
        loop.call_soon_threadsafe(loop.add_writer, fd, lambda: None)
        sock.close()  # closes first, as when the client stops while paho asks to write
        await asyncio.sleep(0.05)

        def bug() -> None:
            raise RuntimeError("real bug")

        loop.call_soon(bug)
        await asyncio.sleep(0.05)

    with caplog.at_level("DEBUG"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)
    assert any("write watch" in r.getMessage() for r in caplog.records)
