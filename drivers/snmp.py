"""SNMP driver: polls rack PDUs, UPSes and meters described by an SNMP device map.

One :class:`SnmpDevice` per device, driven by :class:`drivers.base.DevicePoller`. A poll
asks for all of a device's points in as few GETs as the varbind limit allows, and turns
each varbind into a :class:`~drivers.reading.Reading`: a missing object or a value of the
wrong type is BAD with the reason, no answer is ERROR for the device.

Table cells: with ``tables="bulk"`` they are walked with GETBULK, one request per
conceptual table with all its wanted columns side by side, from just below the first
wanted row until every wanted row is seen. The default is ``"get"``, because a map names
each cell's index, so the cells ride in the same GET as the scalars: measured on the
APC map (7 points in 2 tables), one GET costs 19 us of CPU per point on the fast path,
GET + 2 GETBULKs 37 us (pysnmp: 358 vs 404 us). Use bulk for agents that answer GETBULK
better than long GETs, or for maps with many rows per column.

Two transports, picked per device:

* :class:`FastV2cTransport` for SNMPv2c: one asyncio UDP socket shared by every device of
  the event loop, requests matched by request id, many in flight, encoded with
  :mod:`drivers.snmpwire`. pysnmp spends ~1 ms of CPU per GET in pyasn1; this path a tenth
  of that, which is what lets one core poll a hall of PDUs (issue 4's CPU goal).
* :class:`PysnmpTransport` for SNMPv3 (USM authentication and AES privacy are what pysnmp
  does well and what we should not hand-roll), and for v2c on request. One SnmpEngine per
  event loop, ``lookupMib=False`` (numeric OIDs, 25-50 % cheaper).

Decimal digits (Raritan ``inletSensorDecimalDigits``, ENTITY-SENSOR precision) and SI
scales are device constants: they are read once, cached, and read again after a
reconnect, when ``sysUpTime`` goes backwards (the agent restarted, maybe reconfigured), or
every ``divisor_refresh_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import random
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from drivers import snmpwire as w
from drivers.base import (
    DeviceParams,
    DeviceTimeout,
    DriverError,
    MalformedResponse,
    PointKey,
    now_pair,
    str_option,
)
from drivers.codec import problem, snmp_decode
from drivers.datatypes import ENTITY_SCALE_UNITS
from drivers.devicemap import SnmpMap, SnmpPoint, load_snmp_map
from drivers.reading import Quality, Reading

log = logging.getLogger(__name__)

DEFAULT_PORT = 161
DEFAULT_MAX_VARBINDS = 32
DEFAULT_RETRIES = 1
DEFAULT_DIVISOR_REFRESH_S = 300.0
MAX_WALK_ROUNDS = 16
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)

TransportName = Literal["auto", "fast", "pysnmp"]
TableMode = Literal["bulk", "get"]


# ---------------------------------------------------------------------------
# targets and transports


@dataclass(frozen=True)
class SnmpTarget:
    """Where a device is and how to authenticate. v3 keys come from the environment or a
    file through the controller's config, never from a device map."""

    host: str
    port: int = DEFAULT_PORT
    version: Literal["2c", "3"] = "2c"
    community: str = "public"
    v3_user: str | None = None
    v3_auth_key: str | None = None
    v3_priv_key: str | None = None
    v3_auth_protocol: str = "SHA-256"
    v3_priv_protocol: str = "AES"


@dataclass(frozen=True, slots=True)
class SnmpResponse:
    varbinds: tuple[w.VarBind, ...]
    error_status: int = 0
    error_index: int = 0
    retries: int = 0  # re-sends this request needed


class SnmpTransport(Protocol):
    """What a device needs from a transport; both paths return snmpwire values."""

    async def get(
        self, target: SnmpTarget, oids: Sequence[w.Oid], timeout_s: float, retries: int
    ) -> SnmpResponse: ...

    async def bulk(
        self,
        target: SnmpTarget,
        oids: Sequence[w.Oid],
        max_repetitions: int,
        timeout_s: float,
        retries: int,
    ) -> SnmpResponse: ...

    async def close(self) -> None: ...


class _Pending:
    __slots__ = ("addr", "community", "future")

    def __init__(
        self, future: asyncio.Future[w.Message], addr: tuple[str, int], community: bytes
    ) -> None:
        self.future = future
        self.addr = addr
        self.community = community


Addr = tuple[str, int]


class _ClientProtocol(asyncio.DatagramProtocol):
    """Matches replies to pending requests; anything else is dropped and counted.

    A datagram that is not SNMP, or not a proper RESPONSE to a pending request, from an
    address we are waiting on is also counted against that address (``bad_from``), so
    the request that then times out can say the device answers garbage
    (:class:`~drivers.base.MalformedResponse`) rather than nothing. Only addresses with a
    request in flight are tracked (``waiting``): a flood from elsewhere, or from spoofed
    sources, grows no table.
    """

    def __init__(self, pending: dict[int, _Pending]) -> None:
        self.pending = pending
        self.dropped = 0  # malformed, unexpected or late answers
        self.waiting: dict[Addr, int] = {}  # address -> requests in flight to it
        self.bad_from: dict[Addr, tuple[int, str]] = {}  # address -> (drops, last reason)

    def _drop(self, addr: Addr, why: str) -> None:
        self.dropped += 1
        if addr in self.waiting:
            n, _ = self.bad_from.get(addr, (0, ""))
            self.bad_from[addr] = (n + 1, why)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        src = (str(addr[0]), int(addr[1]))
        try:
            msg = w.decode_message(data)
        except w.SnmpWireError as e:
            self._drop(src, f"not SNMP ({len(data)} bytes: {str(e)[:80]})")
            return
        p = self.pending.get(msg.request_id)
        if p is None or p.future.done():
            # Most often a late answer to a request that timed out: a slow device, not a
            # garbling one, so it is not held against the address (the request times out).
            self.dropped += 1
            return
        if msg.pdu_type != w.RESPONSE or src != p.addr or msg.community != p.community:
            self._drop(src, "not a RESPONSE from the agent asked, with its community")
            return
        p.future.set_result(msg)

    def error_received(self, exc: Exception) -> None:
        log.debug("SNMP client socket error: %s", exc)


class FastV2cTransport:
    """SNMPv2c over one UDP socket per address family, shared by all devices of a loop.

    Targets must be given as numeric addresses (devices resolve names once in ``connect``):
    replies are matched on (address, port, request id, community).
    """

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._sockets: dict[int, tuple[asyncio.DatagramTransport, _ClientProtocol]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(random.randrange(1, 1 << 30))

    @property
    def dropped(self) -> int:
        return sum(p.dropped for _, p in self._sockets.values())

    async def _socket(self, family: int) -> tuple[asyncio.DatagramTransport, _ClientProtocol]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests, restarts): start afresh
            self._sockets.clear()
            self._pending.clear()
            self._loop = loop
        entry = self._sockets.get(family)
        if entry is None or entry[0].is_closing():
            local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _ClientProtocol(self._pending), local_addr=local, family=family
            )
            entry = (transport, protocol)
            self._sockets[family] = entry
        return entry

    def _next_id(self) -> int:
        while True:
            rid = next(self._ids) % (1 << 31)
            if rid and rid not in self._pending:
                return rid

    async def _request(
        self,
        target: SnmpTarget,
        pdu_type: int,
        oids: Sequence[w.Oid],
        max_repetitions: int,
        timeout_s: float,
        retries: int,
    ) -> SnmpResponse:
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock, proto = await self._socket(family)
        rid = self._next_id()
        community = target.community.encode()
        packet = w.request(pdu_type, community, rid, list(oids), 0, max_repetitions)
        addr = (target.host, target.port)
        future: asyncio.Future[w.Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, addr, community)
        proto.waiting[addr] = proto.waiting.get(addr, 0) + 1
        bad_before = proto.bad_from.get(addr, (0, ""))[0]
        attempt_s = timeout_s / (retries + 1)
        try:
            for attempt in range(retries + 1):
                sock.sendto(packet, addr)
                done, _ = await asyncio.wait((future,), timeout=attempt_s)
                if done:
                    msg = future.result()
                    return SnmpResponse(msg.varbinds, msg.error_status, msg.error_index, attempt)
            bad, why = proto.bad_from.get(addr, (0, ""))
            if bad > bad_before:
                raise MalformedResponse(
                    f"no valid SNMP answer from {target.host}:{target.port} in {timeout_s:g} s:"
                    f" {bad - bad_before} datagrams from it were dropped (last: {why})"
                )
            raise DeviceTimeout(
                f"no SNMP answer from {target.host}:{target.port} in {timeout_s:g} s "
                f"({retries + 1} tries; wrong community or device down?)"
            )
        finally:
            self._pending.pop(rid, None)
            future.cancel()
            left = proto.waiting.get(addr, 1) - 1
            if left > 0:
                proto.waiting[addr] = left
            else:
                proto.waiting.pop(addr, None)
                proto.bad_from.pop(addr, None)

    async def get(
        self, target: SnmpTarget, oids: Sequence[w.Oid], timeout_s: float, retries: int
    ) -> SnmpResponse:
        return await self._request(target, w.GET, oids, 0, timeout_s, retries)

    async def bulk(
        self,
        target: SnmpTarget,
        oids: Sequence[w.Oid],
        max_repetitions: int,
        timeout_s: float,
        retries: int,
    ) -> SnmpResponse:
        return await self._request(target, w.GETBULK, oids, max_repetitions, timeout_s, retries)

    async def close(self) -> None:
        for transport, _ in self._sockets.values():
            transport.close()
        self._sockets.clear()
        for p in self._pending.values():
            p.future.cancel()
        self._pending.clear()


def _auth_protocols() -> dict[str, Any]:
    from pysnmp.hlapi.v3arch import asyncio as h

    return {
        "MD5": h.usmHMACMD5AuthProtocol,
        "SHA": h.usmHMACSHAAuthProtocol,
        "SHA-224": h.usmHMAC128SHA224AuthProtocol,
        "SHA-256": h.usmHMAC192SHA256AuthProtocol,
        "SHA-384": h.usmHMAC256SHA384AuthProtocol,
        "SHA-512": h.usmHMAC384SHA512AuthProtocol,
    }


def _priv_protocols() -> dict[str, Any]:
    from pysnmp.hlapi.v3arch import asyncio as h

    # Names as net-snmp's -x option spells them; net-snmp's AES-192/256 extend the key
    # the Blumenthal way, its AES-192-C/256-C the Reeder way.
    return {
        "DES": h.usmDESPrivProtocol,
        "AES": h.usmAesCfb128Protocol,
        "AES-128": h.usmAesCfb128Protocol,
        "AES-192": h.usmAesBlumenthalCfb192Protocol,
        "AES-256": h.usmAesBlumenthalCfb256Protocol,
        "AES-192-C": h.usmAesCfb192Protocol,
        "AES-256-C": h.usmAesCfb256Protocol,
    }


def _wire_value(value: Any) -> w.Value:
    """A pysnmp/pyasn1 value as the (tag, payload) pair snmpwire produces."""
    t = value.tagSet[-1]
    tag = int(t.tagClass | t.tagFormat | t.tagId)
    if tag in w.INT_BOUNDS:
        return tag, int(value)
    if tag in w.BYTES_TAGS:
        return tag, bytes(value.asOctets())
    if tag == w.OBJECT_IDENTIFIER:
        return tag, tuple(value)
    return tag, None


class PysnmpTransport:
    """pysnmp's v3arch hlapi, one SnmpEngine per event loop (an engine made in another loop
    hangs forever, see /work/notes/pysnmp.md)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[tuple[str, int, float, int], Any] = {}
        self._auth: dict[SnmpTarget, Any] = {}

    def _engine_for_loop(self) -> Any:
        from pysnmp.hlapi.v3arch.asyncio import SnmpEngine

        loop = asyncio.get_running_loop()
        if self._engine is None or self._loop is not loop:
            if self._engine is not None and self._loop is not None and not self._loop.is_closed():
                self._engine.close_dispatcher()
            self._engine = SnmpEngine()
            self._loop = loop
            self._targets.clear()
        return self._engine

    async def _target(self, target: SnmpTarget, timeout_s: float, retries: int) -> Any:
        from pysnmp.hlapi.v3arch.asyncio import Udp6TransportTarget, UdpTransportTarget

        key = (target.host, target.port, timeout_s, retries)
        tgt = self._targets.get(key)
        if tgt is None:
            cls = Udp6TransportTarget if ":" in target.host else UdpTransportTarget
            tgt = await cls.create(
                (target.host, target.port), timeout=timeout_s / (retries + 1), retries=retries
            )
            self._targets[key] = tgt
        return tgt

    def _auth_data(self, target: SnmpTarget) -> Any:
        from pysnmp.hlapi.v3arch.asyncio import CommunityData, UsmUserData

        auth = self._auth.get(target)
        if auth is not None:
            return auth
        if target.version == "2c":
            auth = CommunityData(target.community, mpModel=1)
        else:
            if not target.v3_user:
                raise DriverError("SNMPv3 needs a user name (v3_user)")
            kwargs: dict[str, Any] = {}
            if target.v3_auth_key:
                kwargs["authKey"] = target.v3_auth_key
                kwargs["authProtocol"] = _pick(
                    _auth_protocols(), target.v3_auth_protocol, "v3_auth_protocol"
                )
            if target.v3_priv_key:
                if not target.v3_auth_key:
                    raise DriverError("SNMPv3 privacy needs an authentication key too")
                kwargs["privKey"] = target.v3_priv_key
                kwargs["privProtocol"] = _pick(
                    _priv_protocols(), target.v3_priv_protocol, "v3_priv_protocol"
                )
            auth = UsmUserData(target.v3_user, **kwargs)
        self._auth[target] = auth
        return auth

    async def _run(
        self,
        target: SnmpTarget,
        oids: Sequence[w.Oid],
        max_repetitions: int | None,
        timeout_s: float,
        retries: int,
    ) -> SnmpResponse:
        from pysnmp.hlapi.v3arch.asyncio import (
            ContextData,
            ObjectIdentity,
            ObjectType,
            bulk_cmd,
            get_cmd,
        )

        engine = self._engine_for_loop()
        tgt = await self._target(target, timeout_s, retries)
        auth = self._auth_data(target)
        objs = [ObjectType(ObjectIdentity(w.format_oid(o))) for o in oids]
        if max_repetitions is None:
            ind, status, index, vbs = await get_cmd(
                engine, auth, tgt, ContextData(), *objs, lookupMib=False
            )
        else:
            ind, status, index, vbs = await bulk_cmd(
                engine, auth, tgt, ContextData(), 0, max_repetitions, *objs, lookupMib=False
            )
        if ind:
            name = type(ind).__name__
            if "TimedOut" in name:
                raise DeviceTimeout(
                    f"no SNMP answer from {target.host}:{target.port} in {timeout_s:g} s "
                    f"({retries + 1} tries)"
                )
            raise DriverError(f"SNMP request to {target.host}:{target.port} failed: {ind}")
        varbinds = tuple((tuple(oid), _wire_value(val)) for oid, val in vbs)
        return SnmpResponse(varbinds, int(status), int(index))

    async def get(
        self, target: SnmpTarget, oids: Sequence[w.Oid], timeout_s: float, retries: int
    ) -> SnmpResponse:
        return await self._run(target, oids, None, timeout_s, retries)

    async def bulk(
        self,
        target: SnmpTarget,
        oids: Sequence[w.Oid],
        max_repetitions: int,
        timeout_s: float,
        retries: int,
    ) -> SnmpResponse:
        return await self._run(target, oids, max_repetitions, timeout_s, retries)

    async def close(self) -> None:
        if self._engine is not None and self._loop is asyncio.get_running_loop():
            self._engine.close_dispatcher()
        self._engine = None
        self._loop = None
        self._targets.clear()


def _pick(table: Mapping[str, Any], name: str, what: str) -> Any:
    try:
        return table[name.upper()]
    except KeyError:
        raise DriverError(f"{what} {name!r} is not one of {sorted(table)}") from None


# ---------------------------------------------------------------------------
# the device


@dataclass(frozen=True)
class _Table:
    """The cells of one conceptual table a poll walks with GETBULK."""

    columns: tuple[w.Oid, ...]
    wanted: Mapping[w.Oid, frozenset[w.Oid]]  # column -> row indices


def _start_before(column: w.Oid, index: w.Oid) -> w.Oid:
    """An OID just below ``column.index``, so GETNEXT lands on that row (or the next)."""
    if index[-1] > 0:
        return column + index[:-1] + (index[-1] - 1,)
    return column + index[:-1]


class SnmpDevice:
    """One SNMP device polled by :class:`drivers.base.DevicePoller` (a ``Pollable``)."""

    def __init__(
        self,
        device_id: str,
        smap: SnmpMap,
        target: SnmpTarget,
        transport: SnmpTransport,
        *,
        timeout_s: float = 0.5,
        retries: int = DEFAULT_RETRIES,
        max_varbinds: int = DEFAULT_MAX_VARBINDS,
        tables: TableMode = "get",
        divisor_refresh_s: float = DEFAULT_DIVISOR_REFRESH_S,
    ) -> None:
        if max_varbinds < 1:
            raise ValueError("max_varbinds must be at least 1")
        self.device_id = device_id
        self.map = smap
        self.target = target
        self.transport = transport
        # A little under the poll loop's bound, so our message (tries, address) wins.
        self.timeout_s = timeout_s * 0.9
        self.retries = retries
        self.max_varbinds = max_varbinds
        self.tables = tables
        self.divisor_refresh_s = divisor_refresh_s
        self.last_retries = 0
        self._resolved = target
        self._oids = {name: w.parse_oid(p.full_oid) for name, p in smap.points.items()}
        meta = {
            w.parse_oid(o)
            for p in smap.points.values()
            for o in (p.divisor_oid, p.si_scale_oid)
            if o is not None
        }
        self._meta_names = [n for n, o in self._oids.items() if o in meta]
        self._data_names = [n for n, o in self._oids.items() if o not in meta]
        self._meta: dict[w.Oid, int] = {}  # cached decimal digits / SI scales by OID
        self._meta_problem: dict[w.Oid, str] = {}
        self._meta_read_s: float | None = None
        self._uptime: int | None = None
        self._plan()

    def _plan(self) -> None:
        scalars: list[w.Oid] = []
        tables: dict[w.Oid, dict[w.Oid, set[w.Oid]]] = {}
        for name in self._data_names:
            p = self.map.points[name]
            if p.table is None or self.tables == "get":
                scalars.append(self._oids[name])
                continue
            column = w.parse_oid(p.table.column)
            index = tuple(int(a) for a in p.table.index.split("."))
            tables.setdefault(column[:-1], {}).setdefault(column, set()).add(index)
        if self._meta_names:
            scalars.append(SYS_UPTIME)  # a restart may come with new decimal digits
        self._gets = [
            scalars[i : i + self.max_varbinds] for i in range(0, len(scalars), self.max_varbinds)
        ]
        self._tables = [
            _Table(tuple(sorted(cols)), {c: frozenset(ix) for c, ix in cols.items()})
            for _, cols in sorted(tables.items())
        ]

    # -- Pollable ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.device_id

    def point_keys(self) -> Sequence[PointKey]:
        return [PointKey(self.device_id, n, p.unit) for n, p in self.map.points.items()]

    async def connect(self) -> None:
        """Resolve the host once (the fast path matches replies by address) and forget
        the cached digits: a device that went away may come back reconfigured."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.target.host, self.target.port, type=socket.SOCK_DGRAM
            )
        except OSError as e:
            raise DriverError(f"cannot resolve {self.target.host!r}: {e}") from None
        host = str(infos[0][4][0])
        self._resolved = dataclasses.replace(self.target, host=host)
        self._meta.clear()
        self._meta_problem.clear()
        self._meta_read_s = None
        self._uptime = None

    async def close(self) -> None:
        """Nothing per device: the socket or engine is shared and closed by its owner."""

    async def read(self) -> list[Reading]:
        self.last_retries = 0
        readings: list[Reading] = []
        now_s = time.monotonic()
        if self._meta_names and (
            self._meta_read_s is None
            or self._meta_problem
            or now_s - self._meta_read_s >= self.divisor_refresh_s
        ):
            readings += await self._read_meta()
        values = await self._read_values()
        uptime = values.get(SYS_UPTIME)
        if uptime is not None and uptime[0] == w.TIMETICKS and isinstance(uptime[1], int):
            if self._uptime is not None and uptime[1] < self._uptime and self._meta_names:
                log.info(
                    "%s: sysUpTime went backwards, reading decimal digits again", self.device_id
                )
                readings += await self._read_meta()
            self._uptime = uptime[1]
        ts, wall = now_pair()
        for name in self._data_names:
            readings.append(self._reading(name, values.get(self._oids[name]), ts, wall))
        return readings

    # -- requests ----------------------------------------------------------

    def _check(self, rsp: SnmpResponse, oids: Sequence[w.Oid]) -> SnmpResponse:
        self.last_retries += rsp.retries
        if rsp.error_status:
            status = w.ERROR_NAMES.get(rsp.error_status, str(rsp.error_status))
            where = ""
            if 0 < rsp.error_index <= len(oids):
                where = f" at {w.format_oid(oids[rsp.error_index - 1])}"
            raise DriverError(f"agent answered {status} (error-status {rsp.error_status}){where}")
        return rsp

    async def _get(self, oids: Sequence[w.Oid]) -> dict[w.Oid, w.Value]:
        rsp = await self.transport.get(self._resolved, oids, self.timeout_s, self.retries)
        self._check(rsp, oids)
        if len(rsp.varbinds) != len(oids):
            raise MalformedResponse(f"agent answered {len(rsp.varbinds)} varbinds for {len(oids)}")
        # Trust positions, not echoed names: a GET reply names the requested OIDs.
        return {o: v for o, (_, v) in zip(oids, rsp.varbinds, strict=True)}

    async def _walk(self, table: _Table) -> dict[w.Oid, w.Value]:
        """GETBULK over the table's columns side by side until every wanted row is seen
        (or the column ends). Rows in between that we do not want cost a little traffic."""
        found: dict[w.Oid, w.Value] = {}
        remaining = {c: set(ix) for c, ix in table.wanted.items()}
        last = {c: max(ix) for c, ix in table.wanted.items()}
        cursor = {c: _start_before(c, min(ix)) for c, ix in table.wanted.items()}
        for _ in range(MAX_WALK_ROUNDS):
            cols = [c for c in table.columns if remaining[c]]
            if not cols:
                break
            reps = max(1, min(max(len(remaining[c]) for c in cols), self.max_varbinds // len(cols)))
            oids = [cursor[c] for c in cols]
            rsp = self._check(
                await self.transport.bulk(self._resolved, oids, reps, self.timeout_s, self.retries),
                oids,
            )
            if not rsp.varbinds:
                break
            for k, (oid, value) in enumerate(rsp.varbinds):
                col = cols[k % len(cols)]
                if not remaining[col]:
                    continue
                inside = oid[: len(col)] == col and len(oid) > len(col)
                if value[0] == w.END_OF_MIB_VIEW or not inside or oid <= cursor[col]:
                    remaining[col].clear()  # column over (or agent not moving forward)
                    continue
                cursor[col] = oid
                index = oid[len(col) :]
                if index in remaining[col]:
                    found[oid] = value
                    remaining[col].discard(index)
                if index >= last[col]:
                    remaining[col].clear()
        return found

    async def _read_values(self) -> dict[w.Oid, w.Value]:
        jobs = [self._get(batch) for batch in self._gets]
        jobs += [self._walk(t) for t in self._tables]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        values: dict[w.Oid, w.Value] = {}
        for r in results:
            if isinstance(r, BaseException):
                raise r
            values.update(r)
        return values

    async def _read_meta(self) -> list[Reading]:
        oids = [self._oids[n] for n in self._meta_names]
        batches = [oids[i : i + self.max_varbinds] for i in range(0, len(oids), self.max_varbinds)]
        values: dict[w.Oid, w.Value] = {}
        for r in await asyncio.gather(*(self._get(b) for b in batches)):
            values.update(r)
        ts, wall = now_pair()
        self._meta.clear()
        self._meta_problem.clear()
        readings = []
        for name in self._meta_names:
            oid = self._oids[name]
            reading = self._reading(name, values.get(oid), ts, wall, meta=True)
            if reading.quality is Quality.GOOD:
                self._meta[oid] = round(reading.value)
            else:
                self._meta_problem[oid] = reading.error or "unreadable"
            readings.append(reading)
        self._meta_read_s = ts
        return readings

    # -- decoding ----------------------------------------------------------

    def _reading(
        self, name: str, value: w.Value | None, ts: float, wall: float, meta: bool = False
    ) -> Reading:
        point = self.map.points[name]
        number, error = self._decode(name, point, value, meta)
        quality = Quality.GOOD if error is None else Quality.BAD
        return Reading(self.device_id, name, number, point.unit, ts, wall, quality, error)

    def _factor_inputs(self, point: SnmpPoint) -> tuple[int, int] | str:
        digits, si_scale = 0, ENTITY_SCALE_UNITS
        for ref, what in ((point.divisor_oid, "decimal digits"), (point.si_scale_oid, "scale")):
            if ref is None:
                continue
            oid = w.parse_oid(ref)
            if oid not in self._meta:
                why = self._meta_problem.get(oid, "not read yet")
                return f"{what} at {ref} unusable ({why})"
            if what == "scale":
                si_scale = self._meta[oid]
            else:
                digits = self._meta[oid]
        return digits, si_scale

    def _decode(
        self, name: str, point: SnmpPoint, value: w.Value | None, meta: bool
    ) -> tuple[float, str | None]:
        oid = point.full_oid
        if value is None:
            return math.nan, f"{oid}: noSuchInstance (not found in the table walk)"
        tag, payload = value
        if tag in w.EXCEPTION_TAGS:
            return math.nan, f"{oid}: {w.TAG_NAMES[tag]} (the agent does not have it)"
        text = point.type == "octetstring"
        numeric = tag in w.INT_BOUNDS
        # Integer tags are accepted for each other: agents often send INTEGER where the
        # MIB says Gauge32, and the number is what we need; anything else is garbage.
        if not (numeric or (text and tag == w.OCTET_STRING)):
            return math.nan, (
                f"{oid}: wrong type {w.TAG_NAMES.get(tag, hex(tag))}, map says {point.type}"
            )
        assert isinstance(payload, (int, bytes))
        factors = (0, ENTITY_SCALE_UNITS) if meta else self._factor_inputs(point)
        if isinstance(factors, str):
            return math.nan, f"{oid}: {factors}"
        number = snmp_decode(point, payload, *factors)
        why = problem(point, number, payload if numeric else None)
        return number, (f"{oid}: {why}" if why else None)


# ---------------------------------------------------------------------------
# construction from the controller's parameters


def _number_option(options: Mapping[str, object], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"option {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SnmpOptions:
    """Who the agent is told we are, from :attr:`DeviceParams.options`: ``snmp_version``
    (2c), ``community`` (public), ``v3_user``, ``v3_auth_key``, ``v3_priv_key`` (the keys
    resolved from the environment by the controller, never from the config file)."""

    snmp_version: str = "2c"
    community: str | None = None
    v3_user: str | None = None
    v3_auth_key: str | None = None
    v3_priv_key: str | None = None

    @classmethod
    def of(cls, params: DeviceParams) -> SnmpOptions:
        return cls(
            snmp_version=str_option(params, "snmp_version") or "2c",
            community=str_option(params, "community"),
            v3_user=str_option(params, "v3_user"),
            v3_auth_key=str_option(params, "v3_auth_key"),
            v3_priv_key=str_option(params, "v3_priv_key"),
        )


def target_from_params(p: DeviceParams) -> SnmpTarget:
    o = SnmpOptions.of(p)
    version = o.snmp_version.lower().removeprefix("v")
    if version not in ("2c", "3"):
        raise ValueError(f"{p.device_id}: snmp_version must be 2c or 3, not {o.snmp_version!r}")
    opts = p.options
    return SnmpTarget(
        host=p.host,
        port=p.port or DEFAULT_PORT,
        version=cast(Literal["2c", "3"], version),
        community=o.community or "public",
        v3_user=o.v3_user,
        v3_auth_key=o.v3_auth_key,
        v3_priv_key=o.v3_priv_key,
        v3_auth_protocol=str(opts.get("v3_auth_protocol", "SHA-256")),
        v3_priv_protocol=str(opts.get("v3_priv_protocol", "AES")),
    )


def build_snmp_devices(
    devices: Sequence[DeviceParams],
    fast: FastV2cTransport | None = None,
    pysnmp: PysnmpTransport | None = None,
) -> list[SnmpDevice]:
    """Devices for the poll loop; all of them share one fast socket and one pysnmp engine.

    ``options``: ``transport`` (auto | fast | pysnmp; auto = fast for v2c, pysnmp for v3),
    ``retries`` (1), ``max_varbinds`` (32 per request), ``tables`` (get | bulk),
    ``divisor_refresh_s`` (300), ``v3_auth_protocol`` (SHA-256), ``v3_priv_protocol`` (AES).
    """
    fast = fast or FastV2cTransport()
    pysnmp = pysnmp or PysnmpTransport()
    out = []
    for p in devices:
        if p.map_name is None:
            raise ValueError(f"{p.device_id}: an SNMP device needs a map")
        target = target_from_params(p)
        opts = p.options
        choice = str(opts.get("transport", "auto"))
        if choice not in ("auto", "fast", "pysnmp"):
            raise ValueError(f"{p.device_id}: transport must be auto, fast or pysnmp")
        if choice == "fast" and target.version == "3":
            raise ValueError(f"{p.device_id}: the fast transport speaks v2c only")
        use_fast = choice == "fast" or (choice == "auto" and target.version == "2c")
        tables = str(opts.get("tables", "get"))
        if tables not in ("bulk", "get"):
            raise ValueError(f"{p.device_id}: tables must be bulk or get")
        out.append(
            SnmpDevice(
                p.device_id,
                load_snmp_map(p.map_name),
                target,
                fast if use_fast else pysnmp,
                timeout_s=p.timeout_s,
                retries=int(_number_option(opts, "retries", DEFAULT_RETRIES)),
                max_varbinds=int(_number_option(opts, "max_varbinds", DEFAULT_MAX_VARBINDS)),
                tables=cast(TableMode, tables),
                divisor_refresh_s=_number_option(
                    opts, "divisor_refresh_s", DEFAULT_DIVISOR_REFRESH_S
                ),
            )
        )
    return out
