"""drivers.snmpwire: round trips, agreement with pyasn1 (pysnmp's independent BER codec),
and corrupted packets that must only ever raise the codec's own error."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyasn1.codec.ber import decoder as ber_decoder  # type: ignore[import-untyped]
from pyasn1.codec.ber import encoder as ber_encoder
from pysnmp.proto import api

from drivers import snmpwire as w

P = api.PROTOCOL_MODULES[api.SNMP_VERSION_2C]

arcs = st.integers(0, (1 << 32) - 1)
oids = st.builds(
    lambda first, second, rest: (first, second, *rest),
    st.integers(0, 2),
    st.integers(0, 39),
    st.lists(arcs, max_size=12),
)
int_values = st.one_of(
    *[st.tuples(st.just(tag), st.integers(lo, hi)) for tag, (lo, hi) in w.INT_BOUNDS.items()]
)
values = st.one_of(
    int_values,
    st.tuples(st.sampled_from([w.OCTET_STRING, w.OPAQUE]), st.binary(max_size=300)),
    st.tuples(st.just(w.IP_ADDRESS), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(w.OBJECT_IDENTIFIER), oids),
    st.tuples(st.sampled_from(sorted(w.EMPTY_TAGS)), st.none()),
)
messages = st.builds(
    w.Message,
    community=st.binary(max_size=40),
    pdu_type=st.sampled_from(sorted(w.PDU_TAGS)),
    request_id=st.integers(-(1 << 31), (1 << 31) - 1),
    varbinds=st.lists(st.tuples(oids, values), max_size=20).map(tuple),
    error_status=st.integers(0, 18),
    error_index=st.integers(0, 64),
    version=st.sampled_from([w.VERSION_1, w.VERSION_2C]),
)


@given(messages)
@settings(max_examples=300)
def test_round_trip(msg: w.Message) -> None:
    assert w.decode_message(w.encode_message(msg)) == msg


@given(oids)
def test_oid_text_round_trip(oid: w.Oid) -> None:
    assert w.parse_oid("." + w.format_oid(oid)) == oid


def _pysnmp_get(community: str, rid: int, oid_list: list[str], bulk: int | None = None) -> bytes:
    pdu = P.GetBulkRequestPDU() if bulk else P.GetRequestPDU()
    (P.apiBulkPDU if bulk else P.apiPDU).set_defaults(pdu)
    P.apiPDU.set_request_id(pdu, rid)
    if bulk:
        P.apiBulkPDU.set_non_repeaters(pdu, 1)
        P.apiBulkPDU.set_max_repetitions(pdu, bulk)
    P.apiPDU.set_varbinds(pdu, [(o, P.Null("")) for o in oid_list])
    msg = P.Message()
    P.apiMessage.set_defaults(msg)
    P.apiMessage.set_community(msg, community)
    P.apiMessage.set_pdu(msg, pdu)
    data: bytes = ber_encoder.encode(msg)
    return data


def test_decodes_what_pysnmp_encodes() -> None:
    data = _pysnmp_get("pdu-7", 123456789, ["1.3.6.1.2.1.1.3.0", "1.3.6.1.4.1.318.1.1.26"], 25)
    msg = w.decode_message(data)
    assert msg.community == b"pdu-7"
    assert msg.pdu_type == w.GETBULK
    assert msg.request_id == 123456789
    assert (msg.non_repeaters, msg.max_repetitions) == (1, 25)
    assert [o for o, _ in msg.varbinds] == [
        (1, 3, 6, 1, 2, 1, 1, 3, 0),
        (1, 3, 6, 1, 4, 1, 318, 1, 1, 26),
    ]
    assert all(v == w.NULL_VALUE for _, v in msg.varbinds)


def test_pysnmp_decodes_what_we_encode() -> None:
    """Every value type, at its edges, read back by pyasn1 with the same numbers."""
    req = w.Message(b"pdu-a", w.GET, -5, ())
    varbinds: list[w.VarBind] = [
        ((1, 3, 6, 1, 4, 1, 9, 1), (w.INTEGER, -(1 << 31))),
        ((1, 3, 6, 1, 4, 1, 9, 2), (w.INTEGER, -129)),
        ((1, 3, 6, 1, 4, 1, 9, 3), (w.GAUGE32, (1 << 32) - 1)),
        ((1, 3, 6, 1, 4, 1, 9, 4), (w.COUNTER32, 1 << 31)),
        ((1, 3, 6, 1, 4, 1, 9, 5), (w.COUNTER64, (1 << 64) - 1)),
        ((1, 3, 6, 1, 4, 1, 9, 6), (w.TIMETICKS, 4294967295)),
        ((1, 3, 6, 1, 4, 1, 9, 7), (w.OCTET_STRING, b"inlet \x00 1")),
        ((1, 3, 6, 1, 4, 1, 9, 8), (w.OBJECT_IDENTIFIER, (1, 3, 6, 1, 4, 1, (1 << 32) - 1))),
        ((1, 3, 6, 1, 4, 1, 9, 9), (w.IP_ADDRESS, bytes([10, 0, 0, 1]))),
        ((1, 3, 6, 1, 4, 1, 9, 10), (w.NO_SUCH_OBJECT, None)),
        ((1, 3, 6, 1, 4, 1, 9, 11), (w.NO_SUCH_INSTANCE, None)),
        ((1, 3, 6, 1, 4, 1, 9, 12), (w.END_OF_MIB_VIEW, None)),
    ]
    data = w.response(req, varbinds, w.GEN_ERR, 3)
    msg, rest = ber_decoder.decode(data, asn1Spec=P.Message())
    assert rest == b""
    assert str(P.apiMessage.get_community(msg)) == "pdu-a"
    pdu = P.apiMessage.get_pdu(msg)
    assert int(P.apiPDU.get_request_id(pdu)) == -5
    assert int(P.apiPDU.get_error_status(pdu)) == w.GEN_ERR
    assert int(P.apiPDU.get_error_index(pdu)) == 3
    got = P.apiPDU.get_varbinds(pdu)
    assert [tuple(o) for o, _ in got] == [o for o, _ in varbinds]
    for (_, v), (_, (tag, payload)) in zip(got, varbinds, strict=True):
        t = v.tagSet[-1]
        assert t.tagClass | t.tagFormat | t.tagId == tag
        if tag in w.INT_BOUNDS:
            assert int(v) == payload
        elif tag in w.BYTES_TAGS:
            assert bytes(v.asOctets()) == payload
        elif tag == w.OBJECT_IDENTIFIER:
            assert tuple(v) == payload


def test_unsigned_without_leading_zero_is_read_as_unsigned() -> None:
    """Some agents encode Gauge32 2**32-1 as four 0xFF bytes (no sign octet)."""
    varbind = b"\x06\x03\x2b\x06\x01" + b"\x42\x04\xff\xff\xff\xff"
    body = b"\x30" + bytes([len(varbind)]) + varbind
    vbl = b"\x30" + bytes([len(body)]) + body
    pdu = b"\x02\x01\x07\x02\x01\x00\x02\x01\x00" + vbl
    msg = b"\x02\x01\x01\x04\x01p" + bytes([w.RESPONSE, len(pdu)]) + pdu
    data = b"\x30" + bytes([len(msg)]) + msg
    decoded = w.decode_message(data)
    assert decoded.varbinds == (((1, 3, 6, 1), (w.GAUGE32, (1 << 32) - 1)),)


@pytest.mark.parametrize(
    "value",
    [
        (w.INTEGER, 1 << 31),
        (w.GAUGE32, -1),
        (w.COUNTER64, 1 << 64),
        (w.OCTET_STRING, "text"),
        (w.IP_ADDRESS, b"\x01\x02"),
        (0x47, 1),
    ],
)
def test_unsendable_values_raise_the_codec_error(value: w.Value) -> None:
    with pytest.raises(w.SnmpWireError):
        w.encode_value(value)


@pytest.mark.parametrize("text", ["", "1", "3.x.1", "1.40.2", "-1.3"])
def test_bad_oid_text(text: str) -> None:
    with pytest.raises(w.SnmpWireError):
        w.parse_oid(text)


def test_rejects_v3_and_trailing_bytes() -> None:
    good = w.request(w.GET, b"public", 1, [(1, 3, 6, 1, 2, 1, 1, 3, 0)])
    with pytest.raises(w.SnmpWireError):
        w.decode_message(good + b"\x00")
    v3 = bytearray(good)
    v3[4] = 3  # version field: SNMPv3
    with pytest.raises(w.SnmpWireError, match="version"):
        w.decode_message(bytes(v3))


def _mutations(seed: int, good: bytes, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if not b:
                break
            if op < 0.6:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.8:
                del b[rng.randrange(len(b)) :]
            else:
                b.insert(rng.randrange(len(b)), rng.randrange(256))
        out.append(bytes(b))
    return out


def test_fuzzed_packets_raise_only_the_codec_error() -> None:
    """Thousands of corrupted requests and responses: each decodes to a Message or raises
    SnmpWireError, and whatever decodes encodes again (no half-valid objects escape)."""
    oid = (1, 3, 6, 1, 4, 1, 13742, 6, 5, 2, 3, 1, 4, 1, 1, 5)
    samples = [
        w.request(w.GETBULK, b"pdu-a", 77, [oid, (1, 3, 6, 1, 2, 1, 1, 5, 0)], 1, 10),
        w.response(
            w.Message(b"pdu-a", w.GET, 123456, ()),
            [
                (oid, (w.GAUGE32, 4_000_000_000)),
                (oid, (w.OCTET_STRING, b"x" * 200)),
                (oid, (w.COUNTER64, 1 << 63)),
                (oid, (w.NO_SUCH_INSTANCE, None)),
                (oid, (w.OBJECT_IDENTIFIER, oid)),
            ],
        ),
    ]
    decoded = 0
    for seed, good in enumerate(samples):
        for data in _mutations(seed, good, 6000):
            try:
                msg = w.decode_message(data)
            except w.SnmpWireError:
                continue
            decoded += 1
            assert isinstance(msg, w.Message)
            # e.g. a mutated OID arc that decodes but is not a valid first arc
            with contextlib.suppress(w.SnmpWireError):
                w.encode_message(msg)
    assert decoded > 0  # the mutations are not all fatal: the decoder really was exercised


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_random_bytes_raise_only_the_codec_error(data: bytes) -> None:
    with contextlib.suppress(w.SnmpWireError):
        w.decode_message(data)
