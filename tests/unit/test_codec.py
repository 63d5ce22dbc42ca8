"""The codec table: every Modbus type in every byte/word order, fixed point, scale factors,
SNMP scaling, and garbage detection. Wire layouts are checked against hand-written words
and against pymodbus's own converter, so the codec cannot be merely self-consistent."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers import codec
from drivers.devicemap import DeviceMapError, ModbusPoint, SnmpPoint, parse_map

ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]


def mp(**kw: Any) -> ModbusPoint:
    kw.setdefault("address", 0)
    return ModbusPoint.model_validate(kw)


def sp(**kw: Any) -> SnmpPoint:
    kw.setdefault("oid", "1.3.6.1.4.1.99.1.0")
    return SnmpPoint.model_validate(kw)


# Sample values per type: extremes and ordinary ones.
SAMPLES: dict[str, list[float]] = {
    "int16": [-32768, -2, 0, 1, 32767],
    "uint16": [0, 1, 0xBEEF, 65535],
    "int32": [-(2**31), -123456, 0, 2**31 - 1],
    "uint32": [0, 0x01020304, 2**32 - 1],
    "int64": [-(2**63), -1, 2**53, 2**63 - 1],
    "uint64": [0, 2**53 + 2, 2**64 - 1],
    "float32": [0.0, 1.5, -230.25, 123456.5, 3.0e38],
    "float64": [0.0, -1.0e-300, 1234567.890123, 1.0e300],
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("type_", sorted(SAMPLES))
def test_every_type_and_order_round_trips(type_: str, order: str) -> None:
    p = mp(type=type_, order=order)
    for value in SAMPLES[type_]:
        words = codec.encode(p, value)
        assert len(words) == codec.register_count(p)
        assert all(0 <= w <= 0xFFFF for w in words)
        assert codec.decode(p, words) == pytest.approx(value, rel=1e-7)


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("ABCD", [0x0102, 0x0304]),
        ("CDAB", [0x0304, 0x0102]),
        ("BADC", [0x0201, 0x0403]),
        ("DCBA", [0x0403, 0x0201]),
    ],
)
def test_byte_and_word_order_wire_layout(order: str, words: list[int]) -> None:
    assert codec.encode(mp(type="uint32", order=order), 0x01020304) == words
    # the same rule stretched to 64 bits
    p64 = mp(type="uint64", order=order)
    assert codec.decode_raw(p64, codec.encode(p64, 0x0102030405060708)) == 0x0102030405060708


def test_sixteen_bit_orders_only_swap_bytes() -> None:
    assert codec.encode(mp(type="uint16", order="ABCD"), 0x1234) == [0x1234]
    assert codec.encode(mp(type="uint16", order="CDAB"), 0x1234) == [0x1234]
    assert codec.encode(mp(type="uint16", order="BADC"), 0x1234) == [0x3412]
    assert codec.encode(mp(type="uint16", order="DCBA"), 0x1234) == [0x3412]


@pytest.mark.parametrize(("order", "word_order"), [("ABCD", "big"), ("CDAB", "little")])
@pytest.mark.parametrize("type_", ["int32", "uint32", "float32", "int64", "float64"])
def test_agrees_with_pymodbus_converter(
    type_: str, order: str, word_order: Literal["big", "little"]
) -> None:
    dt = getattr(AsyncModbusTcpClient.DATATYPE, type_.upper())
    value = -230.25 if type_.startswith("float") else -123456 if type_[0] == "i" else 123456
    ours = codec.encode(mp(type=type_, order=order), value)
    theirs = AsyncModbusTcpClient.convert_to_registers(value, dt, word_order=word_order)
    assert ours == theirs
    assert AsyncModbusTcpClient.convert_from_registers(ours, dt, word_order=word_order) == value


def test_known_float32_words() -> None:
    # the pymodbus notes' reference value: -230.25 -> [50022, 16384] high word first
    assert codec.encode(mp(type="float32"), -230.25) == [50022, 16384]
    assert codec.encode(mp(type="float32", order="CDAB"), -230.25) == [16384, 50022]


def test_scale_and_offset() -> None:
    p = mp(type="int16", scale=0.1, offset=-40.0)
    assert codec.encode(p, 25.0) == [650]
    assert codec.decode(p, [650]) == pytest.approx(25.0)


def test_integers_saturate_instead_of_wrapping() -> None:
    assert codec.encode(mp(type="uint16", scale=0.1), 1.0e9) == [0xFFFF]
    assert codec.encode(mp(type="int16"), -1.0e9) == [0x8000]
    assert codec.encode(mp(type="uint16"), -5) == [0]


def test_fixed_point_like_orv3() -> None:
    vout = mp(type="fixed", fraction_bits=10, address=79)
    assert codec.decode(vout, [0x3400]) == 13.0  # 13312 / 1024
    assert codec.encode(vout, 51.0) == [51 * 1024]
    temp = mp(type="fixed", fraction_bits=7, signed=True)
    assert codec.decode(temp, codec.encode(temp, -12.5)) == -12.5
    assert codec.encode(temp, -12.5) == [(-1600) & 0xFFFF]
    wide = mp(type="fixed", fraction_bits=8, length=2)
    assert codec.decode(wide, codec.encode(wide, 70000.25)) == 70000.25


def test_sunspec_scale_factor_exponent() -> None:
    dca = mp(type="int16")
    assert codec.decode(dca, [123], sf=-1) == pytest.approx(12.3)
    assert codec.encode(dca, 12.3, sf=-1) == [123]
    assert codec.decode(dca, [123], sf=2) == pytest.approx(12300)


def test_strings_and_bitfields() -> None:
    s = mp(type="string", length=4)
    assert codec.encode(s, "ORv3") == [ord("O") << 8 | ord("R"), ord("v") << 8 | ord("3"), 0, 0]
    assert codec.decode(s, codec.encode(s, "ORv3")) == "ORv3"
    assert codec.decode(mp(type="string", length=2, order="BADC"), [0x4241, 0x0043]) == "ABC"
    bits = mp(type="bitfield", bits={0: "ac_fail", 3: "over_temp", 20: "far"}, length=2)
    words = codec.encode(bits, (1 << 3) | (1 << 20))
    assert codec.active_bits(bits, float(codec.decode(bits, words))) == ["over_temp", "far"]


def test_problem_flags_nan_infinity_range_and_not_implemented() -> None:
    p = mp(type="float32", min=0, max=1000)
    assert codec.problem(p, 10.0) is None
    assert "nan" in (codec.problem(p, codec.decode(p, codec.garbage(p))) or "")
    assert "inf" in (codec.problem(p, math.inf) or "")
    assert "above max" in (codec.problem(p, 1000.5) or "")
    assert "below min" in (codec.problem(p, -0.1) or "")
    sunspec = mp(type="int16", not_implemented=(-32768,))
    raw = codec.decode_raw(sunspec, codec.garbage(sunspec))
    assert raw == -32768
    assert "not implemented" in (codec.problem(sunspec, float(raw), raw) or "")


@pytest.mark.parametrize(
    "type_", ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
)
def test_garbage_is_caught_by_a_plausible_range(type_: str) -> None:
    for order in ORDERS:
        p = mp(type=type_, order=order, min=-1000, max=1000)
        value = codec.decode(p, codec.garbage(p))
        assert not isinstance(value, str)
        assert codec.problem(p, value) is not None, (type_, order, value)


def test_decode_rejects_wrong_register_count() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        codec.decode(mp(type="float32"), [1])


# --- SNMP ----------------------------------------------------------------------------------


def test_snmp_scale_digits_and_si_scale() -> None:
    apc = sp(type="integer", scale=10.0)  # rPDU2DeviceStatusPower: hundredths of kW
    assert codec.snmp_decode(apc, 613) == 6130.0
    assert codec.snmp_encode(apc, 6130.0) == 613
    raritan = sp(type="gauge32")
    assert codec.snmp_decode(raritan, 2345, digits=1) == pytest.approx(234.5)
    assert codec.snmp_encode(raritan, 234.5, digits=1) == 2345
    entity = sp(type="integer")
    # 123 with scale kilo (10) and precision 1: 12.3 kW
    assert codec.snmp_decode(entity, 123, digits=1, si_scale=10) == pytest.approx(12300.0)
    assert codec.snmp_encode(entity, 12300.0, digits=1, si_scale=10) == 123
    # negative precision multiplies (RFC 3433 allows -8..-1)
    assert codec.snmp_decode(entity, 5, digits=-2) == pytest.approx(500.0)


def test_snmp_text_numbers_and_bounds() -> None:
    text = sp(type="octetstring")
    assert codec.snmp_decode(text, b"12.5 ") == 12.5
    assert math.isnan(codec.snmp_decode(text, "n/a"))
    assert codec.snmp_encode(text, 230.25) == "230.25"
    assert codec.snmp_decode(text, codec.snmp_encode(text, 230.25, digits=2), digits=2) == 230.25
    assert codec.snmp_encode(sp(type="gauge32"), -5.0) == 0
    assert codec.snmp_encode(sp(type="integer"), 1.0e12) == 2**31 - 1
    g = sp(type="gauge32", max=1e6)
    assert codec.problem(g, codec.snmp_decode(g, codec.snmp_garbage(g))) is not None


# --- map validation ---------------------------------------------------------------------------


def base_map(points: dict[str, Any], protocol: str = "modbus") -> dict[str, Any]:
    return {"model": "m", "vendor": "v", "source": "test", "protocol": protocol, "points": points}


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({"x_a": {"address": 1, "type": "uint16", "writable": True}}, "needs min and max"),
        ({"x": {"address": 1, "type": "uint16", "colour": "red"}}, "points.x.colour"),
        ({"x": {"address": 1, "type": "bit"}}, "coil or discrete"),
        ({"x": {"address": 1, "table": "coil", "type": "uint16"}}, "must have type bit"),
        ({"x": {"address": 1, "type": "int16", "scale_point": "nope"}}, "not in this map"),
        ({"x": {"address": 65535, "type": "float32"}}, "past address 65535"),
        ({"x": {"address": 1, "type": "bitfield"}}, "needs bits"),
        ({"x": {"address": 1, "type": "uint16", "min": 5, "max": 1}}, "above max"),
        ({"X": {"address": 1}}, "lower_snake_case"),
        (
            {"x": {"table": "input", "address": 1, "writable": True, "min": 0, "max": 1}},
            "read-only",
        ),
    ],
)
def test_bad_modbus_maps_name_the_place(points: dict[str, Any], message: str) -> None:
    with pytest.raises(DeviceMapError) as e:
        parse_map(base_map(points), "bad.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("bad.yaml: ")


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({"p": {"oid": "1.3.6.1.2", "divisor_oid": "1.3.6.1.9"}}, "must be the OID of a point"),
        ({"p": {"oid": "1.3.6.1.2", "table": {"column": "1.3.6", "index": 1}}}, "exactly one"),
        ({"p": {"oid": "not-an-oid"}}, "points.p.oid"),
        (
            {"p": {"oid": "1.3.6.1.2"}, "q": {"table": {"column": "1.3.6.1", "index": 2}}},
            "share one OID",
        ),
    ],
)
def test_bad_snmp_maps_name_the_place(points: dict[str, Any], message: str) -> None:
    with pytest.raises(DeviceMapError) as e:
        parse_map(base_map(points, "snmp"), "bad.yaml")
    assert message in str(e.value)


def test_defaults_fill_points_and_table_index_becomes_text() -> None:
    m = parse_map(
        {
            **base_map({"a": {"address": 3, "type": "float32"}}),
            "defaults": {"table": "input", "order": "CDAB"},
        }
    )
    p = m.points["a"]
    assert isinstance(p, ModbusPoint)
    assert (p.table, p.order) == ("input", "CDAB")
    s = parse_map(base_map({"p": {"table": {"column": ".1.3.6.1.4", "index": 7}}}, "snmp"))
    point = s.points["p"]
    assert isinstance(point, SnmpPoint)
    assert point.full_oid == "1.3.6.1.4.7"
