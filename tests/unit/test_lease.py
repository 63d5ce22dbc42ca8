"""Lease and telemetry messages: strict decoding, all-or-nothing cap checks, sequence
numbers, topics, and the in-process link's delivery, cut and heal. Pure: no NVML here."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from controller.agentlink.lease import (
    Lease,
    LeaseRefused,
    LeaseSequence,
    LimitRange,
    MessageError,
    Refusal,
    Telemetry,
    decode_lease,
    decode_telemetry,
    resolve_caps,
    round_w,
)
from controller.agentlink.transport import AgentTopics, BadMessage, InProcessLink
from drivers.reading import Quality


def lease_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "controller_id": "ctl-a",
        "seq": 42,
        "issued_at": 1_700_000_000.25,
        "lease_s": 10,
        "caps_w": {"0": 450, "r1-n1-g1": 500.5},
        "job_id": "job-17",
        "reason": "rack r1 above its band",
    }
    doc.update(over)
    return doc


def test_lease_round_trips_through_json() -> None:
    lease = decode_lease(json.dumps(lease_doc()).encode())
    assert lease.caps_w == {"0": 450.0, "r1-n1-g1": 500.5}
    assert (lease.seq, lease.lease_s, lease.job_id) == (42, 10.0, "job-17")
    assert decode_lease(lease.encode()) == lease
    assert b" " not in lease.encode().replace(b"rack r1 above its band", b"")


def test_python_side_may_name_gpus_by_int_index() -> None:
    lease = Lease.issue("c", 1, {0: 300, 3: 310}, 5, issued_at=1.0)
    assert json.loads(lease.encode())["caps_w"] == {"0": 300.0, "3": 310.0}
    assert "job_id" not in json.loads(lease.encode())  # optional fields left out on the wire


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"seq": True}, "seq: Input should be a valid integer"),
        ({"seq": -1}, "seq: Input should be greater than or equal to 0"),
        ({"seq": "42"}, "seq: Input should be a valid integer"),
        ({"lease_s": 0}, "lease_s: Input should be greater than 0"),
        ({"lease_s": 7200}, "lease_s: Input should be less than or equal to 3600"),
        ({"caps_w": {}}, "caps_w: Dictionary should have at least 1 item"),
        ({"caps_w": {"0": "450"}}, "caps_w.0: Input should be a valid number"),
        ({"caps_w": {"0": -1}}, "caps_w.0: Input should be greater than 0"),
        ({"caps_w": {"gpu0": 1}}, "caps_w.gpu0: a GPU must be named by its index"),
        ({"controller_id": "a/b"}, "controller_id: String should match pattern"),
        ({"v": 2}, "v: Input should be 1"),
        ({"extra": 1}, "extra: unknown field"),
    ],
)
def test_invalid_lease_is_refused_with_field_and_reason(over: dict[str, Any], words: str) -> None:
    with pytest.raises(MessageError) as err:
        decode_lease(json.dumps(lease_doc(**over)).encode())
    assert words in str(err.value)


@pytest.mark.parametrize("payload", [b"", b"nope", b"[]", b'{"caps_w": {"0": NaN}}', b"\xff"])
def test_garbage_is_a_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError, match="invalid lease"):
        decode_lease(payload)


def test_nan_cap_is_refused() -> None:
    text = json.dumps(lease_doc()).replace("450", "NaN")
    with pytest.raises(MessageError, match="finite"):
        decode_lease(text.encode())


def test_missing_fields_are_listed() -> None:
    with pytest.raises(MessageError) as err:
        decode_lease(b'{"controller_id": "c"}')
    for name in ("seq", "issued_at", "lease_s"):
        assert name in str(err.value)


# --- resolve_caps -------------------------------------------------------------------------

RANGES = [LimitRange(200, 700)] * 4


def caps(c: dict[int | str, float]) -> Lease:
    return Lease.issue("c", 1, c, 5)


def test_resolve_caps_maps_site_ids_and_indices() -> None:
    assert resolve_caps(caps({0: 200, "n1-g3": 700}), "n1", RANGES) == {0: 200.0, 3: 700.0}


@pytest.mark.parametrize(
    ("c", "words"),
    [
        ({0: 199.9}, "GPU 0: cap 199.9 W outside its NVML range [200, 700] W"),
        ({1: 300, 2: 700.1}, "GPU 2: cap 700.1 W outside"),
        ({9: 300}, "this node has 4 GPUs (0-3)"),
        ({"n2-g0": 300}, "GPU n2-g0 is not on this node (n1)"),
        ({"n1-g7": 300}, "this node has 4 GPUs"),
        ({1: 300, "n1-g1": 300}, "GPU 1 is named twice"),
    ],
)
def test_resolve_caps_refuses_all_or_nothing(c: dict[int | str, float], words: str) -> None:
    with pytest.raises(LeaseRefused) as err:
        resolve_caps(caps(c), "n1", RANGES)
    assert words in str(err.value)


def test_node_ids_that_end_like_a_gpu_id_still_resolve() -> None:
    # Node "r1-g2" is legal: its GPU 1 is "r1-g2-g1".
    assert resolve_caps(caps({"r1-g2-g1": 300}), "r1-g2", RANGES) == {1: 300.0}


def test_gpu_with_unknown_range_is_skipped_not_refused() -> None:
    ranges = [LimitRange(200, 700), None]
    assert resolve_caps(caps({0: 300, 1: 300}), "n1", ranges) == {0: 300.0}


# --- telemetry ----------------------------------------------------------------------------


def telemetry(n: int = 8, **over: Any) -> Telemetry:
    fields: dict[str, Any] = {
        "agent_id": "agent-row-1-rack-1-node-1",
        "node_id": "row-1-rack-1-node-1",
        "ts": 1_700_000_000.123,
        "seq": 1_700_000_000_123,
        "failsafe": False,
        "lease_left_s": 9.5,
        "power_w": [612.3] * n,
        "power_avg_w": [598.7] * n,
        "limit_w": [650.0] * n,
        "min_w": [200.0] * n,
        "max_w": [700.0] * n,
        "q": [Quality.GOOD] * n,
    }
    fields.update(over)
    return Telemetry(**fields)


def test_telemetry_round_trips_and_stays_small() -> None:
    t = telemetry(refused=Refusal(seq=3, reason="GPU 1: cap 100 W outside"))
    wire = t.encode()
    assert decode_telemetry(wire) == t
    print(f"telemetry for 8 GPUs: {len(wire)} bytes")
    assert len(telemetry().encode()) < 600  # arrays, not an object per GPU


def test_telemetry_arrays_must_have_one_length() -> None:
    doc = json.loads(telemetry().encode())
    doc["limit_w"] = doc["limit_w"][:-1]
    with pytest.raises(MessageError, match="same length"):
        decode_telemetry(json.dumps(doc).encode())


def test_telemetry_unknown_values_are_null() -> None:
    t = telemetry(
        2, power_w=[round_w(float("nan")), round_w(None)], q=[Quality.ERROR, Quality.GOOD]
    )
    doc = json.loads(t.encode())
    assert doc["power_w"] == [None, None] and doc["q"] == ["error", "good"]
    assert round_w(612.345) == 612.3


# --- sequence and topics ------------------------------------------------------------------


def test_sequence_rises_across_restarts_and_within_a_millisecond() -> None:
    wall = [1_700_000_000.0]
    first = LeaseSequence(lambda: wall[0])
    a, b = first.next(), first.next()
    assert b == a + 1
    restarted = LeaseSequence(lambda: wall[0] + 5)  # a new process 5 s later
    assert restarted.next() > b


def test_topics() -> None:
    t = AgentTopics.for_site("rackpower/", "demo")
    assert t.lease("agent-1") == "rackpower/demo/agent/agent-1/lease"
    assert t.telemetry("agent-1") == "rackpower/demo/agent/agent-1/telemetry"
    assert t.status("agent-1") == "rackpower/demo/agent/agent-1/status"
    assert t.all_telemetry == "rackpower/demo/agent/+/telemetry"
    assert t.agent_of("rackpower/demo/agent/agent-1/telemetry") == "agent-1"
    assert t.agent_of("rackpower/other/agent/agent-1/telemetry") is None
    with pytest.raises(ValueError, match="MQTT topic level"):
        t.lease("a/#")


# --- in-process link ----------------------------------------------------------------------


async def test_in_process_link_delivers_cuts_and_heals() -> None:
    hub = InProcessLink(through_json=True)
    ctl, agent = hub.controller(), hub.agent("a1")
    lease = caps({0: 300})
    ctl.send_lease("a1", lease)
    ctl.send_lease("nobody", lease)
    hub.cut("a1")
    ctl.send_lease("a1", lease)
    agent.send_telemetry(telemetry(1, agent_id="a1"))
    hub.heal("a1")
    agent.send_telemetry(telemetry(1, agent_id="a1", seq=7))

    got = []
    async with asyncio.timeout(5):
        async for msg in agent.leases():
            got.append(msg)
            break
        async for t in ctl.telemetry():
            assert t.seq == 7
            break
    assert got == [lease]
    s = hub.stats()
    assert (s.leases_sent, s.leases_dropped, s.telemetry_sent, s.telemetry_dropped) == (1, 2, 1, 1)


async def test_in_process_agent_queue_keeps_the_newest_when_full() -> None:
    hub = InProcessLink(lease_queue_size=2)
    ctl, agent = hub.controller(), hub.agent("a1")
    for seq in (1, 2, 3):
        ctl.send_lease("a1", Lease.issue("c", seq, {0: 300}, 5))
    await agent.stop()  # ends the iterator once the queue is drained
    got = [m async for m in agent.leases() if not isinstance(m, BadMessage)]
    assert [m.seq if isinstance(m, Lease) else m for m in got] == [2, 3]
    assert hub.stats().leases_superseded == 1
