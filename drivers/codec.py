"""Turning register words and SNMP values into engineering values, and back.

One data-type table (:mod:`drivers.datatypes`: ``MODBUS_TYPES``, ``SNMP_TYPES``) drives
all three jobs that must agree: the driver's decoding, the validation that flags garbage,
and the simulator's encoding. A map change therefore moves both ends of the wire together.

Conventions:

* A Modbus register is a 16-bit word sent high byte first. A value of N bytes is laid out
  in *canonical* (big-endian, ``ABCD``) order and then permuted by the point's order:
  ``ABCD`` as is, ``CDAB`` words reversed (low word first), ``BADC`` bytes swapped inside
  each word, ``DCBA`` fully little-endian. The same rule extends to 64-bit values.
* Engineering value = raw * scale * 10**sf + offset, where ``sf`` is the SunSpec-style
  scale-factor exponent read from the point named by ``scale_point`` (0 without one), and
  ``fixed`` types first divide the raw integer by ``2**fraction_bits`` (OCP ORv3).
* Validation never raises: :func:`problem` returns why a decoded value is garbage (NaN,
  infinity, outside [min, max], a "not implemented" marker) or None.
"""

from __future__ import annotations

import math
import struct

from drivers.datatypes import (
    ENTITY_SCALE_UNITS,
    MODBUS_TYPES,
    SNMP_TYPES,
    registers_of,
)
from drivers.devicemap import ModbusPoint, SnmpPoint


def register_count(point: ModbusPoint) -> int:
    """Registers (or bits, for coil/discrete tables) one point occupies."""
    return registers_of(point.type, point.length)


def _int_bounds(nbytes: int, signed: bool) -> tuple[int, int]:
    bits = 8 * nbytes
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def raw_bounds(point: ModbusPoint) -> tuple[int, int] | None:
    """Smallest and largest raw integer a point can carry (None for floats and strings)."""
    t = MODBUS_TYPES[point.type]
    if t.kind == "bit":
        return (0, 1)
    if t.kind in ("int", "bits"):
        return _int_bounds(2 * register_count(point), t.signed)
    if t.kind == "fixed":
        return _int_bounds(2 * register_count(point), point.signed)
    return None


# ---------------------------------------------------------------------------
# byte order


def _to_canonical(words: list[int], order: str) -> bytes:
    """Wire registers -> big-endian bytes of the value."""
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    data = b"".join(w.to_bytes(2, "big") for w in words)
    if order in ("BADC", "DCBA"):
        data = bytes(b for i in range(0, len(data), 2) for b in (data[i + 1], data[i]))
    return data


def _from_canonical(data: bytes, order: str) -> list[int]:
    """Big-endian bytes of the value -> wire registers (inverse of :func:`_to_canonical`)."""
    if order in ("BADC", "DCBA"):
        data = bytes(b for i in range(0, len(data), 2) for b in (data[i + 1], data[i]))
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    return words


# ---------------------------------------------------------------------------
# Modbus: raw <-> registers


def decode_raw(point: ModbusPoint, registers: list[int]) -> int | float | str:
    """The raw value as the device stores it (before scale, offset and fraction bits)."""
    n = register_count(point)
    if len(registers) != n:
        raise ValueError(
            f"{point.type} at {point.address} needs {n} registers, got {len(registers)}"
        )
    t = MODBUS_TYPES[point.type]
    if t.kind == "bit":
        return 1 if registers[0] else 0
    data = _to_canonical([r & 0xFFFF for r in registers], point.order)
    if t.kind == "string":
        return data.split(b"\x00", 1)[0].decode("latin-1").rstrip()
    if t.kind == "float":
        value: float = struct.unpack(">" + t.struct_code, data)[0]
        return value
    signed = point.signed if t.kind == "fixed" else t.signed
    return int.from_bytes(data, "big", signed=signed)


def encode_raw(point: ModbusPoint, raw: int | float | str) -> list[int]:
    """Registers (or one 0/1 bit) that carry ``raw``; integers saturate at the type's bounds."""
    t = MODBUS_TYPES[point.type]
    n = register_count(point)
    if t.kind == "bit":
        return [1 if raw else 0]
    if t.kind == "string":
        text = str(raw).encode("latin-1", "replace")[: 2 * n]
        data = text.ljust(2 * n, b"\x00")
    elif t.kind == "float":
        data = struct.pack(">" + t.struct_code, float(raw))
    else:
        lo, hi = raw_bounds(point) or (0, 0)
        if isinstance(raw, int):
            value = min(hi, max(lo, raw))
        else:
            number = float(raw)
            value = hi if math.isnan(number) else min(hi, max(lo, round(number)))
        data = value.to_bytes(2 * n, "big", signed=lo < 0)
    return _from_canonical(data, point.order)


# ---------------------------------------------------------------------------
# Modbus: engineering value <-> registers


def _factor(point: ModbusPoint, sf: int) -> float:
    factor = point.scale * (10.0**sf)
    if point.type == "fixed":
        factor /= float(1 << point.fraction_bits)
    return factor


def decode(point: ModbusPoint, registers: list[int], sf: int = 0) -> float | str:
    """Engineering value of a point; strings stay strings, NaN stays NaN (see :func:`problem`)."""
    raw = decode_raw(point, registers)
    if isinstance(raw, str):
        return raw
    return raw * _factor(point, sf) + point.offset


def encode(point: ModbusPoint, value: float | str, sf: int = 0) -> list[int]:
    """Registers a device would hold for ``value``: the simulator's side of :func:`decode`."""
    if isinstance(value, str):
        return encode_raw(point, value)
    factor = _factor(point, sf)
    if isinstance(value, int) and factor == 1.0 and point.offset == 0:
        return encode_raw(point, value)  # exact, even for 64-bit counters beyond 2**53
    return encode_raw(point, (value - point.offset) / factor)


def garbage(point: ModbusPoint) -> list[int]:
    """Registers a broken device typically sends: NaN for floats, all-ones for unsigned,
    the most negative value (SunSpec's "not implemented") for signed integers."""
    t = MODBUS_TYPES[point.type]
    n = register_count(point)
    if t.kind == "float":
        return encode_raw(point, math.nan)
    if (t.kind == "int" and t.signed) or (t.kind == "fixed" and point.signed):
        return _from_canonical(b"\x80" + b"\x00" * (2 * n - 1), point.order)
    return [1] if t.kind == "bit" else [0xFFFF] * n


def problem(point: ModbusPoint | SnmpPoint, value: float | str, raw: object = None) -> str | None:
    """Why a decoded value cannot be trusted, or None. The reason ends up in Reading.error."""
    if isinstance(value, str):
        return None
    if raw is not None and raw in point.not_implemented:
        return f"raw value {raw!r} means 'not implemented'"
    if math.isnan(value) or math.isinf(value):
        return f"value is {value}"
    if point.min is not None and value < point.min:
        return f"value {value:g} below min {point.min:g}"
    if point.max is not None and value > point.max:
        return f"value {value:g} above max {point.max:g}"
    return None


def active_bits(point: ModbusPoint, value: float) -> list[str]:
    """Names of the set bits of a bitfield (alarm words), for alarms and display."""
    raw = int(value)
    return [name for bit, name in sorted(point.bits.items()) if raw >> bit & 1]


# ---------------------------------------------------------------------------
# SNMP


def snmp_factor(point: SnmpPoint, digits: int = 0, si_scale: int = ENTITY_SCALE_UNITS) -> float:
    """Multiplier from the raw SNMP number to the engineering value.

    ``digits`` is the decimal-digits value read from ``divisor_oid`` (Raritan
    decimalDigits, ENTITY-SENSOR precision): raw / 10**digits. ``si_scale`` is an
    EntitySensorDataScale read from ``si_scale_oid``: raw * 10**(3*(si_scale-9)).
    """
    return point.scale * 10.0 ** (3 * (si_scale - ENTITY_SCALE_UNITS) - digits)


def snmp_decode(
    point: SnmpPoint,
    raw: int | float | str | bytes,
    digits: int = 0,
    si_scale: int = ENTITY_SCALE_UNITS,
) -> float:
    """Engineering value of an SNMP varbind value; unparsable text decodes to NaN."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if isinstance(raw, str):
        try:
            number = float(raw.strip())
        except ValueError:
            return math.nan
    else:
        number = float(raw)
    return number * snmp_factor(point, digits, si_scale) + point.offset


def snmp_encode(
    point: SnmpPoint, value: float, digits: int = 0, si_scale: int = ENTITY_SCALE_UNITS
) -> int | str:
    """Raw SNMP value an agent serves for ``value``; integers saturate at the type's bounds."""
    t = SNMP_TYPES[point.type]
    raw = (value - point.offset) / snmp_factor(point, digits, si_scale)
    if t.text:
        return f"{raw:.12g}"
    assert t.lo is not None and t.hi is not None
    if math.isnan(raw):
        return t.hi
    return min(t.hi, max(t.lo, round(raw)))


def snmp_garbage(point: SnmpPoint) -> int | str:
    """What a broken agent typically serves: all-ones / the type's maximum, or text junk."""
    t = SNMP_TYPES[point.type]
    return "nan" if t.text else int(t.hi or 0)
