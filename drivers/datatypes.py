"""The data-type table: how each Modbus type sits in registers, each SNMP syntax's bounds.

One table drives the driver's decoding (:mod:`drivers.codec`), the device-map validation
(:mod:`drivers.devicemap`) and the simulator's encoding, so they cannot disagree. It has
no dependency on the point models, which is what lets the maps validate against it while
the codec reads the maps' points: no import circle between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["int", "float", "string", "bits", "fixed", "bit"]


@dataclass(frozen=True)
class ModbusType:
    """How one Modbus data type sits in registers.

    ``registers`` is None when the width comes from the point (``length``): strings,
    bitfields (16 or 32 bits) and fixed-point values (one, two or four registers).
    """

    name: str
    kind: Kind
    registers: int | None
    signed: bool = False
    struct_code: str = ""


MODBUS_TYPES: dict[str, ModbusType] = {
    t.name: t
    for t in (
        ModbusType("int16", "int", 1, True, "h"),
        ModbusType("uint16", "int", 1, False, "H"),
        ModbusType("int32", "int", 2, True, "i"),
        ModbusType("uint32", "int", 2, False, "I"),
        ModbusType("int64", "int", 4, True, "q"),
        ModbusType("uint64", "int", 4, False, "Q"),
        ModbusType("float32", "float", 2, True, "f"),
        ModbusType("float64", "float", 4, True, "d"),
        ModbusType("string", "string", None),
        ModbusType("bitfield", "bits", None),
        ModbusType("fixed", "fixed", None),
        ModbusType("bit", "bit", 1),
    )
}

BIT_TABLES = frozenset({"coil", "discrete"})
REGISTER_TABLES = frozenset({"holding", "input"})
WORD_ORDERS = ("ABCD", "DCBA", "BADC", "CDAB")


def registers_of(type_name: str, length: int) -> int:
    """Registers (or bits, for coil/discrete tables) a point of this type occupies;
    ``length`` counts for the types whose width comes from the point."""
    registers = MODBUS_TYPES[type_name].registers
    return length if registers is None else registers


# ---------------------------------------------------------------------------
# SNMP


@dataclass(frozen=True)
class SnmpType:
    """An SNMP syntax as a map names it; bounds are those of the ASN.1 type."""

    name: str
    lo: int | None
    hi: int | None
    text: bool = False


SNMP_TYPES: dict[str, SnmpType] = {
    t.name: t
    for t in (
        SnmpType("integer", -(1 << 31), (1 << 31) - 1),
        SnmpType("gauge32", 0, (1 << 32) - 1),
        SnmpType("counter32", 0, (1 << 32) - 1),
        SnmpType("counter64", 0, (1 << 64) - 1),
        SnmpType("octetstring", None, None, text=True),
    )
}

# ENTITY-SENSOR-MIB EntitySensorDataScale: yocto(1) .. units(9) .. yotta(17), steps of 10**3.
ENTITY_SCALE_UNITS = 9
