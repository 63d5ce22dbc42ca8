"""Modbus/TCP frontend of the simulator: serves devices through their device maps.

Every read is answered live: pymodbus calls our action before it builds the reply, and the
action encodes the source's current values with the same codec the driver decodes with.
Devices are served one port each, or several behind one port with unit ids (a gateway),
as the site says. Faults come from a :class:`FaultTable` at request time, so a scenario or
an operator can switch them at run time:

* delay: answer late (keep it below the client's timeout: pymodbus's server labels a late
  reply with the connection's newest transaction id, so a too-late reply would be taken
  as the answer to the next request; see /work/notes/pymodbus.md);
* timeout: drop the request (no reply at all);
* exception: reply with the fault's exception code;
* garbage: NaN for floats, all-ones or the most negative value for integers;
* gone: behind a gateway, exception 0x0B (gateway target failed to respond), as real
  gateways do; on its own port, the port is closed (connection refused) until cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers import codec
from drivers.datatypes import BIT_TABLES
from drivers.devicemap import ModbusMap, ModbusPoint, load_modbus_map
from sim.faults import FaultKind, FaultTable
from sim.values import PointSource

log = logging.getLogger(__name__)

TABLE_OF_FC = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
TABLE_ORDER = ("coil", "discrete", "holding", "input")  # pymodbus simdata tuple order
POWER_PROBES = ("power_w", "output_power_w", "input_power_w")
FAULT_POLL_S = 0.05


@dataclass(frozen=True)
class SimModbusDevice:
    """A device to serve. Devices with the same non-zero ``port`` (or, on ephemeral ports,
    the same ``gateway`` name) share one server and are told apart by ``unit_id``."""

    device_id: str
    map_name: str
    unit_id: int = 1
    port: int = 0
    gateway: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """Where a real tool reaches a device; ``probe`` names a holding register to read."""

    device: str
    host: str
    port: int
    unit_id: int
    probe: Mapping[str, Any]
    protocol: str = "modbus"

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "protocol": self.protocol,
            "host": self.host,
            "port": self.port,
            "unit_id": self.unit_id,
            "probe": dict(self.probe),
        }


def probe_point(dmap: ModbusMap) -> tuple[str, ModbusPoint] | None:
    """The holding register a tool should read to check a device: its power if it has one."""
    for name in POWER_PROBES:
        p = dmap.points.get(name)
        if p is not None and p.table == "holding":
            return name, p
    for name, p in dmap.points.items():
        if p.table == "holding" and p.numeric:
            return name, p
    return None


class _Served:
    """One device's live view: encodes on read, decodes writes, applies its faults."""

    def __init__(
        self,
        dev: SimModbusDevice,
        dmap: ModbusMap,
        source: PointSource,
        faults: FaultTable,
        *,
        on_gateway: bool,
    ) -> None:
        self.dev = dev
        self.map = dmap
        self.source = source
        self.faults = faults
        self.on_gateway = on_gateway
        self.by_table: dict[str, list[tuple[str, ModbusPoint]]] = {t: [] for t in TABLE_ORDER}
        for name, p in dmap.points.items():
            self.by_table[p.table].append((name, p))

    def simdata(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        """One contiguous block per table spanning its points (holes read as 0)."""
        out: list[list[SimData]] = []
        for table in TABLE_ORDER:
            pts = [p for _, p in self.by_table[table]]
            if table in BIT_TABLES:
                # pymodbus stores 16 bits per register; coil a lives in register a // 16.
                hi = max((p.address for p in pts), default=0) // 16 + 1
                out.append([SimData(0, count=hi, values=0, datatype=DataType.BITS)])
            elif pts:
                lo = min(p.address for p in pts)
                hi = max(p.address + p.registers for p in pts)
                out.append([SimData(lo, count=hi - lo, values=0, datatype=DataType.REGISTERS)])
            else:
                out.append([SimData(0, count=1, values=0, datatype=DataType.REGISTERS)])
        return out[0], out[1], out[2], out[3]

    def value_of(self, name: str, p: ModbusPoint) -> float | str | None:
        v = self.source.value(self.dev.device_id, name)
        if v is None:
            v = p.sim_value
        if v is None and p.type == "string":
            return self.map.model if name in ("model_name", "mfr_model") else ""
        return v

    def _sf(self, p: ModbusPoint) -> int:
        if p.scale_point is None:
            return 0
        v = self.value_of(p.scale_point, self.map.points[p.scale_point])
        return int(v) if isinstance(v, int | float) and not math.isnan(v) else 0

    def encoded(self, name: str, p: ModbusPoint, garbage: bool) -> list[int]:
        if garbage and p.numeric:
            return codec.garbage(p)
        v = self.value_of(name, p)
        if v is None:
            return [0] * p.registers
        return codec.encode(p, v, self._sf(p))

    async def action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        regs: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        fault = self.faults.get(self.dev.device_id)
        garbage = False
        if fault is not None:
            if fault.kind is FaultKind.DELAY:
                await asyncio.sleep(fault.delay_s)
            elif fault.kind is FaultKind.TIMEOUT:
                raise NoSuchIdException(f"{self.dev.device_id}: dropped (timeout fault)")
            elif fault.kind is FaultKind.EXCEPTION:
                try:
                    return ExcCodes(fault.exception_code)
                except ValueError:
                    return ExcCodes.DEVICE_FAILURE
            elif fault.kind is FaultKind.GONE:
                return ExcCodes.GATEWAY_NO_RESPONSE
            elif fault.kind is FaultKind.GARBAGE:
                garbage = True
        table = TABLE_OF_FC.get(fc, "holding")
        if set_values is not None:
            return self._write(table, address, [int(v) for v in set_values], regs, start)
        end = address + count
        for name, p in self.by_table[table]:
            if table in BIT_TABLES:
                if address <= p.address < end:
                    bit = self.encoded(name, p, garbage)[0]
                    i, b = p.address // 16 - start, p.address % 16
                    regs[i] = (regs[i] | 1 << b) if bit else (regs[i] & ~(1 << b))
            elif p.address < end and p.address + p.registers > address:
                words = self.encoded(name, p, garbage)
                for k, w in enumerate(words):
                    regs[p.address - start + k] = w & 0xFFFF
        return None

    def _write(
        self, table: str, address: int, values: list[int], regs: list[int], start: int
    ) -> ExcCodes | None:
        end = address + len(values)
        touched = False
        for name, p in self.by_table[table]:
            if table in BIT_TABLES:
                inside = address <= p.address < end
                words = [values[p.address - address]] if inside else []
            else:
                inside = address <= p.address and p.address + p.registers <= end
                words = values[p.address - address : p.address - address + p.registers]
            if not inside:
                continue
            touched = True
            if not p.writable:
                return ExcCodes.ILLEGAL_ADDRESS
            value = codec.decode(p, words, self._sf(p))
            if isinstance(value, str) or codec.problem(p, value) is not None:
                return ExcCodes.ILLEGAL_VALUE
            if not self.source.write(self.dev.device_id, name, value):
                return ExcCodes.DEVICE_FAILURE
        return None if touched else ExcCodes.ILLEGAL_ADDRESS


async def _unknown_unit(
    fc: int,
    start: int,
    address: int,
    count: int,
    regs: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    return ExcCodes.GATEWAY_NO_RESPONSE


class _Server:
    """One listening port: a single device or a gateway with several unit ids."""

    def __init__(
        self, host: str, port: int, served: list[_Served], sslctx: ssl.SSLContext | None
    ) -> None:
        self.host = host
        self.port = port
        self.served = served
        self.sslctx = sslctx
        self.server: ModbusTcpServer | None = None

    @property
    def running(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        devices = [
            SimDevice(
                id=s.dev.unit_id, simdata=s.simdata(), action=s.action, use_bit_addressing=True
            )
            for s in self.served
        ]
        # Catch-all: any other unit id answers "gateway target failed to respond".
        devices.append(
            SimDevice(
                id=0,
                simdata=[SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
                action=functools.partial(_unknown_unit),
            )
        )
        server: ModbusTcpServer
        if self.sslctx is not None:
            server = ModbusTlsServer(
                devices,
                address=(self.host, self.port),
                sslctx=self.sslctx,
                ignore_missing_devices=True,
            )
        else:
            server = ModbusTcpServer(
                devices, address=(self.host, self.port), ignore_missing_devices=True
            )
        await server.serve_forever(background=True)
        listener = cast(asyncio.Server, server.transport)
        self.port = listener.sockets[0].getsockname()[1]
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.shutdown()  # type: ignore[no-untyped-call]


class ModbusFrontend:
    """Serve devices over Modbus/TCP: ``async with ModbusFrontend(devs, source) as fe``."""

    def __init__(
        self,
        devices: Sequence[SimModbusDevice],
        source: PointSource,
        faults: FaultTable | None = None,
        *,
        host: str = "127.0.0.1",
        maps: Mapping[str, ModbusMap] | None = None,
        sslctx: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.source = source
        self.faults = faults if faults is not None else FaultTable()
        groups: dict[tuple[str, object], list[SimModbusDevice]] = {}
        for d in devices:
            key: tuple[str, object] = (
                ("port", d.port)
                if d.port
                else ("gateway", d.gateway)
                if d.gateway
                else ("device", d.device_id)
            )
            groups.setdefault(key, []).append(d)
        self.servers: list[_Server] = []
        self._device_server: dict[str, _Server] = {}
        for (_, _), devs in groups.items():
            units = [d.unit_id for d in devs]
            if len(set(units)) != len(units):
                raise ValueError(f"unit ids repeat on one port: {[d.device_id for d in devs]}")
            gateway = len(devs) > 1 or devs[0].gateway is not None
            served = [
                _Served(
                    d,
                    (maps or {}).get(d.map_name) or load_modbus_map(d.map_name),
                    source,
                    self.faults,
                    on_gateway=gateway,
                )
                for d in devs
            ]
            srv = _Server(host, devs[0].port, served, sslctx)
            self.servers.append(srv)
            for d in devs:
                self._device_server[d.device_id] = srv
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for s in self.servers:
            await s.start()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_gone(), name="modbus-frontend-faults"
        )

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for s in self.servers:
            await s.stop()

    async def __aenter__(self) -> ModbusFrontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _watch_gone(self) -> None:
        """A device alone on its port that is 'gone' closes the port; cleared, it reopens."""
        solo = [s for s in self.servers if len(s.served) == 1 and not s.served[0].on_gateway]
        while True:
            for s in solo:
                fault = self.faults.get(s.served[0].dev.device_id)
                gone = fault is not None and fault.kind is FaultKind.GONE
                try:
                    if gone and s.running:
                        await s.stop()
                    elif not gone and not s.running:
                        await s.start()
                except (OSError, RuntimeError):
                    log.warning("cannot reopen port %s for %s", s.port, s.served[0].dev.device_id)
            await asyncio.sleep(FAULT_POLL_S)

    def endpoints(self) -> list[Endpoint]:
        out: list[Endpoint] = []
        for s in self.servers:
            for sd in s.served:
                probe: dict[str, Any] = {}
                found = probe_point(sd.map)
                if found is not None:
                    name, p = found
                    probe = {"address": p.address, "point": name, "type": p.type, "order": p.order}
                out.append(Endpoint(sd.dev.device_id, self.host, s.port, sd.dev.unit_id, probe))
        return out

    def endpoint(self, device_id: str) -> Endpoint:
        for e in self.endpoints():
            if e.device == device_id:
                return e
        raise KeyError(device_id)
