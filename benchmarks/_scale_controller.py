"""The scale benchmark's controller: ``run_service`` alone in its own process, measured.

Run by ``benchmarks.scale`` as ``python -m benchmarks._scale_controller --site FILE
--endpoints EP.json --controller-id ID --json OUT``. It is the daemon as ``rackpower run``
starts it (drivers, agent link and BMS over MQTT, API), pointed at the simulator's
ephemeral ports from ``rackpower sim --endpoints-json``. After ``--warmup-s`` it measures
for ``--measure-s``: the cycle durations the daemon records (``Controller.cycle_stats``),
its CPU time and resident memory from /proc, and what it saw (agents, stale devices).

Imports only the controller (and the /proc helpers): the RSS measured is the daemon's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import logging
import os
import pstats
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import peak_rss_bytes, percentile, proc_sample, write_json
from controller.core.controller import Controller
from controller.model.config import Site
from controller.model.loader import load_site
from controller.service import ServiceOptions, run_service


def with_endpoints(site: Site, endpoints: list[dict[str, Any]]) -> Site:
    """The site with every served device's address where the simulator put it."""
    where = {e["device"]: f"{e['host']}:{e['port']}" for e in endpoints}
    devices = tuple(
        d.model_copy(update={"address": where[d.id]}) if d.id in where else d for d in site.devices
    )
    return dataclasses.replace(site, devices=devices)


async def run(args: argparse.Namespace, site: Site) -> dict[str, Any]:
    token_env = site.integrations.api.token_env
    if token_env and not os.environ.get(token_env):
        os.environ[token_env] = secrets.token_urlsafe(24)
    stop = asyncio.Event()
    holder: dict[str, Controller] = {}
    out: dict[str, Any] = {}

    def on_ready(controller: Controller, url: str | None) -> None:
        controller.controller_id = args.controller_id
        holder["controller"] = controller

    async def measure() -> None:
        try:
            await asyncio.sleep(args.warmup_s)
            ctl = holder["controller"]
            stats = ctl.cycle_stats
            c0, o0, s0 = stats.cycles, stats.overruns, stats.skipped_ticks
            p0, t0 = proc_sample(), time.monotonic()
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            rss_max = p0.rss_bytes
            end = t0 + args.measure_s
            while time.monotonic() < end:
                await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
                rss_max = max(rss_max, proc_sample().rss_bytes)
            if profiler is not None:
                profiler.disable()
            p1, t1 = proc_sample(), time.monotonic()
            n = stats.cycles - c0
            durations = stats.durations_s[-n:] if n else []
            now = time.monotonic()
            health = ctl.health()
            out.update(
                cycles=n,
                cycle_period_s=site.policy.cycle_s,
                cycle_p50_s=percentile(durations, 0.50),
                cycle_p99_s=percentile(durations, 0.99),
                cycle_max_s=max(durations) if durations else None,
                cycle_mean_s=sum(durations) / len(durations) if durations else None,
                cycle_durations_s=[round(d, 5) for d in durations],
                overruns=stats.overruns - o0,
                skipped_ticks=stats.skipped_ticks - s0,
                cpu_pct_of_one_core=100.0 * (p1.cpu_s - p0.cpu_s) / (t1 - t0),
                rss_mb=p1.rss_bytes / 2**20,
                rss_max_mb=rss_max / 2**20,
                rss_peak_mb=peak_rss_bytes() / 2**20,
                measured_s=t1 - t0,
                gpus=len(ctl.tree.gpus),
                agents=len(ctl.agents),
                agents_lost=len(ctl.lost_agents(now)),
                devices_polled=health.devices_total,
                devices_stale=health.devices_stale,
                capped_gpus=sum(c.gpu_count for c in ctl.caps()),
                stale_devices={
                    dev: err or "no fresh reading"
                    for dev, (is_stale, err) in sorted(
                        (ctl.device_health() if ctl.device_health else {}).items()
                    )
                    if is_stale
                },
            )
            if profiler is not None:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(
                    args.profile
                )
                out["profile"] = text.getvalue()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
                out["profile_tottime"] = text.getvalue()
        finally:
            stop.set()

    options = ServiceOptions(
        api_port=0,
        on_ready=on_ready,
        extra_tasks={"scale-measure": measure},
    )
    code = await run_service(site, options, stop)
    out["exit_code"] = code
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._scale_controller")
    p.add_argument("--site", required=True)
    p.add_argument("--endpoints", required=True)
    p.add_argument("--controller-id", required=True)
    p.add_argument("--warmup-s", type=float, default=20.0)
    p.add_argument("--measure-s", type=float, default=60.0)
    p.add_argument("--profile", type=int, default=0, help="keep the N costliest calls")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    site = with_endpoints(load_site(args.site), json.loads(Path(args.endpoints).read_text()))
    out = asyncio.run(run(args, site))
    write_json(Path(args.json), out)
    return 0 if out.get("exit_code") == 0 and "cycles" in out else 1


if __name__ == "__main__":
    sys.exit(main())
