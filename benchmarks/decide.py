"""Time of one ``decide`` call for 1,024 GPUs (the demo site scaled to 32 racks).

Run: ``python -m benchmarks.decide [--json OUT] [--policy NAME]...``. Prints median and
p99 wall time per call of each policy over a few hundred cycles of a noisy, swinging,
oversubscribed load, with the GPUs following the caps the policy set (so the timings
include cycles that emit actions, not only quiet ones).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import POLICIES, Job, PolicyState, Snapshot

DEMO = Path(__file__).resolve().parent.parent / "configs" / "sites" / "demo.yaml"


def scaled_demo_site(rows: int = 4, racks_per_row: int = 8) -> dict[str, Any]:
    """The demo hall with more rows and racks (4 x 8 racks x 4 nodes x 8 GPUs = 1,024)."""
    site: dict[str, Any] = copy.deepcopy(yaml.safe_load(DEMO.read_text(encoding="utf-8")))
    site["site"] = f"demo-{rows * racks_per_row}-racks"
    rack_w = 23_400.0
    row_env = 0.85 * racks_per_row * rack_w
    hall_env = 0.9 * rows * row_env
    site["devices"][1]["count"] = rows
    site["rows"][0]["count"] = rows
    site["rows"][0]["racks"][0]["count"] = racks_per_row
    site["rows"][0]["rating_w"] = row_env * 1.1
    site["rows"][0]["envelope_w"] = row_env
    site["buses"][0].update(rating_w=hall_env * 1.1, envelope_w=hall_env)
    site["ssts"][0].update(rating_w=hall_env * 1.15, envelope_w=hall_env * 1.05)
    site["feeds"][0].update(rating_w=hall_env * 1.3, envelope_w=hall_env * 1.1)
    return site


def run(policy: str, cycles: int, seed: int) -> dict[str, float]:
    tree = PowerTree(parse_site(scaled_demo_site(), "scaled-demo"))
    decide = POLICIES[policy]
    n = len(tree.gpus)
    rng = np.random.default_rng(seed)
    # One synchronous training job per rack, every fourth a batch job; 1 s iterations.
    per_rack = 32
    jobs = tuple(
        Job(
            id=f"job-{r}",
            priority_class="training" if r % 4 else "batch",
            gpus=tuple(range(r * per_rack, (r + 1) * per_rack)),
            synchronous=True,
            migratable=r % 4 == 0,
        )
        for r in range(n // per_rack)
    )
    max_w = np.array([g.max_w for g in tree.gpus])
    limit = max_w.copy()
    state: PolicyState | None = None
    times: list[float] = []
    actions = 0
    for c in range(cycles):
        now = c * 0.5
        phase = 0.95 if (now % 1.0) < 0.6 else 0.45
        demand = max_w * phase + rng.normal(0, 8, n)
        power = np.minimum(demand, limit)
        node_power = _meters(tree, power)
        snap = Snapshot.build(
            tree, now, gpu_power_w=power, gpu_limit_w=limit, jobs=jobs, node_power_w=node_power
        )
        t0 = time.perf_counter()
        out, state = decide(snap, tree, state)
        times.append(time.perf_counter() - t0)
        actions += len(out)
        limit = np.array(state.target_w)
    times_ms = sorted(1e3 * t for t in times[5:])
    return {
        "gpus": float(n),
        "cycles": float(cycles),
        "median_ms": statistics.median(times_ms),
        "p99_ms": times_ms[int(0.99 * (len(times_ms) - 1))],
        "max_ms": times_ms[-1],
        "actions": float(actions),
    }


def _meters(tree: PowerTree, power: np.ndarray) -> dict[str, float]:
    """What the site's meters would read: GPU power plus baselines, 3 % conversion loss."""
    cs = np.concatenate(([0.0], np.cumsum(power)))
    out: dict[str, float] = {}
    for nid in tree.constraint_nodes():
        node = tree.node(nid)
        if not node.meters:
            continue
        first, stop = tree.gpu_range(nid)
        base = tree.floor_draw_w(nid) - sum(g.floor_w for g in tree.gpus[first:stop])
        out[nid] = 1.03 * float(cs[stop] - cs[first] + base)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decide", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES))
    parser.add_argument("--cycles", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    results = {name: run(name, args.cycles, args.seed) for name in args.policy or sorted(POLICIES)}
    for name, r in results.items():
        print(
            f"{name:>10}: decide for {int(r['gpus'])} GPUs: median {r['median_ms']:.2f} ms,"
            f" p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms"
            f" ({int(r['actions'])} actions in {int(r['cycles'])} cycles)"
        )
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "decide", "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
