"""Fuzz tests of the Modbus driver's response handling, over a real TCP socket.

The hostile server (tests/fixtures/hostile.py) answers each request of our real driver
(pymodbus client and all) with bytes hypothesis chooses: random bytes, or a frame built
from the request with any of its fields wrong (transaction id, protocol id, length, unit,
function code, byte count) and possibly truncated. The contract: a read returns complete
readings of the right function, or raises the driver's own error (``DriverError`` and its
kinds), and nothing is logged with a traceback or a hex dump.

``make test`` runs a bounded number of examples; a long run for the figures:

    RACKPOWER_FUZZ_EXAMPLES=20000 pytest tests/unit/test_modbus_fuzz.py -q
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.base import DeviceParams, DriverError
from drivers.modbus import ModbusDevice, build_modbus_devices
from drivers.reading import Quality
from tests.fixtures.hostile import HostileModbusServer, good_read_reply, mbap, request_fields

EXAMPLES = int(os.environ.get("RACKPOWER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The rectifier map reads a coil block and holding blocks: both kinds of answer are hit.
MAP = "generic-hvdc-rectifier-800v"
TIMEOUT_S = 0.03  # bounds each example that the device leaves waiting

Reply = Callable[[bytes], bytes | None]


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    """A reply function: random bytes, or a frame derived from the request with faults."""
    if draw(st.booleans()):
        junk = draw(st.binary(min_size=1, max_size=300))
        return lambda req: junk
    # Two draws, integers and bytes, so each is one typed dict (every fault stays optional).
    faults = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "tid": st.integers(0, 0xFFFF),
                "pid": st.integers(1, 0xFFFF),
                "length": st.integers(0, 0xFFFF),
                "unit": st.integers(0, 255),
                "fc": st.integers(0, 255),
                "byte_count": st.integers(0, 255),
                "cut": st.integers(1, 20),
            },
        )
    )
    blobs = draw(
        st.fixed_dictionaries(
            {},
            optional={"data": st.binary(max_size=260), "extra": st.binary(min_size=1, max_size=20)},
        )
    )

    def reply(req: bytes) -> bytes:
        tid, unit, fc, _start, _count = request_fields(req)
        good = good_read_reply(req)
        data = blobs.get("data", good[9:])
        pdu = bytes((faults.get("fc", fc), faults.get("byte_count", len(data)))) + data
        frame = mbap(
            faults.get("tid", tid),
            faults.get("unit", unit),
            pdu,
            pid=faults.get("pid", 0),
            length=faults.get("length"),
        )
        if "cut" in faults:
            frame = frame[: max(1, len(frame) - faults["cut"])]
        return frame + blobs.get("extra", b"")

    return reply


@pytest.fixture
def loud_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture everything at INFO from every logger (asyncio's tracebacks included)."""
    caplog.set_level(logging.INFO)
    yield caplog


def test_fuzzed_answers_give_readings_or_driver_errors(loud_logs: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    server = HostileModbusServer(None)
    loop.run_until_complete(server.__aenter__())
    params = DeviceParams(
        "fuzzed",
        "modbus",
        port=server.port,
        map_name=MAP,
        period_s=1.0,
        timeout_s=TIMEOUT_S,
        options={"retries": 0},
    )
    (device,) = build_modbus_devices([params])
    outcomes: dict[str, int] = {}

    @given(replies())
    @FUZZ
    def check(reply: Reply) -> None:
        server.reply = reply
        outcome = loop.run_until_complete(read_once(device))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    try:
        check()
        # A good device on the same connection afterwards reads fine: nothing was left
        # half-open or wedged by the garbage.
        server.reply = good_read_reply
        assert loop.run_until_complete(read_once(device)) == "readings"
    finally:
        loop.run_until_complete(device.close())
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()
    print(f"\n{sum(outcomes.values())} fuzzed answers: {dict(sorted(outcomes.items()))}")
    assert "kind:malformed" in outcomes and "kind:timeout" in outcomes, outcomes
    noisy = [r for r in loud_logs.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage()[:200] for r in noisy[:3]]
    assert not any("0x" in r.getMessage() for r in loud_logs.records)  # no hex dumps


async def read_once(device: ModbusDevice) -> str:
    """One poll's worth: connect if needed, read; what came of it, as a short label."""
    try:
        await device.connect()
        readings = await device.read()
    except DriverError as e:
        return f"kind:{e.kind}"
    # A read that returns gives every numeric point of the map, each with a quality.
    assert {r.point for r in readings} == set(device.numeric)
    assert all(r.quality in (Quality.GOOD, Quality.BAD, Quality.ERROR) for r in readings)
    return "readings"


def test_wrong_function_answer_is_malformed_not_a_driver_bug() -> None:
    """Regression: a register answer (FC3) to a coil read (FC1) reached the decoder and
    raised ValueError, which the poll loop logs with a traceback as a driver bug, every
    poll. The answer's function code is now checked."""

    def fc3_for_everything(req: bytes) -> bytes:
        tid, unit, _fc, _start, count = request_fields(req)
        data = struct.pack(f">{count}H", *([1] * count))
        return mbap(tid, unit, bytes((3, len(data))) + data)

    async def run() -> str:
        async with HostileModbusServer(fc3_for_everything) as server:
            params = DeviceParams(
                "d", "modbus", port=server.port, map_name=MAP, period_s=1.0, timeout_s=0.2
            )
            (device,) = build_modbus_devices([params])
            try:
                return await read_once(device)
            finally:
                await device.close()

    assert asyncio.run(run()) == "kind:malformed"


def test_undecodable_frame_fails_fast_without_a_traceback(
    loud_logs: pytest.LogCaptureFixture,
) -> None:
    """Regression: a frame pymodbus cannot decode (byte count 200, 2 bytes of data) was
    raised out of its protocol: asyncio logged a traceback at ERROR, dropped the
    connection, and the read waited out its whole timeout. Now: malformed, at once."""

    def lying_byte_count(req: bytes) -> bytes:
        tid, unit, fc, _start, _count = request_fields(req)
        return mbap(tid, unit, bytes((fc, 200)) + b"\x00\x01")

    async def run() -> tuple[str, float]:
        async with HostileModbusServer(lying_byte_count) as server:
            params = DeviceParams(
                "d", "modbus", port=server.port, map_name=MAP, period_s=2.0, timeout_s=1.0
            )
            (device,) = build_modbus_devices([params])
            try:
                start = loop.time()
                return await read_once(device), loop.time() - start
            finally:
                await device.close()

    loop = asyncio.new_event_loop()
    try:
        outcome, took_s = loop.run_until_complete(run())
    finally:
        loop.close()
    assert outcome == "kind:malformed"
    assert took_s < 0.5
    assert not [r for r in loud_logs.records if r.levelno >= logging.ERROR]
