"""TSDB volume at hall scale: what the schema's two rates cost (docs/tsdb-schema.md).

Run: ``python -m benchmarks.tsdb_points [--rows 32] [--racks-per-row 32]``. The demo hall
scaled to 1,024 racks, 4,096 GPU servers and 32,768 GPUs at a 0.5 s cycle, one job per
rack. Prints points and field values per second as written, the controller's time to
build one cycle's points and to serialise them (the writer thread's share; CPU time of
this process, so a shared machine's load does not inflate it), and the same
for the alternative the schema rejects: every GPU every cycle. Figures, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.decide import scaled_demo_site
from controller.core.controller import Controller
from controller.core.cycle_points import CyclePoints, detail_every
from controller.core.points import Point
from controller.model.loader import parse_site
from controller.policy import Job, Snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tsdb_points")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--racks-per-row", type=int, default=32)
    args = parser.parse_args(argv)
    site = parse_site(scaled_demo_site(args.rows, args.racks_per_row), "scaled-demo")
    ctl = Controller(site, controller_id="bench")
    tree = ctl.tree
    n = len(tree.gpus)
    racks = tree.of_kind("rack")
    jobs = tuple(
        Job(f"job-{r}", "training", tuple(int(g) for g in tree.gpu_indices(rid)))
        for r, rid in enumerate(racks)
    )
    ctl.jobs_provider = lambda: jobs
    ctl.run_cycle(time.monotonic())  # a policy state to write
    t0 = time.process_time()
    for _ in range(3):
        ctl.run_cycle(time.monotonic())
    cycle_ms = (time.process_time() - t0) / 3 * 1e3  # for scale: a cycle without the TSDB
    assert ctl.policy_state is not None
    rng = np.random.default_rng(1)
    snap = Snapshot.build(
        tree,
        time.monotonic(),
        gpu_power_w=rng.uniform(300, 700, n),
        gpu_limit_w=np.full(n, 700.0),
        node_power_w={nid: 20_000.0 for nid in racks},
        jobs=jobs,
    )
    cycle_s = site.policy.cycle_s
    every = detail_every(cycle_s)
    estimated_w = ctl._estimates(snap)  # the daemon computes these anyway, for the API
    device_stale = {d.id: False for d in site.devices}

    def measure(builder: CyclePoints, cycles: int) -> tuple[list[float], list[float], int, int]:
        build_ms, line_ms, points, fields = [], [], 0, 0
        for k in range(cycles):
            t0 = time.process_time()
            pts: list[Point] = builder.build(
                site=site,
                tree=tree,
                status=ctl.policy_state.nodes,  # type: ignore[union-attr]
                snap=snap,
                target_w=ctl.policy_state.target_w,  # type: ignore[union-attr]
                gpu_max_w=ctl._gpu_max_w,
                estimated_w=estimated_w,
                reserved_w={},
                mode="enforce",
                cycle_stats=ctl.cycle_stats,
                action_counts={},
                devices={},
                device_stale=device_stale,
                ts_ns=time.time_ns() + k,
            )
            t1 = time.process_time()
            for p in pts:
                p.to_line()
            t2 = time.process_time()
            build_ms.append((t1 - t0) * 1e3)
            line_ms.append((t2 - t1) * 1e3)
            points += len(pts)
            fields += sum(len(p.fields) for p in pts)
        return build_ms, line_ms, points, fields

    print(
        f"{len(racks)} racks, {len(tree.of_kind('node'))} servers, {n} GPUs,"
        f" cycle {cycle_s} s, detail every {every} cycles;"
        f" one control cycle without the TSDB: {cycle_ms:.0f} ms CPU"
    )
    for label, builder in (
        ("as written (detail every 5 s, spread)", CyclePoints()),
        ("rejected: everything every cycle", CyclePoints(detail_period_s=cycle_s)),
    ):
        build_ms, line_ms, points, fields = measure(builder, every)
        per_s = 1 / (every * cycle_s)
        print(
            f"{label}: {points * per_s:,.0f} points/s, {fields * per_s:,.0f} field values/s;"
            f" build per cycle mean {statistics.mean(build_ms):.1f} ms"
            f" max {max(build_ms):.1f} ms; serialise per cycle mean"
            f" {statistics.mean(line_ms):.1f} ms max {max(line_ms):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
