"""One controller for a 40-rack row: cycle time, CPU and memory at a 1 s cycle.

Run: ``python -m benchmarks.scale [--json OUT] [--measure-s S] [--warmup-s S]``.

Four processes, as in production: a private Mosquitto; ``rackpower sim`` serving the
row's 80 Modbus power shelves (one gateway address per rack, two unit ids each) and 80
SNMP rack PDUs (A and B side, one community each) on ephemeral loopback ports; one
process with the 320 node agents (2,560 GPUs on fake NVML, each agent its own MQTT
connection, telemetry at ``--telemetry-hz``); and the controller (``run_service`` as
``rackpower run`` starts it: drivers, agent link and BMS over MQTT, HTTP API) at a 1 s
cycle. The site is written with the config's generators (``count``, ``{rack}``) into a
temporary directory; ``--keep-site DIR`` keeps it.

Every rack is metered by its A-side PDU; its B-side PDU and both shelves are polled
like the rest (full device maps) but meter no tree node. The simulator's plant runs its
default workloads at ``--sim-load`` of their demand, so the meters read below the GPU
side and the agents' telemetry drives the caps (their GPUs swing between compute and
communication and draw no more than the cap the agent set).

Reported after ``--warmup-s``, over ``--measure-s``: the cycle durations the daemon
records (p50/p99/max), its CPU (% of one core) and RSS (MB). Goals from the issue:
cycle p99 <= 250 ms, RSS <= 300 MB. Figures, not a pass/fail test: the machine may be
shared, and the simulator and agents compete for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from benchmarks._harness import private_mosquitto, proc_sample, write_json

GOAL_CYCLE_P99_S = 0.250
GOAL_RSS_MB = 300.0
CONTROLLER_ID = "rackpower-row40-bench"
RACKS = 40
SERVERS_PER_RACK = 8
GPUS_PER_SERVER = 8


def row_site(mqtt_url: str, racks: int = RACKS, telemetry_hz: float = 2.0) -> dict[str, Any]:
    """A 40-rack row of H100 servers, oversubscribed 1.27x per rack, as a config dict."""
    agent_period_s = 1.0 / telemetry_hz
    rack_max_w = SERVERS_PER_RACK * (2000 + GPUS_PER_SERVER * 700)
    rack_env_w = 48_000
    return {
        "site": "row40",
        "description": f"{racks}-rack row, {racks * SERVERS_PER_RACK * GPUS_PER_SERVER} GPUs,"
        f" racks {rack_max_w / rack_env_w:.2f}x oversubscribed (scale benchmark)",
        "gpu_models": {"h100-sxm": {"min_w": 200, "max_w": 700, "default_w": 700}},
        "trip_curves": {
            "breaker-c": {
                "points": [[1.05, 3600], [1.13, 600], [1.45, 60], [2.0, 10], [3.0, 2]],
                "instant_ratio": 5.0,
            }
        },
        "feeds": [
            {
                "id": "mv-1",
                "rating_w": racks * 60_000,
                "envelope_w": racks * 52_000,
                "trip_curve": "breaker-c",
            }
        ],
        "rows": [
            {
                "id": "row-1",
                "parent": "mv-1",
                "rating_w": racks * 55_000,
                "envelope_w": racks * 50_000,
                "trip_curve": "breaker-c",
                "racks": [{"id": "rack-{i:02d}", "count": racks, "template": "h100-8x8"}],
            }
        ],
        "rack_templates": {
            "h100-8x8": {
                "rating_w": 52_000,
                "envelope_w": rack_env_w,
                "trip_curve": "breaker-c",
                "meters": [{"device": "pdu-{rack}-a", "point": "power_w"}],
                "devices": [
                    {
                        "id": f"pdu-{{rack}}-{side}",
                        "driver": "snmp",
                        "address": "127.0.0.1:16161",  # one agent, a community per PDU
                        "community": f"{{rack}}-{side}",
                        "map": "apc-rpdu2",
                        "period_s": 1.0,
                        "timeout_s": 0.5,
                    }
                    for side in ("a", "b")
                ]
                + [
                    {
                        "id": "shelf-{rack}-{i}",
                        "count": 2,
                        "driver": "modbus",
                        "address": "127.0.0.1:15{rack_i:03d}",  # a gateway per rack
                        "unit_id": "{i}",
                        "map": "generic-hvdc-rectifier-800v",
                        "period_s": 1.0,
                        "timeout_s": 0.5,
                    },
                    {
                        "id": "agent-{rack}-n{i}",
                        "count": SERVERS_PER_RACK,
                        "driver": "agent",
                        "period_s": agent_period_s,
                        "timeout_s": agent_period_s / 2,
                    },
                ],
                "nodes": [
                    {
                        "id": "{rack}-n{i}",
                        "count": SERVERS_PER_RACK,
                        "gpus": GPUS_PER_SERVER,
                        "gpu_model": "h100-sxm",
                        "baseline_w": 2000,
                        "agent": "agent-{rack}-n{i}",
                    }
                ],
            }
        },
        "policy": {"name": "rackpower", "cycle_s": 1.0},
        "integrations": {
            "mqtt": {"url": mqtt_url},
            # Measured unsigned, as before signing was required (its agents are bare
            # MqttAgentLinks); sealing and opening cost ~10 us a message (agent-link.md).
            "agent_auth": {"allow_unsigned": True},
            "api": {"host": "127.0.0.1", "port": 0, "token_env": "RACKPOWER_API_TOKEN"},
        },
    }


class Procs:
    """Child processes started for the run, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )
        self.procs[name] = proc
        return proc

    def check(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.directory / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _wait_file(path: Path, procs: Procs, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        procs.check(name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: no {path.name} after {timeout_s:g} s")
        time.sleep(0.2)


def _post_json(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="rackpower-scale-") as tmp:
        yield Path(tmp)


def run(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    with _workdir(args.keep_site) as work, private_mosquitto() as broker:
        site = row_site(broker.url, args.racks, args.telemetry_hz)
        site_path = work / "row40.yaml"
        site_path.write_text(
            "# Generated by benchmarks/scale.py: a 40-rack row for the scale benchmark.\n"
            + yaml.safe_dump(site, sort_keys=False)
        )
        procs = Procs(work)
        try:
            endpoints = work / "endpoints.json"
            control = work / "control.json"
            print("  starting rackpower sim (160 meters on ephemeral ports)...", flush=True)
            procs.start("sim", [
                py, "-m", "controller.cli.sim_cmd", "--config", str(site_path),
                "--ephemeral-ports", "--endpoints-json", str(endpoints),
                "--control-file", str(control), "--seed", "1",
            ])  # fmt: skip
            _wait_file(endpoints, procs, "sim", 120)
            _wait_file(control, procs, "sim", 10)
            control_url = json.loads(control.read_text())["url"]
            _post_json(f"{control_url}/v1/load-step", {"scale": args.sim_load})
            n_devices = len(json.loads(endpoints.read_text()))

            print("  starting the node agents (MQTT, fake NVML)...", flush=True)
            ready = work / "agents-ready.json"
            procs.start("agents", [
                py, "-m", "benchmarks._scale_agents", "--site", str(site_path),
                "--mqtt", broker.url, "--controller-id", CONTROLLER_ID,
                "--telemetry-hz", str(args.telemetry_hz), "--ready-file", str(ready),
            ])  # fmt: skip
            _wait_file(ready, procs, "agents", 120)
            n_agents = json.loads(ready.read_text())["agents"]

            print(
                f"  starting the controller: {args.warmup_s:g} s warm-up,"
                f" {args.measure_s:g} s measured...",
                flush=True,
            )
            result = work / "controller.json"
            others0 = {n: proc_sample(procs.procs[n].pid) for n in ("sim", "agents")}
            t0 = time.monotonic()
            ctl = procs.start("controller", [
                py, "-m", "benchmarks._scale_controller", "--site", str(site_path),
                "--endpoints", str(endpoints), "--controller-id", CONTROLLER_ID,
                "--warmup-s", str(args.warmup_s), "--measure-s", str(args.measure_s),
                "--profile", str(args.profile), "--json", str(result),
            ])  # fmt: skip
            timeout_s = args.warmup_s + args.measure_s + 120
            try:
                ctl.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"controller still running after {timeout_s:g} s:\n"
                    + procs.log_tail("controller")
                ) from exc
            elapsed = time.monotonic() - t0
            others1 = {n: proc_sample(procs.procs[n].pid) for n in ("sim", "agents")}
            if not result.exists():
                raise RuntimeError("controller wrote no figures:\n" + procs.log_tail("controller"))
            out: dict[str, Any] = json.loads(result.read_text())
            if ctl.returncode != 0:
                raise RuntimeError(
                    f"controller exited {ctl.returncode}:\n" + procs.log_tail("controller")
                )
            out["others_cpu_pct_of_one_core"] = {
                n: round(100 * (others1[n].cpu_s - others0[n].cpu_s) / elapsed, 1) for n in others0
            }
            out["served_devices"] = n_devices
            out["agent_processes_agents"] = n_agents
            out["controller_log_tail"] = procs.log_tail("controller", 10)
            if args.keep_site is not None:
                out["site_file"] = str(site_path)
        finally:
            procs.stop_all()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--racks", type=int, default=RACKS)
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--measure-s", type=float, default=60.0)
    parser.add_argument(
        "--telemetry-hz", type=float, default=2.0, help="agent telemetry rate (1-10 Hz; default 2)"
    )
    parser.add_argument(
        "--sim-load", type=float, default=0.6, help="the simulator's demand scale (default 0.6)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="cProfile the controller while measuring; keep the N costliest",
    )
    parser.add_argument("--keep-site", type=Path, help="write the site and logs here and keep them")
    args = parser.parse_args(argv)
    if shutil.which("mosquitto") is None and not os.access("/usr/sbin/mosquitto", os.X_OK):
        parser.error("mosquitto is not installed (apt-get install mosquitto)")

    gpus = args.racks * SERVERS_PER_RACK * GPUS_PER_SERVER
    print(
        f"scale: {args.racks} racks, {gpus} GPUs, {args.racks * SERVERS_PER_RACK} agents over"
        f" MQTT, {2 * args.racks} Modbus shelves, {2 * args.racks} SNMP PDUs, 1 s cycle",
        flush=True,
    )
    out = run(args)
    p99, rss = out["cycle_p99_s"], out["rss_max_mb"]
    print(
        f"cycle over {out['cycles']} cycles: p50 {out['cycle_p50_s'] * 1e3:.1f} ms,"
        f" p99 {p99 * 1e3:.1f} ms, max {out['cycle_max_s'] * 1e3:.1f} ms,"
        f" overruns {out['overruns']}, skipped ticks {out['skipped_ticks']}"
        f" (goal p99 <= {GOAL_CYCLE_P99_S * 1e3:.0f} ms:"
        f" {'met' if p99 <= GOAL_CYCLE_P99_S else 'MISSED'})"
    )
    print(
        f"controller process: CPU {out['cpu_pct_of_one_core']:.1f} % of one core,"
        f" RSS {out['rss_mb']:.0f} MB (max {rss:.0f} MB, high-water {out['rss_peak_mb']:.0f} MB)"
        f" (goal <= {GOAL_RSS_MB:.0f} MB: {'met' if rss <= GOAL_RSS_MB else 'MISSED'})"
    )
    print(
        f"  saw {out['agents'] - out['agents_lost']}/{out['agents']} agents,"
        f" {out['devices_polled'] - out['devices_stale']}/{out['devices_polled']} devices fresh,"
        f" {out['capped_gpus']} GPUs capped; other processes:"
        f" sim {out['others_cpu_pct_of_one_core']['sim']} %,"
        f" agents {out['others_cpu_pct_of_one_core']['agents']} % of one core"
    )
    if out.get("profile_tottime"):
        print(out["profile_tottime"])
    out["p99_s"] = p99
    out["goal_cycle_p99_s"] = GOAL_CYCLE_P99_S
    out["goal_rss_mb"] = GOAL_RSS_MB
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
