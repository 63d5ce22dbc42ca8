"""The poll benchmark's fleet, and the subprocess that serves it.

The fleet is served in its own process so that the CPU we measure is the poller's alone:
the benchmark process runs only our drivers, collectd runs only collectd, and the
simulator's cost lands on neither. Both sides build the fleet from the same sizes, so the
pollers and the server agree on device ids, unit ids and communities without sharing code
paths beyond this module.

The server counts every point value it encodes (a wrapped :class:`StaticSource`): that is
how many points collectd actually polled, since collectd's own output would cost it CPU
we would then be charging to it.

Protocol on the server's stdin/stdout, one JSON line each: the server first prints its
endpoints; then each ``counts`` line is answered with the reads so far per protocol and
the server's own CPU seconds; EOF (or ``stop``) ends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from drivers.devicemap import ModbusMap, SnmpMap, load_modbus_map, load_snmp_map
from sim.modbus_server import ModbusFrontend, SimModbusDevice
from sim.snmp_agent import SnmpFrontend, SnmpSimDevice
from sim.values import StaticSource

MODBUS_MAP = "generic-hvdc-rectifier-800v"
SNMP_MAP = "apc-rpdu2"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class FleetSize:
    """How big the fleet is; the only thing the server and the pollers must agree on."""

    shelves: int = 50
    shelves_per_gateway: int = 10
    pdus: int = 100

    def argv(self) -> list[str]:
        return [
            "--shelves",
            str(self.shelves),
            "--shelves-per-gateway",
            str(self.shelves_per_gateway),
            "--pdus",
            str(self.pdus),
        ]


def shelf_id(i: int) -> str:
    return f"shelf-{i:04d}"


def pdu_id(i: int) -> str:
    return f"pdu-{i:04d}"


def shelves(size: FleetSize) -> list[SimModbusDevice]:
    """Rectifier shelves behind Modbus gateways, unit ids 1..shelves_per_gateway each."""
    per = max(1, size.shelves_per_gateway)
    return [
        SimModbusDevice(shelf_id(i), MODBUS_MAP, unit_id=i % per + 1, gateway=f"gw-{i // per}")
        for i in range(size.shelves)
    ]


def pdus(size: FleetSize, smap: SnmpMap) -> list[SnmpSimDevice]:
    """PDUs on one agent port, told apart by community (= device id)."""
    return [SnmpSimDevice(pdu_id(i), smap, pdu_id(i)) for i in range(size.pdus)]


def typical_value(lo: float | None, hi: float | None) -> float:
    """A value inside a point's range, so every poll of a healthy fleet reads GOOD."""
    if lo is not None and hi is not None:
        return lo + (hi - lo) * 0.37
    if lo is not None:
        return lo + 1.0e9  # counters (energy): large, as in a real fleet
    return 1.0 if hi is None else hi / 2


def fleet_values(size: FleetSize, mmap: ModbusMap, smap: SnmpMap) -> dict[tuple[str, str], float]:
    values: dict[tuple[str, str], float] = {}
    for i in range(size.shelves):
        for name, p in mmap.numeric_points().items():
            bits = p.type in ("bit", "bitfield")
            values[(shelf_id(i), name)] = 0.0 if bits else typical_value(p.min, p.max)
    for i in range(size.pdus):
        for name, sp in smap.points.items():
            v = typical_value(sp.min, sp.max)
            values[(pdu_id(i), name)] = float(math.floor(v)) if sp.max and sp.max <= 10 else v
    return values


class CountingSource(StaticSource):
    """Static values that count how often a frontend asked for one (= points served)."""

    def __init__(self, values: dict[tuple[str, str], float]) -> None:
        super().__init__(values)
        self.reads: Counter[str] = Counter()

    def value(self, device_id: str, point: str) -> float | None:
        self.reads[device_id] += 1
        return super().value(device_id, point)


async def serve(size: FleetSize, stdin: TextIO, stdout: TextIO) -> None:
    """Serve the fleet until stdin ends; answer ``counts`` requests on stdout."""
    # A poller that hangs up mid-request (each phase ends so) makes pymodbus's server log
    # an error with a frame dump: noise here, not a finding.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    mmap, smap = load_modbus_map(MODBUS_MAP), load_snmp_map(SNMP_MAP)
    source = CountingSource(fleet_values(size, mmap, smap))
    modbus_ids = {shelf_id(i) for i in range(size.shelves)}
    async with (
        ModbusFrontend(shelves(size), source, host=HOST, maps={MODBUS_MAP: mmap}) as mb,
        SnmpFrontend(pdus(size, smap), source, host=HOST, port=0) as snmp,
    ):
        endpoints = {
            "modbus": [
                {"device": e.device, "host": e.host, "port": e.port, "unit_id": e.unit_id}
                for e in mb.endpoints()
            ],
            "snmp": [
                {"device": pdu_id(i), "host": HOST, "port": snmp.port, "community": pdu_id(i)}
                for i in range(size.pdus)
            ],
        }
        _say(stdout, endpoints)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, stdin.readline)
            command = line.strip()
            if not line or command == "stop":
                return
            if command == "counts":
                modbus = sum(n for d, n in source.reads.items() if d in modbus_ids)
                _say(
                    stdout,
                    {
                        "modbus_points": modbus,
                        "snmp_points": sum(source.reads.values()) - modbus,
                        "snmp_requests": sum(snmp.responder.requests.values()),
                        "cpu_s": time.process_time(),
                    },
                )
            else:
                _say(stdout, {"error": f"unknown command {command!r}"})


def _say(stdout: TextIO, doc: dict[str, Any]) -> None:
    stdout.write(json.dumps(doc) + "\n")
    stdout.flush()


def run_server(size: FleetSize) -> int:
    asyncio.run(serve(size, sys.stdin, sys.stdout))
    return 0
