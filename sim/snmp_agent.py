"""The simulator's SNMP agent: many devices on one UDP port, told apart by v2c community.

Each device serves the OIDs of its device map with values read LIVE from a
:class:`~sim.values.PointSource` when the request arrives, encoded to raw integers with
the same scale and decimal-digit math the driver decodes with (``drivers.codec``), so a
map change moves both ends together. It answers GET, GETNEXT and GETBULK in OID order
across scalars and table columns, so ``snmpget``, ``snmpwalk`` and ``snmpbulkwalk`` see
an ordinary agent. SET is refused with notWritable. SNMPv1 and v3 are dropped: a real PDU
configured for v2c only behaves the same.

Faults come from a :class:`~sim.faults.FaultTable` per device: DELAY answers late,
TIMEOUT and GONE never answer (GONE is what an unknown community looks like), EXCEPTION
answers genErr, GARBAGE answers out-of-range values, or the wrong type where the map's
range leaves no room for an out-of-range number.

The codec is the hand-written one in :mod:`drivers.snmpwire` (~10x cheaper than pysnmp's
responder), so a fleet of simulated PDUs costs little next to the drivers under test.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from drivers import snmpwire as w
from drivers.codec import snmp_encode
from drivers.datatypes import ENTITY_SCALE_UNITS, SNMP_TYPES
from drivers.devicemap import SnmpMap, SnmpPoint
from sim.faults import FaultKind, FaultTable
from sim.values import PointSource

log = logging.getLogger(__name__)

# Replies larger than this stop a GETBULK early (it fits one Ethernet frame, as agents do);
# a GET whose reply would exceed MAX_MESSAGE_BYTES gets tooBig.
BULK_REPLY_BYTES = 1400
MAX_BULK_VARBINDS = 64
MAX_MESSAGE_BYTES = 65000

SYS_DESCR = (1, 3, 6, 1, 2, 1, 1, 1, 0)
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
SYS_NAME = (1, 3, 6, 1, 2, 1, 1, 5, 0)

GARBAGE_TEXT = b"garbage"


@dataclass(frozen=True)
class SnmpSimDevice:
    """One simulated device: its id (the PointSource key), map and v2c community."""

    device_id: str
    map: SnmpMap
    community: str


class _DeviceView:
    """A device's OIDs in order, with how to produce each value."""

    def __init__(self, device: SnmpSimDevice, started_s: float) -> None:
        self.device = device
        self.started_s = started_s
        self.points: dict[w.Oid, tuple[str, SnmpPoint]] = {
            w.parse_oid(p.full_oid): (name, p) for name, p in device.map.points.items()
        }
        self.by_name = {name: p for name, p in device.map.points.items()}
        system = {SYS_DESCR, SYS_UPTIME, SYS_NAME} - set(self.points)
        self.system = system
        self.keys: list[w.Oid] = sorted(set(self.points) | system)

    def _number(self, source: PointSource, name: str, point: SnmpPoint) -> float | None:
        value = source.value(self.device.device_id, name)
        return point.sim_value if value is None else value

    def _meta(self, source: PointSource, oid_text: str | None, default: int) -> int:
        """Decimal digits or SI scale of a point: the value served at ``oid_text``."""
        if oid_text is None:
            return default
        name, point = self.points[w.parse_oid(oid_text)]
        value = self._number(source, name, point)
        return default if value is None or math.isnan(value) else round(value)

    def value(self, oid: w.Oid, source: PointSource, garbage: bool) -> w.Value | None:
        """What the device holds at ``oid`` now; None where it holds nothing."""
        entry = self.points.get(oid)
        if entry is None:
            return self._system(oid)
        name, point = entry
        tag = w.TYPE_TAGS[point.type]
        if garbage:
            return _garbage(point, tag)
        number = self._number(source, name, point)
        if number is None:
            return None
        digits = self._meta(source, point.divisor_oid, 0)
        si_scale = self._meta(source, point.si_scale_oid, ENTITY_SCALE_UNITS)
        raw = snmp_encode(point, number, digits, si_scale)
        if isinstance(raw, str):
            return w.OCTET_STRING, raw.encode()
        return tag, raw

    def _system(self, oid: w.Oid) -> w.Value | None:
        if oid not in self.system:
            return None
        if oid == SYS_UPTIME:
            ticks = int((time.monotonic() - self.started_s) * 100) % (1 << 32)
            return w.TIMETICKS, ticks
        if oid == SYS_NAME:
            return w.OCTET_STRING, self.device.device_id.encode()
        return w.OCTET_STRING, f"rackpower simulated {self.device.map.model}".encode()

    def next_after(self, oid: w.Oid, source: PointSource, garbage: bool) -> w.VarBind:
        """The first OID after ``oid`` that holds a value (GETNEXT), or endOfMibView."""
        k = bisect.bisect_right(self.keys, oid)
        while k < len(self.keys):
            key = self.keys[k]
            value = self.value(key, source, garbage)
            if value is not None:
                return key, value
            k += 1
        return oid, (w.END_OF_MIB_VIEW, None)


def _garbage(point: SnmpPoint, tag: int) -> w.Value:
    """A value the driver must reject: out of the map's range if the type allows, else the
    wrong type. Deterministic, so a test knows every point goes BAD."""
    t = SNMP_TYPES[point.type]
    if t.text:
        return w.INTEGER, -1
    assert t.lo is not None and t.hi is not None
    for raw in (t.hi, t.lo):
        # Same arithmetic as the driver, digits/SI scale taken as defaults (garbage anyway).
        value = raw * point.scale + point.offset
        if (point.max is not None and value > point.max) or (
            point.min is not None and value < point.min
        ):
            return tag, raw
    return w.OCTET_STRING, GARBAGE_TEXT


class SnmpResponder(asyncio.DatagramProtocol):
    """The UDP endpoint; :meth:`handle` is the whole agent (socket-free, for tests)."""

    def __init__(
        self,
        devices: Sequence[SnmpSimDevice],
        source: PointSource,
        faults: FaultTable | None = None,
    ) -> None:
        started = time.monotonic()
        self.views = {d.community.encode(): _DeviceView(d, started) for d in devices}
        if len(self.views) != len(devices):
            raise ValueError("two simulated SNMP devices share one community")
        self.source = source
        self.faults = faults or FaultTable()
        self.requests: Counter[str] = Counter()  # answered or not, per device id
        self.malformed = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, asyncio.TimerHandle] = {}
        self._next_key = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply, delay_s = self.handle(data)
        except Exception:  # a bug must not kill the port for every other device
            log.exception("SNMP agent failed on a request from %s", addr)
            return
        if reply is None or self.transport is None:
            return
        if delay_s > 0:
            self._next_key += 1
            self._pending[self._next_key] = asyncio.get_running_loop().call_later(
                delay_s, self._send_late, self._next_key, reply, addr
            )
        else:
            self.transport.sendto(reply, addr)

    def _send_late(self, key: int, reply: bytes, addr: tuple[str | int, ...]) -> None:
        self._pending.pop(key, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def restart(self, device_id: str) -> None:
        """Simulate the device's agent rebooting: its sysUpTime starts again from zero
        (a driver takes that as the cue to re-read device constants like decimal digits)."""
        for view in self.views.values():
            if view.device.device_id == device_id:
                view.started_s = time.monotonic()
                return
        raise KeyError(device_id)

    def cancel_pending(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()

    def handle(self, data: bytes) -> tuple[bytes | None, float]:
        """Reply to one datagram (None: stay silent) and how long to hold it back."""
        try:
            req = w.decode_message(data)
        except w.SnmpWireError:
            self.malformed += 1
            return None, 0.0
        if req.version != w.VERSION_2C or req.pdu_type == w.RESPONSE:
            return None, 0.0
        view = self.views.get(req.community)
        if view is None:
            return None, 0.0
        device_id = view.device.device_id
        self.requests[device_id] += 1
        fault = self.faults.get(device_id)
        kind = fault.kind if fault is not None else None
        if kind in (FaultKind.TIMEOUT, FaultKind.GONE):
            return None, 0.0
        if kind is FaultKind.EXCEPTION:
            return w.response(req, req.varbinds, w.GEN_ERR, 1), 0.0
        if req.pdu_type == w.SET:
            return w.response(req, req.varbinds, 17, 1), 0.0  # notWritable
        garbage = kind is FaultKind.GARBAGE
        reply = self._answer(req, view, garbage)
        delay_s = fault.delay_s if fault is not None and kind is FaultKind.DELAY else 0.0
        return reply, delay_s

    def _answer(self, req: w.Message, view: _DeviceView, garbage: bool) -> bytes:
        src = self.source
        oids = [o for o, _ in req.varbinds]
        if req.pdu_type == w.GET:
            out = [(o, view.value(o, src, garbage) or _missing(o, view)) for o in oids]
        elif req.pdu_type == w.GETNEXT:
            out = [view.next_after(o, src, garbage) for o in oids]
        else:
            return self._bulk(req, view, garbage)
        reply = w.response(req, out)
        if len(reply) > MAX_MESSAGE_BYTES:
            return w.response(req, [], w.TOO_BIG, 0)
        return reply

    def _bulk(self, req: w.Message, view: _DeviceView, garbage: bool) -> bytes:
        src = self.source
        oids = [o for o, _ in req.varbinds]
        n = min(max(req.non_repeaters, 0), len(oids))
        reps = max(req.max_repetitions, 0)
        out = [view.next_after(o, src, garbage) for o in oids[:n]]
        current = oids[n:]
        size = 0
        while current and reps > 0 and len(out) + len(current) <= MAX_BULK_VARBINDS:
            row = [view.next_after(o, src, garbage) for o in current]
            size += len(w.encode_varbinds(row))
            if size > BULK_REPLY_BYTES and len(out) > n:
                break
            out += row
            reps -= 1
            if all(v[0] == w.END_OF_MIB_VIEW for _, v in row):
                break
            current = [o for o, _ in row]
        return w.response(req, out)


def _missing(oid: w.Oid, view: _DeviceView) -> w.Value:
    # noSuchInstance where the map knows the object but the source has no value for it.
    if oid in view.points:
        return w.NO_SUCH_INSTANCE, None
    return w.NO_SUCH_OBJECT, None


class SnmpFrontend:
    """``async with SnmpFrontend(devices, source, faults, host, port=0) as fe: fe.port``."""

    def __init__(
        self,
        devices: Sequence[SnmpSimDevice],
        source: PointSource,
        faults: FaultTable | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.responder = SnmpResponder(devices, source, faults)
        self.host = host
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def faults(self) -> FaultTable:
        return self.responder.faults

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.responder, local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])

    async def stop(self) -> None:
        self.responder.cancel_pending()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)  # let the loop drop the socket

    def probe_oid(self, device_id: str) -> str:
        """An OID a real tool can GET on this device (its power point, else its first)."""
        for view in self.responder.views.values():
            if view.device.device_id == device_id:
                points = view.device.map.points
                point = points.get("power_w") or next(iter(points.values()))
                return point.full_oid
        raise KeyError(device_id)

    async def __aenter__(self) -> SnmpFrontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
