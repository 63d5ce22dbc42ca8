"""A small BER codec for SNMPv2c messages: GET, GETNEXT, GETBULK and RESPONSE PDUs.

Why not pyasn1 (what pysnmp uses): decoding and building one 10-varbind response through
pyasn1 costs about 1 ms of CPU here, the hand-written codec about 0.1 ms (see
/work/notes/pysnmp.md). Polling hundreds of PDUs at 1 Hz, that is the difference between a
tenth of a core and a whole one. The driver's v2c fast path and the simulator's agent both
use this module; SNMPv3 (USM auth and privacy) stays with pysnmp.

Values travel as ``(tag, payload)`` pairs, the tag being the BER type byte: integer tags
carry an ``int``, OCTET STRING / IpAddress / Opaque carry ``bytes``, OBJECT IDENTIFIER a
tuple of arcs, NULL and the three v2 exceptions (noSuchObject, noSuchInstance,
endOfMibView) carry ``None``. Everything malformed raises :class:`SnmpWireError` and
nothing else, because both ends read packets from the network.
"""

from __future__ import annotations

from dataclasses import dataclass

# Universal and SNMP application tags (RFC 2578), context tags of SNMPv2 exceptions.
INTEGER = 0x02
OCTET_STRING = 0x04
NULL = 0x05
OBJECT_IDENTIFIER = 0x06
SEQUENCE = 0x30
IP_ADDRESS = 0x40
COUNTER32 = 0x41
GAUGE32 = 0x42
TIMETICKS = 0x43
OPAQUE = 0x44
COUNTER64 = 0x46
NO_SUCH_OBJECT = 0x80
NO_SUCH_INSTANCE = 0x81
END_OF_MIB_VIEW = 0x82

# PDU tags (RFC 3416).
GET = 0xA0
GETNEXT = 0xA1
RESPONSE = 0xA2
SET = 0xA3
GETBULK = 0xA5

VERSION_1 = 0
VERSION_2C = 1

# error-status values a responder sends (RFC 3416).
NO_ERROR = 0
TOO_BIG = 1
NO_SUCH_NAME = 2
GEN_ERR = 5
ERROR_NAMES = {
    0: "noError",
    1: "tooBig",
    2: "noSuchName",
    3: "badValue",
    4: "readOnly",
    5: "genErr",
    6: "noAccess",
    7: "wrongType",
    8: "wrongLength",
    9: "wrongEncoding",
    10: "wrongValue",
    11: "noCreation",
    12: "inconsistentValue",
    13: "resourceUnavailable",
    14: "commitFailed",
    15: "undoFailed",
    16: "authorizationError",
    17: "notWritable",
    18: "inconsistentName",
}

TAG_NAMES = {
    INTEGER: "INTEGER",
    OCTET_STRING: "OCTET STRING",
    NULL: "NULL",
    OBJECT_IDENTIFIER: "OBJECT IDENTIFIER",
    IP_ADDRESS: "IpAddress",
    COUNTER32: "Counter32",
    GAUGE32: "Gauge32",
    TIMETICKS: "TimeTicks",
    OPAQUE: "Opaque",
    COUNTER64: "Counter64",
    NO_SUCH_OBJECT: "noSuchObject",
    NO_SUCH_INSTANCE: "noSuchInstance",
    END_OF_MIB_VIEW: "endOfMibView",
}

# Integer-valued tags and their bounds (INTEGER is Integer32 in SNMPv2 varbinds).
INT_BOUNDS: dict[int, tuple[int, int]] = {
    INTEGER: (-(1 << 31), (1 << 31) - 1),
    COUNTER32: (0, (1 << 32) - 1),
    GAUGE32: (0, (1 << 32) - 1),
    TIMETICKS: (0, (1 << 32) - 1),
    COUNTER64: (0, (1 << 64) - 1),
}
BYTES_TAGS = frozenset({OCTET_STRING, IP_ADDRESS, OPAQUE})
EMPTY_TAGS = frozenset({NULL, NO_SUCH_OBJECT, NO_SUCH_INSTANCE, END_OF_MIB_VIEW})
EXCEPTION_TAGS = frozenset({NO_SUCH_OBJECT, NO_SUCH_INSTANCE, END_OF_MIB_VIEW})
PDU_TAGS = frozenset({GET, GETNEXT, RESPONSE, SET, GETBULK})

# The tag a device map's SNMP type name is served and expected with (drivers.devicemap).
TYPE_TAGS: dict[str, int] = {
    "integer": INTEGER,
    "gauge32": GAUGE32,
    "counter32": COUNTER32,
    "counter64": COUNTER64,
    "octetstring": OCTET_STRING,
}

# RFC 2578 3.5: at most 128 sub-identifiers, each at most 2**32 - 1. Bounding them here is
# also what keeps decoding linear: a 60 KB sub-identifier would otherwise grow one Python
# int by 7 bits per byte (0.4 s of CPU on the event loop for one datagram).
MAX_OID_ARCS = 128
MAX_ARC = (1 << 32) - 1
_MAX_FIRST_ARC = MAX_ARC + 80  # the first two arcs share one sub-identifier (40 * x + y)


Oid = tuple[int, ...]
Payload = int | bytes | Oid | None
Value = tuple[int, Payload]
VarBind = tuple[Oid, Value]

NULL_VALUE: Value = (NULL, None)


class SnmpWireError(ValueError):
    """A packet that is not a well-formed SNMPv1/v2c message (or a value that cannot be sent)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One SNMP v1/v2c message. For GETBULK, ``error_status`` and ``error_index`` hold
    non-repeaters and max-repetitions, exactly as on the wire (RFC 3416 shares the fields).
    """

    community: bytes
    pdu_type: int
    request_id: int
    varbinds: tuple[VarBind, ...]
    error_status: int = 0
    error_index: int = 0
    version: int = VERSION_2C

    @property
    def non_repeaters(self) -> int:
        return self.error_status

    @property
    def max_repetitions(self) -> int:
        return self.error_index


# ---------------------------------------------------------------------------
# OIDs as text


def parse_oid(text: str) -> Oid:
    """``"1.3.6.1.2.1.1.3.0"`` (leading dot allowed) -> arcs."""
    try:
        arcs = tuple(int(a) for a in text.strip().lstrip(".").split("."))
    except ValueError:
        raise SnmpWireError(f"not a numeric OID: {text!r}") from None
    _check_oid(arcs)
    return arcs


def format_oid(oid: Oid) -> str:
    return ".".join(map(str, oid))


def _check_oid(oid: Oid) -> None:
    if (
        not 2 <= len(oid) <= MAX_OID_ARCS
        or oid[0] > 2
        or (oid[0] < 2 and oid[1] > 39)
        or min(oid) < 0
        or max(oid[1:]) > MAX_ARC
    ):
        text = format_oid(oid[:MAX_OID_ARCS]) if max(oid) <= MAX_ARC else "(huge arcs)"
        raise SnmpWireError(f"not a valid OID: {text[:200]}")


# ---------------------------------------------------------------------------
# encoding


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _length(len(body)) + body


def _int_body(v: int) -> bytes:
    return v.to_bytes((v + (v < 0)).bit_length() // 8 + 1, "big", signed=True)


def _oid_body(oid: Oid) -> bytes:
    _check_oid(oid)
    out = bytearray()
    for arc in (oid[0] * 40 + oid[1], *oid[2:]):
        if arc < 0x80:
            out.append(arc)
            continue
        tmp = [arc & 0x7F]
        arc >>= 7
        while arc:
            tmp.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(tmp))
    return bytes(out)


def encode_value(value: Value) -> bytes:
    tag, payload = value
    if tag in INT_BOUNDS:
        lo, hi = INT_BOUNDS[tag]
        if not isinstance(payload, int) or not lo <= payload <= hi:
            raise SnmpWireError(f"{TAG_NAMES[tag]} cannot carry {payload!r}")
        return _tlv(tag, _int_body(payload))
    if tag in BYTES_TAGS:
        if not isinstance(payload, bytes):
            raise SnmpWireError(f"{TAG_NAMES[tag]} needs bytes, not {payload!r}")
        if tag == IP_ADDRESS and len(payload) != 4:
            raise SnmpWireError("IpAddress is 4 bytes")
        return _tlv(tag, payload)
    if tag == OBJECT_IDENTIFIER:
        if not isinstance(payload, tuple):
            raise SnmpWireError(f"OBJECT IDENTIFIER needs arcs, not {payload!r}")
        return _tlv(tag, _oid_body(payload))
    if tag in EMPTY_TAGS:
        return bytes((tag, 0))
    raise SnmpWireError(f"cannot encode tag 0x{tag:02x}")


def encode_varbinds(varbinds: tuple[VarBind, ...] | list[VarBind]) -> bytes:
    return _tlv(
        SEQUENCE,
        b"".join(
            _tlv(SEQUENCE, _tlv(OBJECT_IDENTIFIER, _oid_body(o)) + encode_value(v))
            for o, v in varbinds
        ),
    )


def encode_message(msg: Message) -> bytes:
    if msg.pdu_type not in PDU_TAGS:
        raise SnmpWireError(f"not a PDU type: 0x{msg.pdu_type:02x}")
    lo, hi = INT_BOUNDS[INTEGER]
    for name in ("request_id", "error_status", "error_index", "version"):
        if not lo <= getattr(msg, name) <= hi:
            raise SnmpWireError(f"{name} {getattr(msg, name)} is not an Integer32")
    pdu = (
        _tlv(INTEGER, _int_body(msg.request_id))
        + _tlv(INTEGER, _int_body(msg.error_status))
        + _tlv(INTEGER, _int_body(msg.error_index))
        + encode_varbinds(msg.varbinds)
    )
    return _tlv(
        SEQUENCE,
        _tlv(INTEGER, _int_body(msg.version))
        + _tlv(OCTET_STRING, msg.community)
        + _tlv(msg.pdu_type, pdu),
    )


def request(
    pdu_type: int,
    community: bytes,
    request_id: int,
    oids: list[Oid] | tuple[Oid, ...],
    non_repeaters: int = 0,
    max_repetitions: int = 0,
) -> bytes:
    """A GET/GETNEXT/GETBULK request: the varbinds carry NULL values."""
    return encode_message(
        Message(
            community,
            pdu_type,
            request_id,
            tuple((o, NULL_VALUE) for o in oids),
            non_repeaters,
            max_repetitions,
        )
    )


def response(
    request_msg: Message,
    varbinds: tuple[VarBind, ...] | list[VarBind],
    error_status: int = 0,
    error_index: int = 0,
) -> bytes:
    """The RESPONSE to ``request_msg`` (same version, community and request id)."""
    return encode_message(
        Message(
            request_msg.community,
            RESPONSE,
            request_msg.request_id,
            tuple(varbinds),
            error_status,
            error_index,
            request_msg.version,
        )
    )


# ---------------------------------------------------------------------------
# decoding


def _read(buf: bytes, i: int, end: int) -> tuple[int, int, int]:
    """Tag, start and end of the value of the TLV at ``i``, which must fit before ``end``."""
    if i + 2 > end:
        raise SnmpWireError("truncated header")
    tag, n = buf[i], buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or i + k > end:
            raise SnmpWireError("bad length")
        n = int.from_bytes(buf[i : i + k], "big")
        i += k
    if i + n > end:
        raise SnmpWireError("truncated value")
    return tag, i, i + n


def _expect(buf: bytes, i: int, end: int, tag: int) -> tuple[int, int]:
    t, s, e = _read(buf, i, end)
    if t != tag:
        raise SnmpWireError(f"expected tag 0x{tag:02x} at {i}, got 0x{t:02x}")
    return s, e


def _int(buf: bytes, s: int, e: int, signed: bool = True) -> int:
    if s == e or e - s > 9:
        raise SnmpWireError("bad integer length")
    return int.from_bytes(buf[s:e], "big", signed=signed)


def _oid(buf: bytes, s: int, e: int) -> Oid:
    if s == e or buf[e - 1] & 0x80:
        raise SnmpWireError("bad OID encoding")
    arcs: list[int] = []
    v = 0
    for c in buf[s:e]:
        v = (v << 7) | (c & 0x7F)
        if v > _MAX_FIRST_ARC or (arcs and v > MAX_ARC):
            raise SnmpWireError("OID sub-identifier above 2**32 - 1")
        if not c & 0x80:
            arcs.append(v)
            v = 0
            if len(arcs) > MAX_OID_ARCS - 1:  # the first sub-identifier holds two arcs
                raise SnmpWireError(f"OID longer than {MAX_OID_ARCS} arcs")
    first = min(arcs[0] // 40, 2)
    return (first, arcs[0] - 40 * first, *arcs[1:])


def _value(buf: bytes, tag: int, s: int, e: int) -> Value:
    if tag in INT_BOUNDS:
        lo, hi = INT_BOUNDS[tag]
        # Unsigned types read as unsigned: some agents drop the leading 0x00 of 2**31..
        number = _int(buf, s, e, signed=lo < 0)
        if not lo <= number <= hi:
            raise SnmpWireError(f"{TAG_NAMES[tag]} out of range: {number}")
        return tag, number
    if tag in BYTES_TAGS:
        return tag, bytes(buf[s:e])
    if tag == OBJECT_IDENTIFIER:
        return tag, _oid(buf, s, e)
    if tag in EMPTY_TAGS:
        if s != e:
            raise SnmpWireError(f"{TAG_NAMES[tag]} with content")
        return tag, None
    raise SnmpWireError(f"unknown value tag 0x{tag:02x}")


def decode_message(data: bytes) -> Message:
    """Parse one datagram. Raises :class:`SnmpWireError` (only) if it is not valid SNMP."""
    try:
        return _decode(data)
    except SnmpWireError:
        raise
    except (IndexError, ValueError, TypeError) as e:  # belt and braces for the fuzzer
        raise SnmpWireError(f"malformed packet: {e}") from None


def _decode(data: bytes) -> Message:
    end = len(data)
    s, e = _expect(data, 0, end, SEQUENCE)
    if e != end:
        raise SnmpWireError("trailing bytes after the message")
    vs, ve = _expect(data, s, e, INTEGER)
    version = _int(data, vs, ve)
    if version not in (VERSION_1, VERSION_2C):
        raise SnmpWireError(f"not SNMPv1/v2c (version field {version})")
    cs, ce = _expect(data, ve, e, OCTET_STRING)
    community = bytes(data[cs:ce])
    pdu_type, ps, pe = _read(data, ce, e)
    if pdu_type not in PDU_TAGS:
        raise SnmpWireError(f"unsupported PDU type 0x{pdu_type:02x}")
    if pe != e:
        raise SnmpWireError("trailing bytes after the PDU")
    fields = []
    i = ps
    for _ in range(3):
        fs, fe = _expect(data, i, pe, INTEGER)
        if fe - fs > 5:
            raise SnmpWireError("PDU field is not an Integer32")
        fields.append(_int(data, fs, fe))
        i = fe
    ls, le = _expect(data, i, pe, SEQUENCE)
    if le != pe:
        raise SnmpWireError("trailing bytes after the varbind list")
    varbinds: list[VarBind] = []
    i = ls
    while i < le:
        bs, be = _expect(data, i, le, SEQUENCE)
        os_, oe = _expect(data, bs, be, OBJECT_IDENTIFIER)
        oid = _oid(data, os_, oe)
        tag, xs, xe = _read(data, oe, be)
        if xe != be:
            raise SnmpWireError("trailing bytes in a varbind")
        varbinds.append((oid, _value(data, tag, xs, xe)))
        i = be
    return Message(community, pdu_type, fields[0], tuple(varbinds), fields[1], fields[2], version)
