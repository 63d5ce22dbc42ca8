"""Modbus/TCP driver (pymodbus 3.x): generic over device maps, one connection per endpoint.

Why it looks like this:

* One client per ``host:port`` (+TLS): units behind a gateway share it, because a gateway
  serves one TCP connection better than many, and pymodbus serialises requests per client
  anyway. Reconnects are ours (jittered backoff in the poll loop), not pymodbus's, so a
  rebooted gateway is not hit by every unit at once; a silent unit must not make pymodbus
  drop the link the other units use, so its "no response -> disconnect" counter is raised.
* Points are read in merged blocks (<= 125 registers, holes up to ``max_hole`` filled),
  planned once per map: fewer round trips is most of a poll's cost.
* An exception response fails only the points of that block, with the exception's name.
* Writes go only to points the map marks writable, and only inside [min, max].
* A device's answer is checked, not trusted: the function code must be the one asked
  for and the count complete (a register answer to a coil read must not reach the
  decoder), else :class:`~drivers.base.MalformedResponse`.
* pymodbus logs every dropped frame at ERROR level with a hex dump of the last 20 frames,
  so one garbage device floods the journal. Unless the process logs at DEBUG, its logger
  is raised to CRITICAL (:func:`quiet_pymodbus_logs`): the driver raises its own errors,
  which the poll loop counts per device and kind and logs rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers import codec
from drivers.base import (
    DeviceParams,
    DeviceTimeout,
    DeviceUnreachable,
    DriverError,
    MalformedResponse,
    PointKey,
    WriteRejected,
    bool_option,
    failed_readings,
    int_option,
    now_pair,
)
from drivers.datatypes import BIT_TABLES
from drivers.devicemap import ModbusMap, ModbusPoint, load_modbus_map
from drivers.reading import Quality, Reading

log = logging.getLogger(__name__)

MAX_REGISTERS = 125  # FC3/FC4 limit per request
MAX_BITS = 2000  # FC1/FC2 limit per request
DEFAULT_PORT = 502
DEFAULT_TLS_PORT = 802

# The function code a read of each table is sent with (and must be answered with).
READ_FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusExceptionResponse(DriverError):
    """The device answered with a Modbus exception PDU."""

    kind = "exception"

    def __init__(self, code: int, what: str) -> None:
        self.code = code
        name = EXCEPTION_NAMES.get(code, "unknown")
        super().__init__(f"Modbus exception 0x{code:02X} ({name}) on {what}")


# ---------------------------------------------------------------------------
# Block planning


@dataclass(frozen=True)
class Block:
    """One read request: a table, a start address and a count covering some points."""

    table: str
    start: int
    count: int
    points: tuple[str, ...]


def plan_blocks(
    points: Mapping[str, ModbusPoint],
    max_hole: int = 8,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
) -> list[Block]:
    """Merge points into as few reads as possible without reading more than ``max_hole``
    unused registers between two points (holes may be undefined on the device: 0x02)."""
    blocks: list[Block] = []
    by_table: dict[str, list[tuple[int, int, str]]] = {}
    for name, p in points.items():
        by_table.setdefault(p.table, []).append((p.address, p.address + p.registers, name))
    for table, spans in sorted(by_table.items()):
        limit = max_bits if table in BIT_TABLES else max_registers
        spans.sort()
        start, end, names = spans[0][0], spans[0][1], [spans[0][2]]
        for a, b, name in spans[1:]:
            if a - end <= max_hole and max(end, b) - start <= limit:
                end = max(end, b)
                names.append(name)
            else:
                blocks.append(Block(table, start, end - start, tuple(names)))
                start, end, names = a, b, [name]
        blocks.append(Block(table, start, end - start, tuple(names)))
    return blocks


# ---------------------------------------------------------------------------
# Connection (shared by the units behind one endpoint)


def _is_timeout(e: ModbusException) -> bool:
    return isinstance(e, ModbusIOException) and "No response" in str(e)


def _failure(e: ModbusException, what: str, endpoint: str) -> DriverError:
    """Our error for what pymodbus raised: a timeout, a reply it could not use, or else."""
    if _is_timeout(e):
        return DeviceTimeout(f"no response from {what} at {endpoint}")
    if isinstance(e, ModbusIOException):  # undecodable, wrong unit or transaction id
        return MalformedResponse(f"{what} at {endpoint}: {e}")
    return DriverError(f"{what}: {e}")


def _fail_fast_on_undecodable(client: AsyncModbusTcpClient) -> None:
    """Make a frame pymodbus cannot decode fail the request waiting for it.

    pymodbus raises ``ModbusIOException("Unable to decode ...")`` out of its protocol's
    ``data_received``: asyncio then logs a traceback at ERROR and drops the connection,
    and the request waits out its timeout as if the device were silent. Caught here, the
    bad bytes are discarded, the waiting request fails at once with the reason (ours as
    MalformedResponse) and the connection stays up for the next one.
    """
    ctx: Any = client.ctx
    original = ctx.callback_data

    def callback_data(data: bytes, addr: tuple[str, int] | None = None) -> int:
        try:
            return int(original(data, addr))
        except ModbusIOException as e:
            future = getattr(ctx, "response_future", None)
            if future is not None and not future.done():
                future.set_exception(e)
            return len(data)

    ctx.callback_data = callback_data


def quiet_pymodbus_logs() -> None:
    """pymodbus's logger to CRITICAL unless the root logger is at DEBUG (see the module
    docstring: its ERROR lines carry hex frame dumps, one per bad frame)."""
    pymodbus_log = logging.getLogger("pymodbus")
    if pymodbus_log.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        pymodbus_log.setLevel(logging.CRITICAL)


class ModbusConnection:
    """One pymodbus client for one endpoint, shared by all units behind it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float,
        retries: int = 1,
        sslctx: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.retries = retries
        self.sslctx = sslctx
        self._client: AsyncModbusTcpClient | None = None
        self._connect_lock = asyncio.Lock()
        # Held for a whole device poll: units behind a gateway take turns, and each unit's
        # timeout starts when its turn does.
        self.link = asyncio.Lock()
        self.users = 0

    @property
    def endpoint(self) -> str:
        return f"{'tls' if self.sslctx else 'tcp'}://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def ensure_connected(self) -> None:
        async with self._connect_lock:
            if self.connected:
                return
            self._drop()
            per_try_s = max(0.05, self.timeout_s / (self.retries + 1))
            client: AsyncModbusTcpClient
            if self.sslctx is not None:
                client = AsyncModbusTlsClient(
                    self.host,
                    port=self.port,
                    sslctx=self.sslctx,
                    timeout=per_try_s,
                    retries=self.retries,
                    reconnect_delay=0,
                )
            else:
                client = AsyncModbusTcpClient(
                    self.host,
                    port=self.port,
                    timeout=per_try_s,
                    retries=self.retries,
                    reconnect_delay=0,
                )
            # A silent unit behind a gateway must not close the link the others share.
            client.set_max_no_responses(1_000_000)
            _fail_fast_on_undecodable(client)
            if not await client.connect():
                client.close()
                raise DeviceUnreachable(f"cannot connect to {self.endpoint}")
            self._client = client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        self._drop()

    def _require(self) -> AsyncModbusTcpClient:
        if not self.connected or self._client is None:
            raise DeviceUnreachable(f"not connected to {self.endpoint}")
        return self._client

    async def read(self, table: str, start: int, count: int, unit: int) -> tuple[list[int], int]:
        """Registers (or 0/1 bits) and the retries pymodbus needed."""
        c = self._require()
        what = f"{table} {start}+{count} unit {unit}"
        try:
            if table == "holding":
                rr = await c.read_holding_registers(start, count=count, device_id=unit)
            elif table == "input":
                rr = await c.read_input_registers(start, count=count, device_id=unit)
            elif table == "coil":
                rr = await c.read_coils(start, count=count, device_id=unit)
            else:
                rr = await c.read_discrete_inputs(start, count=count, device_id=unit)
        except ConnectionException as e:
            self._drop()
            raise DeviceUnreachable(f"{self.endpoint}: {e}") from e
        except ModbusException as e:
            raise _failure(e, what, self.endpoint) from e
        if rr.isError():
            raise ModbusExceptionResponse(int(rr.exception_code), what)
        asked = READ_FUNCTIONS[table]
        if rr.function_code != asked:
            raise MalformedResponse(
                f"{what}: answered with function {rr.function_code}, asked {asked}"
            )
        retries = int(getattr(rr, "retries", 0) or 0)
        if table in BIT_TABLES:
            if len(rr.bits) < count:
                raise MalformedResponse(f"{what}: asked for {count} bits, got {len(rr.bits)}")
            return [1 if b else 0 for b in rr.bits[:count]], retries
        regs = list(rr.registers)
        if len(regs) != count:
            raise MalformedResponse(f"{what}: asked for {count} registers, got {len(regs)}")
        return regs, retries

    async def write(self, table: str, address: int, values: list[int], unit: int) -> None:
        c = self._require()
        what = f"write {table} {address} unit {unit}"
        try:
            if table == "coil":
                rr = await c.write_coil(address, bool(values[0]), device_id=unit)
            elif len(values) == 1:
                rr = await c.write_register(address, values[0], device_id=unit)
            else:
                rr = await c.write_registers(address, values, device_id=unit)
        except ConnectionException as e:
            self._drop()
            raise DeviceUnreachable(f"{self.endpoint}: {e}") from e
        except ModbusException as e:
            raise _failure(e, what, self.endpoint) from e
        if rr.isError():
            raise ModbusExceptionResponse(int(rr.exception_code), what)


# ---------------------------------------------------------------------------
# Device


class ModbusDevice:
    """One unit id on one connection, read through its device map.

    Implements ``Pollable``, ``PointReader``, ``PowerReader`` and ``PointWriter`` of
    :mod:`drivers.base`. String points (identity) are not polled; see :meth:`read_strings`.
    """

    times_itself = True  # see drivers.base.Pollable: queueing for the link is not a timeout

    def __init__(
        self,
        device_id: str,
        conn: ModbusConnection,
        dmap: ModbusMap,
        unit_id: int = 1,
        *,
        timeout_s: float = 0.5,
        max_hole: int = 8,
        power_point: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.timeout_s = timeout_s
        self.conn = conn
        self.map = dmap
        self.unit_id = unit_id
        self.numeric = dmap.numeric_points()
        self.blocks = plan_blocks(self.numeric, max_hole=max_hole)
        self.power_point = power_point or next(
            (p for p in ("power_w", "output_power_w", "input_power_w") if p in self.numeric), None
        )
        self.last_retries = 0
        self._keys = [PointKey(device_id, n, p.unit) for n, p in self.numeric.items()]
        self._users_counted = False

    @property
    def name(self) -> str:
        return self.device_id

    def point_keys(self) -> Sequence[PointKey]:
        return self._keys

    async def connect(self) -> None:
        if not self._users_counted:
            self.conn.users += 1
            self._users_counted = True
        await self.conn.ensure_connected()

    async def close(self) -> None:
        # The connection is shared: only the last unit using it closes it.
        if self._users_counted:
            self._users_counted = False
            self.conn.users -= 1
            if self.conn.users <= 0:
                self.conn.close()

    async def _read_blocks(
        self, blocks: Sequence[Block]
    ) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Raw registers per point, and an error per point whose block failed."""
        async with self.conn.link:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._read_blocks_now(blocks)
            except TimeoutError as e:
                raise DeviceTimeout(
                    f"no complete answer within {self.timeout_s:g} s from unit {self.unit_id} "
                    f"at {self.conn.endpoint}"
                ) from e

    async def _read_blocks_now(
        self, blocks: Sequence[Block]
    ) -> tuple[dict[str, list[int]], dict[str, str]]:
        raw: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        retries = 0
        for b in blocks:
            try:
                regs, r = await self.conn.read(b.table, b.start, b.count, self.unit_id)
            except ModbusExceptionResponse as e:
                for n in b.points:
                    errors[n] = str(e)
                continue
            retries += r
            for n in b.points:
                p = self.map.points[n]
                off = p.address - b.start
                raw[n] = regs[off : off + p.registers]
        self.last_retries = retries
        return raw, errors

    def _decode(
        self, names: Sequence[str], raw: Mapping[str, list[int]], errors: Mapping[str, str]
    ) -> list[Reading]:
        ts, wall = now_pair()
        out: list[Reading] = []
        for n in names:
            p = self.map.points[n]
            if n in errors:
                out.append(
                    Reading(self.device_id, n, math.nan, p.unit, ts, wall, Quality.ERROR, errors[n])
                )
                continue
            sf, sf_problem = self._scale_factor(p, raw, errors)
            value_raw = codec.decode_raw(p, raw[n])
            value = codec.decode(p, raw[n], sf)
            assert not isinstance(value, str)
            problem = sf_problem or codec.problem(p, value, value_raw)
            out.append(
                Reading(
                    self.device_id,
                    n,
                    float(value),
                    p.unit,
                    ts,
                    wall,
                    Quality.BAD if problem else Quality.GOOD,
                    problem,
                )
            )
        return out

    def _scale_factor(
        self, p: ModbusPoint, raw: Mapping[str, list[int]], errors: Mapping[str, str]
    ) -> tuple[int, str | None]:
        if p.scale_point is None:
            return 0, None
        if p.scale_point in errors or p.scale_point not in raw:
            return 0, f"scale factor {p.scale_point} unavailable"
        sp = self.map.points[p.scale_point]
        sf_raw = codec.decode_raw(sp, raw[p.scale_point])
        assert isinstance(sf_raw, int)
        why = codec.problem(sp, float(sf_raw), sf_raw)
        return (sf_raw, None) if why is None else (0, f"scale factor {p.scale_point}: {why}")

    async def read(self) -> Sequence[Reading]:
        raw, errors = await self._read_blocks(self.blocks)
        if errors and len(errors) == len(self.numeric):
            # Every block answered with an exception: the device as a whole failed.
            return failed_readings(self._keys, next(iter(errors.values())))
        return self._decode(list(self.numeric), raw, errors)

    async def read_point(self, point: str) -> Reading:
        p = self._point(point)
        names = [point] + ([p.scale_point] if p.scale_point else [])
        blocks = plan_blocks({n: self.map.points[n] for n in names})
        raw, errors = await self._read_blocks(blocks)
        return self._decode([point], raw, errors)[0]

    async def read_power_w(self) -> Reading:
        if self.power_point is None:
            raise DriverError(f"{self.device_id}: map {self.map.model} has no power point")
        return await self.read_point(self.power_point)

    async def read_strings(self) -> dict[str, str]:
        """Identity strings (model, serial, firmware): read on demand, not polled."""
        out: dict[str, str] = {}
        for n, p in self.map.points.items():
            if p.type == "string":
                async with self.conn.link, asyncio.timeout(self.timeout_s):
                    regs, _ = await self.conn.read(p.table, p.address, p.registers, self.unit_id)
                out[n] = str(codec.decode(p, regs))
        return out

    def _point(self, point: str) -> ModbusPoint:
        p = self.map.points.get(point)
        if p is None:
            raise WriteRejected(f"{self.device_id}: map {self.map.model} has no point {point!r}")
        return p

    async def write_point(self, point: str, value: float) -> None:
        p = self._point(point)
        if not p.writable:
            raise WriteRejected(f"{self.device_id}: point {point} is not writable")
        assert p.min is not None and p.max is not None  # the map requires them when writable
        if math.isnan(value) or not p.min <= value <= p.max:
            raise WriteRejected(
                f"{self.device_id}: {point} = {value:g} outside [{p.min:g}, {p.max:g}]"
            )
        sf = 0
        if p.scale_point:
            sf_reading = await self.read_point(p.scale_point)
            if sf_reading.quality is not Quality.GOOD:
                raise DriverError(f"{self.device_id}: cannot read scale factor for {point}")
            sf = int(sf_reading.value)
        words = codec.encode(p, value, sf)
        async with self.conn.link, asyncio.timeout(self.timeout_s):
            await self.conn.write(p.table, p.address, words, self.unit_id)


# ---------------------------------------------------------------------------
# Building devices from parameters


def make_sslctx(options: Mapping[str, object]) -> ssl.SSLContext:
    """Client TLS context: CA from ``tls_cafile`` (else system CAs); mTLS with
    ``tls_certfile``/``tls_keyfile``."""
    cafile = options.get("tls_cafile")
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    cert, key = options.get("tls_certfile"), options.get("tls_keyfile")
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    if options.get("tls_check_hostname") is False:
        ctx.check_hostname = False
    return ctx


def _opt_int(options: Mapping[str, object], key: str, default: int) -> int:
    v = options.get(key, default)
    return int(v) if isinstance(v, int | float | str) else default


@dataclass(frozen=True)
class ModbusOptions:
    """The Modbus knobs in :attr:`DeviceParams.options`: ``unit_id`` (1), ``tls`` (false),
    ``retries`` (1), ``max_hole`` (8), ``power_point``; ``tls_cafile``, ``tls_certfile`` and
    ``tls_keyfile`` are read by :func:`make_sslctx`."""

    unit_id: int = 1
    tls: bool = False
    retries: int = 1
    max_hole: int = 8
    power_point: str | None = None

    @classmethod
    def of(cls, params: DeviceParams) -> ModbusOptions:
        opts = params.options
        power_point = opts.get("power_point")
        return cls(
            unit_id=int_option(params, "unit_id", 1),
            tls=bool_option(params, "tls", False),
            retries=_opt_int(opts, "retries", 1),
            max_hole=_opt_int(opts, "max_hole", 8),
            power_point=str(power_point) if power_point else None,
        )


def build_modbus_devices(
    devices: Sequence[DeviceParams], maps: Mapping[str, ModbusMap] | None = None
) -> list[ModbusDevice]:
    """Devices sharing host:port(+TLS) share one connection (a gateway with unit ids)."""
    quiet_pymodbus_logs()
    conns: dict[tuple[str, int, bool], ModbusConnection] = {}
    out: list[ModbusDevice] = []
    for d in devices:
        if d.map_name is None:
            raise ValueError(f"{d.device_id}: a modbus device needs a map")
        dmap = (maps or {}).get(d.map_name) or load_modbus_map(d.map_name)
        o = ModbusOptions.of(d)
        port = d.port or (DEFAULT_TLS_PORT if o.tls else DEFAULT_PORT)
        key = (d.host, port, o.tls)
        conn = conns.get(key)
        if conn is None:
            conn = ModbusConnection(
                d.host,
                port,
                timeout_s=d.timeout_s,
                retries=o.retries,
                sslctx=make_sslctx(d.options) if o.tls else None,
            )
            conns[key] = conn
        conn.timeout_s = min(conn.timeout_s, d.timeout_s)
        out.append(
            ModbusDevice(
                d.device_id,
                conn,
                dmap,
                o.unit_id,
                timeout_s=d.timeout_s,
                max_hole=o.max_hole,
                power_point=o.power_point,
            )
        )
    return out
