"""Scenario speed: an hour of 1,024 GPUs at 100 ms steps, the policy every 500 ms.

Run: ``python -m benchmarks.speed [--json OUT] [--policy NAME] [--duration-s S]``.
Prints how many times faster than real time the whole scenario loop runs on one core
(plant, scheduler and workloads, telemetry, the policy, the figures and the work bound:
everything ``rackpower scenario run`` does; then with the bound priced every step, and
without it), and the time of one ``decide`` for 1,024
GPUs from ``benchmarks.decide``. Goals from the issue: >= 200x real time, decide < 5 ms.
Figures, not a pass/fail test: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path
from typing import Any

from benchmarks.decide import run as decide_run
from benchmarks.decide import scaled_demo_site
from sim.scenario import run_policy
from sim.scenario_spec import Scenario, parse_scenario


def speed_scenario(duration_s: float = 3600.0, seed: int = 11) -> Scenario:
    """The demo hall scaled to 32 racks (1,024 GPUs), busy with mixed work for an hour."""
    doc: dict[str, Any] = {
        "name": "speed-1024",
        "description": "1,024 GPUs: 22 training jobs, Azure-trace inference, batch",
        "site": scaled_demo_site(),
        "seed": seed,
        "duration_s": duration_s,
        "step_s": 0.1,
        "policy_cycle_s": 0.5,
        "workloads": {
            "training": [{"id": "train-{i}", "count": 22, "gpus": 32}],
            "inference": [{"id": "chat", "gpus": 192, "gpus_per_replica": 8, "scale": 8.0}],
            "batch": [{"id": "batch-{i}", "count": 4, "gpus": 32}],
        },
        "events": [
            {"at_s": min(900.0, duration_s / 4), "kind": "load_step", "factor": 1.1},
        ],
    }
    return parse_scenario(doc, "benchmarks/speed.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--policy", default="rackpower")
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--decide-cycles", type=int, default=400)
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest calls")
    args = parser.parse_args(argv)

    scenario = speed_scenario(args.duration_s)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    result = run_policy(scenario, args.policy)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    steps = round(result["sim_s"] / 0.1)
    speed = _report("everything (bound re-priced every policy cycle: the default)", result, steps)
    print(
        f"  trips {result['trips']}, work {result['work_delivered']['total'] / 3600:.1f} GPU-h"
        f" of {result['oracle_work'] / 3600:.1f} bound,"
        f" {result['cap_changes_per_gpu_min']:.2f} cap changes per GPU per minute"
    )
    tight = run_policy(scenario, args.policy, reprice_every=1)
    tight_speed = _report("bound re-priced every step (usually tighter)", tight, steps)
    looser = 100 * (result["oracle_work"] / tight["oracle_work"] - 1)
    print(f"  bound {tight['oracle_work'] / 3600:.1f} GPU-h (the default's is {looser:+.2f} %)")
    lean = run_policy(scenario, args.policy, work_bound=False)
    lean_speed = _report("without the work bound", lean, steps)
    decide = decide_run("rackpower", args.decide_cycles, seed=1)
    print(
        f"decide for {int(decide['gpus'])} GPUs: median {decide['median_ms']:.2f} ms,"
        f" p99 {decide['p99_ms']:.2f} ms (goal < 5 ms)"
    )
    if args.json:
        out = {
            "benchmark": "speed",
            "scenario": scenario.name,
            "gpus": int(decide["gpus"]),
            "x_real_time": round(speed, 1),
            "x_real_time_bound_every_step": round(tight_speed, 1),
            "x_real_time_without_bound": round(lean_speed, 1),
            "ms_per_step": round(1e3 * result["wall_s"] / steps, 3),
            "decide_median_ms": round(decide["median_ms"], 3),
            "decide_p99_ms": round(decide["p99_ms"], 3),
            "result": result,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


def _report(what: str, result: dict[str, Any], steps: int) -> float:
    speed = float(result["sim_s"] / result["wall_s"])  # a ratio: simulated s per wall s
    print(
        f"{what}: {result['sim_s']:.0f} s of 1,024 GPUs simulated in {result['wall_s']:.1f} s"
        f" = {speed:.0f}x real time ({1e3 * result['wall_s'] / steps:.2f} ms per 100 ms step;"
        f" goal >= 200x)"
    )
    return speed


if __name__ == "__main__":
    sys.exit(main())
