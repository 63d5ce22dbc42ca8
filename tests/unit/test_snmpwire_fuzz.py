"""Property and fuzz tests of the SNMP BER decoder and of the v2c client's reply matching.

Both read packets any device (or anything that can reach our UDP port) sends, so the
contract is strict: a datagram decodes to a :class:`~drivers.snmpwire.Message` or raises
:class:`~drivers.snmpwire.SnmpWireError`, nothing else, in time linear in its size; and a
reply is only ever matched to the request it answers.

``make test`` runs a bounded number of examples; a long run for the figures:

    RACKPOWER_FUZZ_EXAMPLES=20000 RACKPOWER_FUZZ_MUTATIONS=200000 \
        pytest tests/unit/test_snmpwire_fuzz.py -q -s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import snmpwire as w
from drivers.snmp import _ClientProtocol, _Pending
from tests.fixtures.hostile import huge_oid_response

EXAMPLES = int(os.environ.get("RACKPOWER_FUZZ_EXAMPLES", "200"))
# RFC 2578 3.5, stated here rather than imported: the test holds the decoder to the RFC.
MAX_ARC = (1 << 32) - 1
MAX_OID_ARCS = 128

FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# strategies: valid messages, then ways to break them

arcs = st.lists(st.integers(0, MAX_ARC), min_size=0, max_size=12)
oids = st.builds(
    lambda first, second, rest: (first, second, *rest), st.integers(0, 1), st.integers(0, 39), arcs
)


def _int_value(tag: int) -> st.SearchStrategy[w.Value]:
    lo, hi = w.INT_BOUNDS[tag]
    return st.tuples(st.just(tag), st.integers(lo, hi))


values: st.SearchStrategy[w.Value] = st.one_of(
    *(_int_value(t) for t in w.INT_BOUNDS),
    st.tuples(st.sampled_from([w.OCTET_STRING, w.OPAQUE]), st.binary(max_size=64)),
    st.tuples(st.just(w.IP_ADDRESS), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(w.OBJECT_IDENTIFIER), oids),
    st.tuples(st.sampled_from(sorted(w.EMPTY_TAGS)), st.none()),
)
int32 = st.integers(-(1 << 31), (1 << 31) - 1)
messages = st.builds(
    w.Message,
    community=st.binary(max_size=32),
    pdu_type=st.sampled_from(sorted(w.PDU_TAGS)),
    request_id=int32,
    varbinds=st.lists(st.tuples(oids, values), max_size=8).map(tuple),
    error_status=int32,
    error_index=int32,
    version=st.sampled_from([w.VERSION_1, w.VERSION_2C]),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with 1-4 byte-level edits: flips, inserts, cuts, huge lengths."""
    data = bytearray(w.encode_message(draw(messages)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete", "cut", "huge_length"]))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[i:]
        else:  # a length field claiming far more than there is (or a 5..127-byte length)
            k = draw(st.integers(1, 127))
            data[i : i + 1] = bytes((0x80 | k,)) + b"\xff" * min(k, 8)
    return bytes(data)


def decodes_or_refuses(data: bytes) -> w.Message | None:
    """The contract: a Message, or SnmpWireError (None); anything else propagates."""
    try:
        msg = w.decode_message(data)
    except w.SnmpWireError:
        return None
    assert isinstance(msg, w.Message)
    return msg


# ---------------------------------------------------------------------------
# the decoder


@given(messages)
@FUZZ
def test_valid_messages_round_trip(msg: w.Message) -> None:
    assert w.decode_message(w.encode_message(msg)) == msg


@given(st.binary(max_size=1500))
@FUZZ
def test_random_bytes_decode_or_raise_only_the_codec_error(data: bytes) -> None:
    decodes_or_refuses(data)


@given(mutated())
@FUZZ
def test_mutated_messages_decode_or_raise_only_the_codec_error(data: bytes) -> None:
    msg = decodes_or_refuses(data)
    if msg is not None:  # whatever decodes is a whole message: it encodes again, or refuses
        with contextlib.suppress(w.SnmpWireError):
            w.encode_message(msg)


@given(messages, st.data())
@FUZZ
def test_every_truncation_is_refused(msg: w.Message, data: st.DataObject) -> None:
    packet = w.encode_message(msg)
    cut = data.draw(st.integers(0, len(packet) - 1))
    assert decodes_or_refuses(packet[:cut]) is None


@given(messages, st.integers(2, 4), st.integers(0x80, 0xFF))
@FUZZ
def test_huge_outer_length_is_refused(msg: w.Message, k: int, fill: int) -> None:
    """The outer SEQUENCE claims 32 KiB to 4 GiB, more than there is: refused without
    reading (or allocating) it."""
    packet = w.encode_message(msg)
    s, _ = w._read(packet, 0, len(packet))[1:]
    forged = b"\x30" + bytes((0x80 | k,)) + bytes((fill,)) * k + packet[s:]
    assert decodes_or_refuses(forged) is None


def test_huge_oid_sub_identifier_is_refused_in_linear_time() -> None:
    """A 60 KB sub-identifier (what a hostile device can put in one datagram) cost 0.4 s of
    event-loop CPU to decode into a 420,000-bit arc, and then broke format_oid with a
    ValueError. RFC 2578 bounds sub-identifiers to 2**32 - 1: refused at once."""
    packet = huge_oid_response(5, b"c", size=60_000)
    start = time.perf_counter()
    assert decodes_or_refuses(packet) is None
    assert time.perf_counter() - start < 0.02


def test_oid_limits_are_rfc_2578s() -> None:
    ok = (1, 3, 6, 1, MAX_ARC)
    assert w.decode_message(w.request(w.GET, b"c", 1, [ok])).varbinds[0][0] == ok
    longest = (1, 3, *([7] * (MAX_OID_ARCS - 2)))
    assert w.decode_message(w.request(w.GET, b"c", 1, [longest])).varbinds[0][0] == longest
    for bad in ((1, 3, MAX_ARC + 1), (*longest, 7)):
        with contextlib.suppress(w.SnmpWireError):
            w.request(w.GET, b"c", 1, [bad])
            raise AssertionError(f"encoded an OID RFC 2578 forbids: {len(bad)} arcs")
    # ... and on the wire, built by hand, the decoder refuses them too.
    too_long = w._tlv(w.OBJECT_IDENTIFIER, b"\x2b" + b"\x07" * (MAX_OID_ARCS - 1))
    vb = w._tlv(w.SEQUENCE, w._tlv(w.SEQUENCE, too_long + b"\x05\x00"))
    pdu = w._tlv(w.GET, b"\x02\x01\x01\x02\x01\x00\x02\x01\x00" + vb)
    assert decodes_or_refuses(w._tlv(w.SEQUENCE, b"\x02\x01\x01\x04\x01c" + pdu)) is None


# ---------------------------------------------------------------------------
# the client's reply matching (drivers.snmp._ClientProtocol), fed datagrams directly

AGENT = ("127.0.0.1", 16100)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One loop for every example: futures need one, not a running one."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@given(
    st.lists(
        st.one_of(st.binary(max_size=300), mutated(), messages.map(w.encode_message)),
        max_size=20,
    )
)
@FUZZ
def test_client_matches_only_the_reply_it_waits_for(
    loop: asyncio.AbstractEventLoop, datagrams: list[bytes]
) -> None:
    """Random, mutated and well-formed-but-unasked datagrams from the agent's own address:
    none raises, each one that is not exactly our reply is dropped and counted, and the
    pending request resolves only with a RESPONSE bearing its id and community."""
    pending: dict[int, _Pending] = {}
    proto = _ClientProtocol(pending)
    future: asyncio.Future[w.Message] = loop.create_future()
    pending[4242] = _Pending(future, AGENT, b"pdu")
    proto.waiting[AGENT] = 1
    for d in datagrams:
        proto.datagram_received(d, AGENT)
    if future.done():
        msg = future.result()
        assert (msg.request_id, msg.pdu_type, msg.community) == (4242, w.RESPONSE, b"pdu")
    matched = 1 if future.done() else 0
    assert proto.dropped == len(datagrams) - matched
    bad, why = proto.bad_from.get(AGENT, (0, ""))
    assert bad <= proto.dropped  # late answers (unknown ids) are not held against it
    assert len(why) <= 200  # the reason kept is bounded, whatever the datagram
    future.cancel()


def test_client_tracks_garbage_only_from_addresses_it_waits_on() -> None:
    """A flood from addresses with nothing in flight (or spoofed ones) grows no table."""
    proto = _ClientProtocol({})
    for port in range(10_000):
        proto.datagram_received(b"\x30\x03garbage", ("10.0.0.1", port))
    assert proto.dropped == 10_000
    assert proto.bad_from == {}


MUTATIONS = int(os.environ.get("RACKPOWER_FUZZ_MUTATIONS", "5000"))


def test_many_mutations_of_real_messages_raise_only_the_codec_error() -> None:
    """A plain random mutator (no shrinking, so it can run 200,000 cases in a minute) over
    requests and responses like those on the wire. Prints the figures with -s."""

    rng = random.Random(11)
    oid = (1, 3, 6, 1, 4, 1, 318, 1, 1, 26, 4, 3, 1, 5, 1)
    samples = [
        w.request(w.GET, b"public", 77, [oid, (1, 3, 6, 1, 2, 1, 1, 3, 0)]),
        w.request(w.GETBULK, b"pdu-a", 78, [oid], 0, 10),
        w.response(
            w.Message(b"pdu-a", w.GET, 123456, ()),
            [
                (oid, (w.GAUGE32, 4_000_000_000)),
                (oid, (w.OCTET_STRING, b"x" * 200)),
                (oid, (w.COUNTER64, 1 << 63)),
                (oid, (w.NO_SUCH_INSTANCE, None)),
                (oid, (w.OBJECT_IDENTIFIER, oid)),
                (oid, (w.TIMETICKS, 12345)),
                (oid, (w.IP_ADDRESS, b"\x7f\x00\x00\x01")),
            ],
        ),
    ]
    decoded = refused = 0
    slowest_s = 0.0
    start = time.perf_counter()
    for _ in range(MUTATIONS):
        b = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            if not b:
                break
            op, i = rng.random(), rng.randrange(len(b))
            if op < 0.5:
                b[i] = rng.randrange(256)
            elif op < 0.65:
                del b[i:]
            elif op < 0.8:
                b[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op < 0.9:
                del b[i : i + rng.randint(1, 8)]
            else:  # a long-form length claiming far more than there is
                k = rng.randint(1, 6)
                b[i : i + 1] = bytes((0x80 | k,)) + b"\xff" * k
        t = time.perf_counter()
        if decodes_or_refuses(bytes(b)) is None:
            refused += 1
        else:
            decoded += 1
        slowest_s = max(slowest_s, time.perf_counter() - t)
    took_s = time.perf_counter() - start
    print(
        f"\n{MUTATIONS} mutated messages: {refused} SnmpWireError, {decoded} decoded, "
        f"nothing else raised; {took_s:.1f} s, slowest {slowest_s * 1e6:.0f} us"
    )
    assert decoded > 0 and refused > 0  # the mutator really exercised both outcomes
    assert slowest_s < 0.05
