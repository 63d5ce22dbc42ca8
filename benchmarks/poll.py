"""Poll cost: CPU per polled point of our Modbus and SNMP drivers, next to collectd's.

Run: ``python -m benchmarks.poll [--json OUT] [--shelves N] [--shelves-per-gateway N]
[--pdus N] [--warmup-s S] [--window-s S] [--profile N]``.

A fleet of simulated devices (800 V rectifier shelves behind Modbus gateways, APC rPDU2
PDUs over SNMP v2c) is served by a subprocess (``--serve``), so the simulator's CPU is
nobody's. On that same fleet, one protocol at a time, each poller runs at 1 Hz:

* ours: a :class:`drivers.base.PollGroup` in this process, its sink counting GOOD
  readings; CPU = this process's CPU (``time.process_time``) over the window;
* collectd (``collectd-core``, modbus and snmp plugins) with a generated private config;
  CPU = utime + stime of its process from /proc over the window; points = the values
  the simulator served it in the window (it writes nothing, so output costs it nothing).

Both are measured after a warm-up, over the same window length. Reported: CPU
microseconds per polled point, and how many devices one core holds at 1 Hz at that cost
(1e6 / (us per point * points per device)). Goals (issue 4): Modbus at or below collectd's
CPU per point, SNMP within 2x. Figures, not a pass/fail test: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import poll_collectd as cd
from benchmarks.poll_fleet import MODBUS_MAP, SNMP_MAP, FleetSize, run_server
from drivers.base import DeviceParams, PollGroup, PollSettings
from drivers.devicemap import load_modbus_map, load_snmp_map
from drivers.reading import Quality, Reading
from drivers.registry import build_pollables

PERIOD_S = 1.0
TIMEOUT_S = 0.5
GOALS = {"modbus": 1.0, "snmp": 2.0}  # ours / collectd CPU per point, at most


@dataclass(frozen=True)
class Measure:
    """One poller on one protocol over one window."""

    poller: str
    protocol: str
    devices: int
    points_per_device: int
    window_s: float
    cpu_s: float
    points: int  # ours: GOOD readings at the sink; collectd: values served to it
    served: int  # values the simulator encoded in the window (cross-check for ours)
    not_good: int
    sim_cpu_s: float

    @property
    def us_per_point(self) -> float | None:
        return 1e6 * self.cpu_s / self.points if self.points else None

    @property
    def polls_per_device_s(self) -> float:
        """How close to 1 Hz the poller kept every point (1.0 = all of them, every second)."""
        return self.points / (self.devices * self.points_per_device * self.window_s)

    @property
    def max_devices_1hz(self) -> int | None:
        us = self.us_per_point
        return int(1e6 / (us * self.points_per_device)) if us else None


# ---------------------------------------------------------------------------
# the fleet subprocess


class FleetProcess:
    """The simulator subprocess: endpoints on start, counts on request."""

    def __init__(self, size: FleetSize) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.poll", "--serve", *size.argv()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.endpoints: dict[str, list[dict[str, Any]]] = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleet server exited ({self.proc.wait()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def counts(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the server stops
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# our drivers


class CountingSink:
    """The cheapest sink there is: what we measure is polling, not a readings store."""

    def __init__(self) -> None:
        self.good = 0
        self.other = 0

    def __call__(self, readings: Sequence[Reading]) -> None:
        for r in readings:
            if r.quality is Quality.GOOD:
                self.good += 1
            else:
                self.other += 1


def device_params(protocol: str, endpoints: Sequence[dict[str, Any]]) -> list[DeviceParams]:
    if protocol == "modbus":
        return [
            DeviceParams(
                e["device"],
                "modbus",
                host=e["host"],
                port=e["port"],
                map_name=MODBUS_MAP,
                options={"unit_id": e["unit_id"]},
                period_s=PERIOD_S,
                timeout_s=TIMEOUT_S,
            )
            for e in endpoints
        ]
    return [
        DeviceParams(
            e["device"],
            "snmp",
            host=e["host"],
            port=e["port"],
            map_name=SNMP_MAP,
            options={"community": e["community"]},
            period_s=PERIOD_S,
            timeout_s=TIMEOUT_S,
        )
        for e in endpoints
    ]


async def _ours(
    protocol: str,
    fleet: FleetProcess,
    warmup_s: float,
    window_s: float,
    profiler: cProfile.Profile | None,
) -> Measure:
    logging.getLogger("pymodbus").setLevel(logging.NOTSET)
    params = device_params(protocol, fleet.endpoints[protocol])
    sink = CountingSink()
    settings = PollSettings(period_s=PERIOD_S, timeout_s=TIMEOUT_S)
    pollables = build_pollables(params)
    async with PollGroup(sink) as group:
        for target in pollables:
            group.add(target, settings)
        await asyncio.sleep(warmup_s)
        c0 = await asyncio.to_thread(fleet.counts)
        good0, other0, cpu0 = sink.good, sink.other, time.process_time()
        if profiler is not None:
            profiler.enable()
        await asyncio.sleep(window_s)
        if profiler is not None:
            profiler.disable()
        cpu1, good1, other1 = time.process_time(), sink.good, sink.other
        c1 = await asyncio.to_thread(fleet.counts)
        # Closing cancels the units behind a gateway one by one; the next unit may then
        # see the cancelled one's late reply, which pymodbus logs as an error and skips.
        # Shutdown noise, after the window: keep it off the report.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    return Measure(
        "ours",
        protocol,
        len(params),
        len(pollables[0].point_keys()) if pollables else 0,
        window_s,
        cpu1 - cpu0,
        good1 - good0,
        c1[f"{protocol}_points"] - c0[f"{protocol}_points"],
        other1 - other0,
        c1["cpu_s"] - c0["cpu_s"],
    )


def measure_ours(
    protocol: str,
    fleet: FleetProcess,
    warmup_s: float,
    window_s: float,
    profiler: cProfile.Profile | None = None,
) -> Measure:
    return asyncio.run(_ours(protocol, fleet, warmup_s, window_s, profiler))


# ---------------------------------------------------------------------------
# collectd


def measure_collectd(
    protocol: str,
    fleet: FleetProcess,
    warmup_s: float,
    window_s: float,
    read_threads: int,
) -> tuple[Measure, list[str]]:
    endpoints = fleet.endpoints[protocol]
    if protocol == "modbus":
        mmap = load_modbus_map(MODBUS_MAP)
        block, per_device = cd.modbus_block(mmap, endpoints), len(cd.modbus_points(mmap))
    else:
        smap = load_snmp_map(SNMP_MAP)
        block = cd.snmp_block(smap, endpoints, TIMEOUT_S)
        per_device = len(cd.snmp_points(smap))
    with tempfile.TemporaryDirectory(prefix="rackpower-collectd-") as tmp:
        workdir = Path(tmp)
        daemon = cd.Collectd(workdir, cd.config(workdir, protocol, block, read_threads))
        daemon.start()
        try:
            time.sleep(warmup_s)
            if not daemon.alive():
                raise RuntimeError(f"collectd exited: {daemon.problems()}")
            c0, cpu0 = fleet.counts(), daemon.cpu_s()
            time.sleep(window_s)
            cpu1, c1 = daemon.cpu_s(), fleet.counts()
        finally:
            daemon.stop()
            problems = daemon.problems()
    served = c1[f"{protocol}_points"] - c0[f"{protocol}_points"]
    measure = Measure(
        "collectd",
        protocol,
        len(endpoints),
        per_device,
        window_s,
        cpu1 - cpu0,
        served,
        served,
        0,
        c1["cpu_s"] - c0["cpu_s"],
    )
    return measure, problems


# ---------------------------------------------------------------------------
# report


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(measures: Sequence[Measure]) -> str:
    head = (
        f"{'protocol':8} {'poller':9} {'devices':>7} {'pts/dev':>7} {'Hz/pt':>6} "
        f"{'points':>8} {'CPU s':>7} {'us/point':>9} {'devices/core@1Hz':>17} "
        f"{'sim CPU s':>9}"
    )
    rows = [head, "-" * len(head)]
    for m in measures:
        rows.append(
            f"{m.protocol:8} {m.poller:9} {m.devices:7d} {m.points_per_device:7d} "
            f"{m.polls_per_device_s:6.2f} {m.points:8d} {m.cpu_s:7.3f} "
            f"{_fmt(m.us_per_point, '9.1f')} {_fmt(m.max_devices_1hz, '17,d')} "
            f"{m.sim_cpu_s:9.2f}"
        )
    return "\n".join(rows)


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def summary(protocol: str, ours: Measure, peer: Measure | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ours_cpu_us_per_point": _round(ours.us_per_point),
        "collectd_cpu_us_per_point": _round(peer.us_per_point) if peer else None,
        "ours_max_devices_1hz": ours.max_devices_1hz,
        "collectd_max_devices_1hz": peer.max_devices_1hz if peer else None,
        "devices": ours.devices,
        "ours_points_per_device": ours.points_per_device,
        "collectd_points_per_device": peer.points_per_device if peer else None,
        "ours_points": ours.points,
        "ours_not_good": ours.not_good,
        "ours_points_served": ours.served,
        "collectd_points": peer.points if peer else None,
        "ours_cpu_s": round(ours.cpu_s, 4),
        "collectd_cpu_s": round(peer.cpu_s, 4) if peer else None,
        "ours_polls_per_point_s": round(ours.polls_per_device_s, 3),
        "collectd_polls_per_point_s": round(peer.polls_per_device_s, 3) if peer else None,
        "window_s": ours.window_s,
        "goal_ratio_max": GOALS[protocol],
    }
    ratio = None
    if peer is not None and ours.us_per_point and peer.us_per_point:
        ratio = ours.us_per_point / peer.us_per_point
    out["ratio_ours_to_collectd"] = _round(ratio, 3)
    out["goal_met"] = None if ratio is None else ratio <= GOALS[protocol]
    return out


def _profile_report(profiler: cProfile.Profile, top: int) -> str:
    """The costliest functions by own time, without the event loop's idle wait (epoll),
    which would otherwise top the list while costing no CPU."""
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    idle_s = 0.0
    for key in [k for k in table if "select.epoll" in k[2] or "select.select" in k[2]]:
        idle_s += table.pop(key)[2]
    stats.total_tt -= idle_s  # type: ignore[attr-defined]
    buf.write(f"(idle wait left out: {idle_s:.2f} s)\n")
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.poll",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--shelves", type=int, default=50, help="Modbus rectifier shelves")
    parser.add_argument(
        "--shelves-per-gateway",
        type=int,
        default=10,
        help="unit ids behind one Modbus/TCP gateway port",
    )
    parser.add_argument("--pdus", type=int, default=100, help="SNMP v2c PDUs")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--protocols", default="modbus,snmp")
    parser.add_argument(
        "--collectd-read-threads",
        type=int,
        default=5,
        help="collectd's ReadThreads (its default is 5)",
    )
    parser.add_argument("--no-collectd", action="store_true", help="measure ours only")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, profile our poller (a separate window) and print "
        "the N costliest functions",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = FleetSize(args.shelves, args.shelves_per_gateway, args.pdus)
    if args.serve:
        return run_server(size)
    protocols = [p for p in args.protocols.split(",") if p]
    if any(p not in GOALS for p in protocols):
        parser.error(f"--protocols: choose from {sorted(GOALS)}")
    if not args.no_collectd and (why := cd.missing()) is not None:
        print(
            f"poll benchmark: {why}; `make system-deps` installs it, or pass --no-collectd",
            file=sys.stderr,
        )
        return 1

    started = time.monotonic()
    fleet = FleetProcess(size)
    measures: list[Measure] = []
    results: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    try:
        for protocol in protocols:
            ours = measure_ours(protocol, fleet, args.warmup_s, args.window_s)
            measures.append(ours)
            peer = None
            if not args.no_collectd:
                peer, problems = measure_collectd(
                    protocol,
                    fleet,
                    args.warmup_s + 1.0,
                    args.window_s,
                    args.collectd_read_threads,
                )
                measures.append(peer)
                for line in problems:
                    print(f"collectd ({protocol}): {line}", file=sys.stderr)
            results[protocol] = summary(protocol, ours, peer)
        if args.profile:
            for protocol in protocols:
                profiler = cProfile.Profile()
                measure_ours(protocol, fleet, 1.0, min(args.window_s, 5.0), profiler)
                profiles[protocol] = _profile_report(profiler, args.profile)
    finally:
        fleet.close()

    print(
        f"fleet: {size.shelves} shelves ({MODBUS_MAP}) behind "
        f"{-(-size.shelves // max(1, size.shelves_per_gateway))} gateways, {size.pdus} PDUs "
        f"({SNMP_MAP}); 1 Hz; window {args.window_s:g} s after {args.warmup_s:g} s warm-up"
    )
    print(table(measures))
    for protocol, r in results.items():
        ratio = r["ratio_ours_to_collectd"]
        if ratio is not None:
            verdict = "met" if r["goal_met"] else "MISSED"
            print(
                f"{protocol}: ours/collectd CPU per point = {ratio:.2f} "
                f"(goal <= {GOALS[protocol]:g}: {verdict})"
            )
    for protocol, text in profiles.items():
        print(f"\nprofile of our {protocol} poller (cProfile, by own time):\n{text}")
    print(f"took {time.monotonic() - started:.0f} s")
    if args.json:
        doc = {
            **results,
            "benchmark": "poll",
            "fleet": {
                "shelves": size.shelves,
                "shelves_per_gateway": size.shelves_per_gateway,
                "pdus": size.pdus,
                "modbus_map": MODBUS_MAP,
                "snmp_map": SNMP_MAP,
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
