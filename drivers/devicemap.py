"""Device maps: a device model is data (a YAML file), never code.

``configs/devices/<vendor>-<model>.yaml`` lists a model's points: Modbus registers or SNMP
OIDs with their type, order, scale and unit. The generic driver of the protocol polls them
and the simulator serves them through the same file, so one edit keeps both in step. The
data types themselves live in :mod:`drivers.datatypes` (one table for decode, validate, encode).

Maps are loaded by name (the file stem) from the directories in ``RACKPOWER_DEVICE_MAPS``
(``os.pathsep``-separated: a site's own maps, so it needs no change to the package) and
then the shipped ``configs/devices`` (found through :mod:`drivers.shipped`, the same in a
checkout and an installed wheel). Errors name the file, the path inside it and what was
expected, like the site config's; a map that is found nowhere lists every place looked.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.datatypes import BIT_TABLES, MODBUS_TYPES, registers_of
from drivers.shipped import device_maps_dir

OID_RE = r"^\.?[0-9]+(\.[0-9]+)+$"
POINT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_MAP_DIR = device_maps_dir()
MAPS_ENV = "RACKPOWER_DEVICE_MAPS"

Table = Literal["holding", "input", "coil", "discrete"]
WordOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]
ModbusTypeName = Literal[
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
    "bitfield",
    "fixed",
    "bit",
]
SnmpTypeName = Literal["integer", "gauge32", "counter32", "counter64", "octetstring"]
Oid = Annotated[str, Field(pattern=OID_RE)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _PointBase(_Strict):
    """What every point has, whatever the protocol."""

    unit: str = ""
    scale: float = 1.0
    offset: float = 0.0
    min: float | None = None  # a decoded value outside [min, max] (or NaN) is BAD quality
    max: float | None = None
    writable: bool = False  # writes only to points marked so, and only inside [min, max]
    description: str = ""
    # Raw values the device uses for "not implemented / not available" (SunSpec 0x8000...).
    not_implemented: tuple[int, ...] = ()
    # What the simulator serves when its source has no value: device constants such as
    # decimal digits or SunSpec scale factors, which a plant knows nothing about.
    sim_value: float | None = None

    @model_validator(mode="after")
    def _range(self) -> _PointBase:
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        if self.writable and (self.min is None or self.max is None):
            raise ValueError("a writable point needs min and max (writes are range-checked)")
        return self


class ModbusPoint(_PointBase):
    """One register value (or coil bit). Value = raw * scale * 10**sf + offset."""

    table: Table = "holding"
    address: Annotated[int, Field(ge=0, le=65535)]
    type: ModbusTypeName = "uint16"
    order: WordOrder = "ABCD"
    length: Annotated[int, Field(ge=1, le=125)] = 1  # registers: string, fixed, bitfield
    fraction_bits: Annotated[int, Field(ge=0, le=62)] = 0  # fixed: raw / 2**fraction_bits
    signed: bool = False  # fixed: two's complement raw
    bits: dict[int, str] = Field(default_factory=dict)  # bitfield: bit number -> alarm name
    enum: dict[int, str] = Field(default_factory=dict)  # integer states -> names
    scale_point: str | None = None  # SunSpec: name of the int16 point holding the exponent

    @model_validator(mode="after")
    def _shape(self) -> ModbusPoint:
        if self.table in BIT_TABLES and self.type != "bit":
            raise ValueError(f"points in the {self.table} table must have type bit")
        if self.type == "bit" and self.table not in BIT_TABLES:
            raise ValueError("type bit belongs in the coil or discrete table")
        if self.type == "fixed" and self.length not in (1, 2, 4):
            raise ValueError("a fixed-point value is 1, 2 or 4 registers long")
        if self.type == "bitfield" and self.length not in (1, 2):
            raise ValueError("a bitfield is 1 or 2 registers long (16 or 32 bits)")
        if self.type not in ("fixed", "string", "bitfield") and self.length != 1:
            raise ValueError(f"length applies to string, bitfield and fixed, not {self.type}")
        if self.type == "bitfield" and not self.bits:
            raise ValueError("a bitfield needs bits: {bit number: name}")
        if any(not 0 <= b < 16 * self.length for b in self.bits):
            raise ValueError(f"bit numbers are 0-{16 * self.length - 1}")
        if self.writable and self.table not in ("holding", "coil"):
            raise ValueError(f"the {self.table} table is read-only; writable needs holding/coil")
        if self.address + registers_of(self.type, self.length) > 65536:
            raise ValueError("the point runs past address 65535")
        return self

    @property
    def registers(self) -> int:
        return registers_of(self.type, self.length)

    @property
    def numeric(self) -> bool:
        return self.type != "string"

    @property
    def kind(self) -> str:
        return MODBUS_TYPES[self.type].kind


class SnmpTableRef(_Strict):
    """A cell of a conceptual table: the column's OID plus the row index suffix."""

    column: Oid
    index: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$")]


class SnmpPoint(_PointBase):
    """One scalar or table cell. Value = raw * scale * 10**(3*(si-9) - digits) + offset."""

    oid: Oid | None = None
    table: SnmpTableRef | None = None
    type: SnmpTypeName = "integer"
    divisor_oid: Oid | None = None  # decimal digits (Raritan): value / 10**digits
    si_scale_oid: Oid | None = None  # ENTITY-SENSOR EntitySensorDataScale (units = 9)

    @model_validator(mode="before")
    @classmethod
    def _index_as_text(cls, data: Any) -> Any:
        # YAML reads ``index: 1`` as an int; an index is an OID suffix, so keep it text.
        if isinstance(data, dict) and isinstance(data.get("table"), dict):
            t = dict(data["table"])
            if isinstance(t.get("index"), int):
                t["index"] = str(t["index"])
            data = {**data, "table": t}
        return data

    @model_validator(mode="after")
    def _where(self) -> SnmpPoint:
        if (self.oid is None) == (self.table is None):
            raise ValueError("give exactly one of oid or table: {column, index}")
        return self

    @property
    def full_oid(self) -> str:
        """The instance OID to GET, without a leading dot."""
        if self.table is not None:
            return f"{self.table.column.lstrip('.')}.{self.table.index}"
        assert self.oid is not None
        return self.oid.lstrip(".")

    @property
    def numeric(self) -> bool:
        return True


class _MapBase(_Strict):
    model: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    description: str = ""
    source: str = Field(min_length=1)  # where the register/OID map comes from

    def point_names(self) -> list[str]:
        return list(getattr(self, "points", {}))


def _check_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not POINT_NAME_RE.match(n)]
    if bad:
        raise ValueError(f"point names must be lower_snake_case: {bad}")


class ModbusDefaults(_Strict):
    table: Table = "holding"
    order: WordOrder = "ABCD"


class ModbusMap(_MapBase):
    protocol: Literal["modbus"]
    defaults: ModbusDefaults = ModbusDefaults()
    points: dict[str, ModbusPoint] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        # Defaults fill each point before it is validated, so a resolved point is complete.
        if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
            return data
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            return data
        points = {}
        for name, p in data["points"].items():
            if isinstance(p, dict):
                p = {k: v for k, v in defaults.items() if k in ("table", "order")} | p
            points[name] = p
        return {**data, "points": points}

    @model_validator(mode="after")
    def _references(self) -> ModbusMap:
        _check_names(list(self.points))
        for name, p in self.points.items():
            if p.scale_point is None:
                continue
            ref = self.points.get(p.scale_point)
            if ref is None:
                raise ValueError(f"{name}: scale_point {p.scale_point!r} is not in this map")
            if ref.type not in ("int16", "uint16") or ref.scale_point is not None:
                raise ValueError(f"{name}: scale_point {p.scale_point!r} must be a plain int16")
        return self

    def numeric_points(self) -> dict[str, ModbusPoint]:
        return {n: p for n, p in self.points.items() if p.numeric}


class SnmpMap(_MapBase):
    protocol: Literal["snmp"]
    points: dict[str, SnmpPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> SnmpMap:
        _check_names(list(self.points))
        by_oid = self.by_oid()
        if len(by_oid) != len(self.points):
            raise ValueError("two points share one OID")
        for name, p in self.points.items():
            for field in ("divisor_oid", "si_scale_oid"):
                ref = getattr(p, field)
                if ref is not None and ref.lstrip(".") not in by_oid:
                    raise ValueError(
                        f"{name}: {field} {ref} must be the OID of a point of this map "
                        "(so the simulator knows what to serve there)"
                    )
        return self

    def by_oid(self) -> dict[str, str]:
        """Instance OID (no leading dot) -> point name."""
        return {p.full_oid: n for n, p in self.points.items()}

    def numeric_points(self) -> dict[str, SnmpPoint]:
        return dict(self.points)


DeviceMap = Annotated[ModbusMap | SnmpMap, Field(discriminator="protocol")]


class _MapFile(BaseModel):
    map: DeviceMap


class DeviceMapError(Exception):
    """A map that cannot be used. ``str()`` gives one ``file: path: message`` line per problem."""

    def __init__(self, source: str, lines: Sequence[str]) -> None:
        self.source = source
        self.lines = tuple(lines)
        super().__init__("\n".join(f"{source}: {line}" for line in self.lines))


def _loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out


def parse_map(data: object, source: str = "<map>") -> ModbusMap | SnmpMap:
    """Validate an already-parsed YAML document as a device map."""
    if not isinstance(data, dict):
        raise DeviceMapError(source, ["the file must be a mapping (key: value) at top"])
    try:
        return _MapFile.model_validate({"map": data}).map
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [p for p in err["loc"][1:] if p not in ("modbus", "snmp")]
            lines.append(f"{_loc(loc) or '(top)'}: {err['msg']}")
        raise DeviceMapError(source, lines) from None


def site_map_dirs() -> list[Path]:
    """The site's own map directories from ``RACKPOWER_DEVICE_MAPS``, in order.

    Read on every lookup (not at import) so a reload sees the daemon's environment as it
    is; relative entries are made absolute against the working directory, so an error
    says exactly which directory was meant."""
    extra = os.environ.get(MAPS_ENV, "")
    return [Path(p).absolute() for p in extra.split(os.pathsep) if p]


def map_dirs() -> list[Path]:
    """Where maps are looked up, first match wins: the site's own, then the shipped ones."""
    return [*site_map_dirs(), DEFAULT_MAP_DIR]


def _looked_in() -> str:
    where = []
    for d in site_map_dirs():
        missing = "" if d.is_dir() else ", no such directory"
        where.append(f"{d} ({MAPS_ENV}{missing})")
    where.append(f"{DEFAULT_MAP_DIR} (shipped)")
    if not site_map_dirs():
        where.append(f"{MAPS_ENV} is not set")
    return "; ".join(where)


def map_path(name: str) -> Path:
    """The file a map name refers to (first match in :func:`map_dirs`)."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise DeviceMapError(name, [f"not a valid map name: {name!r}"])
    for d in map_dirs():
        for suffix in (".yaml", ".yml"):
            p = d / f"{name}{suffix}"
            if p.is_file():
                return p
    raise DeviceMapError(
        name, [f"no device map named {name!r} (.yaml or .yml); looked in: {_looked_in()}"]
    )


def load_map_file(path: Path) -> ModbusMap | SnmpMap:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DeviceMapError(str(path), [f"not valid YAML: {e}"]) from None
    return parse_map(data, str(path))


@functools.lru_cache(maxsize=256)
def _load_cached(path: Path, mtime_ns: int) -> ModbusMap | SnmpMap:
    return load_map_file(path)


def load_map(name: str) -> ModbusMap | SnmpMap:
    """Load a map by name; cached per file version, so call it freely."""
    path = map_path(name)
    return _load_cached(path, path.stat().st_mtime_ns)


def load_modbus_map(name: str) -> ModbusMap:
    m = load_map(name)
    if not isinstance(m, ModbusMap):
        raise DeviceMapError(name, [f"map {name!r} is {m.protocol}, not modbus"])
    return m


def load_snmp_map(name: str) -> SnmpMap:
    m = load_map(name)
    if not isinstance(m, SnmpMap):
        raise DeviceMapError(name, [f"map {name!r} is {m.protocol}, not snmp"])
    return m


def available_maps() -> Iterator[tuple[str, Path]]:
    """(name, path) of every map file, earlier directories shadowing later ones."""
    seen: set[str] = set()
    for d in map_dirs():
        if not d.is_dir():
            continue
        for p in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            if p.stem not in seen:
                seen.add(p.stem)
                yield p.stem, p
