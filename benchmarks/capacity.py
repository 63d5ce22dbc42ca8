"""Capacity: how many more racks fit under the same facility envelope, per policy.

Run: ``python -m benchmarks.capacity --json OUT [--png OUT.png] [--quick]``.

The question an operator asks before buying racks. A hall is fixed: two rows under one
800 V bus, SST and MV feed, every envelope above the racks sized so that twenty 16-GPU
racks fit at nameplate (every GPU at its maximum plus every server's baseline, through
each node's conversion loss at full load). Racks are then added under those same
envelopes, 1.0x to 2.0x of the nameplate fit, one per row per 0.1x; each rack keeps its
own envelope at its own nameplate (a rack alone can never overdraw), so what binds is
the row and the hall. Every point runs a production-like mix (training with
checkpoints, in two waves; Azure-trace inference at the peak of its daily cycle; batch;
half the GPUs free: uncapped, the hall draws about 54 % of what is provisioned) under
each policy, and once under ``none`` on the same racks with every envelope and rating
raised tenfold: the uncapped reference, which can never trip.

A point *holds* for a policy when all of these do:

- zero trips;
- no breaker past its allowance: ``worst_i2t_pct`` (the fill of the plant's
  trip-curve integrator, 100 = trip) below :data:`I2T_ALLOWANCE_PCT`. Time over an
  envelope is reported (``seconds_over_envelope``) but is not itself a failure: an
  envelope sits below the breaker's rating, and the trip curve is the allowance;
- mean job slowdown against uncapped at most :data:`MAX_SLOWDOWN_PCT`, read two ways:
  over every job (``max_oversubscription``), and over the jobs of every class but the
  lowest (``max_oversubscription_above_lowest``), since strict priority has the lowest
  class pay for the others first. Both are printed; they differ only for a policy with
  priorities.

``max_oversubscription`` is the largest point up to which every point holds (a capacity
nobody can claim if a smaller hall fails). Slowdown is ``100 * (1 - work / uncapped
work)`` per job type (training: progress, whose shortfall is the extra run time;
inference and batch: work served), averaged over the jobs, each job weighted by its
type's figure: the scenario runner reports work per priority class, one class per type
here, not per job.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from controller.model.topology import PowerTree
from drivers.shipped import config_path
from sim.scenario import job_specs, run_policy
from sim.scenario_spec import InferenceSpec, Scenario, TrainingSpec, parse_scenario
from sim.scheduler import SchedulerConfig, SimScheduler

POLICIES = ("rackpower", "static", "three-band")
REFERENCE = "none"
I2T_ALLOWANCE_PCT = 100.0
MAX_SLOWDOWN_PCT = 3.0
RACKS_AT_NAMEPLATE = 20  # two rows of ten: a 0.1x step adds one rack to each row
ROWS = 2
NODES_PER_RACK = 2  # 16-GPU racks, 15.2 kW at nameplate
GPUS_PER_NODE = 8
GPU_MAX_W = 700.0
BASELINE_W = 2000.0
RELAXED = 10.0  # the reference run's envelopes and ratings, times the real ones
FULL_POINTS = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))
QUICK_POINTS = (1.0, 1.5, 2.0)
FULL_DURATION_S = 3600.0
QUICK_DURATION_S = 120.0
SEED = 13
TRAINING_SHARE = 0.20  # of the GPUs; the rest of the mix below, the remainder free
INFERENCE_SHARE = 0.25
BATCH_SHARE = 0.05
REQUESTS_PER_REPLICA_S = 1.0  # at the daily peak
AZURE_RATE_PER_S = 5.4  # the vendored Azure conversation trace's mean rate (scale 1)

#: What a job type is called in the scenario's workloads, and its priority class.
JOB_TYPES = ("training", "inference", "batch")


def _full_load_efficiency(points: Sequence[Sequence[float]]) -> float:
    return float(points[-1][1])


def capacity_site(n_racks: int, relaxed: bool = False) -> dict[str, Any]:
    """The demo hall's parts with ``n_racks`` racks under envelopes fixed for
    :data:`RACKS_AT_NAMEPLATE`.

    Racks go to the rows alternately (row 1 gets the odd one), so a row can be one rack
    further oversubscribed than the hall. ``relaxed`` raises every envelope and rating
    ``RELAXED`` times: the uncapped reference, on the same racks, GPUs and jobs.
    """
    demo = yaml.safe_load((config_path("sites") / "demo.yaml").read_text(encoding="utf-8"))
    site: dict[str, Any] = copy.deepcopy(demo)
    template = site["rack_templates"]["h100-rack"]
    server_w = BASELINE_W + GPUS_PER_NODE * GPU_MAX_W
    rack_in_w = NODES_PER_RACK * server_w / _full_load_efficiency(template["efficiency"]["points"])
    row_proto = site["rows"][0]
    row_eff = _full_load_efficiency(row_proto["efficiency"]["points"])
    per_row_fit = RACKS_AT_NAMEPLATE / ROWS
    row_env_w = per_row_fit * rack_in_w / row_eff
    bus_env_w = ROWS * row_env_w  # the bus converts nothing
    sst_env_w = bus_env_w / _full_load_efficiency(site["ssts"][0]["efficiency"]["points"])
    k = RELAXED if relaxed else 1.0

    template["nodes"][0]["count"] = NODES_PER_RACK
    for dev in template["devices"]:
        if dev["driver"] == "agent":
            dev["count"] = NODES_PER_RACK
    template["envelope_w"] = round(k * rack_in_w)
    template["rating_w"] = round(k * rack_in_w * 1.1)
    rows = []
    for r in range(ROWS):
        count = n_racks // ROWS + (1 if r < n_racks % ROWS else 0)
        row = copy.deepcopy(row_proto)
        row.pop("count", None)
        row["id"] = f"row-{r + 1}"
        row["envelope_w"] = round(k * row_env_w)
        row["rating_w"] = round(k * row_env_w * 1.1)
        row["meters"] = [{"device": f"shelf-row-{r + 1}", "point": "input_power_w"}]
        row["racks"][0]["count"] = count
        rows.append(row)
    site["rows"] = rows
    site["buses"][0].update(envelope_w=round(k * bus_env_w), rating_w=round(k * bus_env_w * 1.1))
    site["ssts"][0].update(envelope_w=round(k * sst_env_w), rating_w=round(k * sst_env_w * 1.15))
    site["feeds"][0].update(envelope_w=round(k * sst_env_w), rating_w=round(k * sst_env_w * 1.3))
    site["site"] = f"capacity-{n_racks}-racks{'-relaxed' if relaxed else ''}"
    site["description"] = f"{n_racks} racks under envelopes sized for {RACKS_AT_NAMEPLATE}"
    return site


def workloads(n_racks: int, duration_s: float) -> dict[str, list[dict[str, Any]]]:
    """A production-like mix for ``n_racks`` racks: about 20 % of GPUs training, 25 %
    inference, 5 % batch, the rest free (average draw 30-60 % of provisioned; 54 %).

    Training comes in 32-GPU jobs (two racks' worth: they span racks) and 16-GPU jobs;
    every other one arrives a third of the way in (a wave). Inference is one Azure-trace
    service of 8-GPU replicas at about one request per second per replica, at the peak
    hour of a daily cycle (the hour a capacity plan must survive). Nothing finishes
    inside the run, so work delivered is progress and slowdown is extra run time.
    """
    gpus = n_racks * NODES_PER_RACK * GPUS_PER_NODE
    train_gpus = int(TRAINING_SHARE * gpus) // 16 * 16
    n32, n16 = train_gpus // 64, (train_gpus - 32 * (train_gpus // 64)) // 16
    infer_gpus = max(8, int(INFERENCE_SHARE * gpus) // 8 * 8)
    batch_gpus = max(8, int(BATCH_SHARE * gpus) // 8 * 8)
    wave_s = round(duration_s / 3.0, 1)
    training: list[dict[str, Any]] = []
    for i in range(n32):
        training.append(
            {"id": f"train-32-{i + 1}", "gpus": 32, "submit_s": 0.0 if i % 2 == 0 else wave_s}
        )
    for i in range(n16):
        training.append(
            {"id": f"train-16-{i + 1}", "gpus": 16, "submit_s": 0.0 if i % 2 == 0 else wave_s}
        )
    replicas = infer_gpus // 8
    return {
        "training": training,
        "inference": [
            {
                "id": "chat",
                "gpus": infer_gpus,
                "gpus_per_replica": 8,
                "scale": round(REQUESTS_PER_REPLICA_S * replicas / AZURE_RATE_PER_S, 3),
                "daily_amplitude": 0.4,
                "start_hour": 14.0,
            }
        ],
        "batch": [{"id": "batch-{i}", "count": batch_gpus // 8, "gpus": 8}],
    }


def capacity_scenario(
    oversubscription: float, duration_s: float, relaxed: bool = False, seed: int = SEED
) -> Scenario:
    """The hall at ``oversubscription`` times the nameplate fit, as a validated scenario."""
    n_racks = racks_at(oversubscription)
    doc: dict[str, Any] = {
        "name": f"capacity-{oversubscription:.1f}x{'-uncapped' if relaxed else ''}",
        "description": f"{n_racks} racks under envelopes sized for {RACKS_AT_NAMEPLATE}",
        "site": capacity_site(n_racks, relaxed),
        "seed": seed,
        "duration_s": duration_s,
        "step_s": 0.1,
        "workloads": workloads(n_racks, duration_s),
    }
    return parse_scenario(doc, "benchmarks/capacity.py")


def racks_at(oversubscription: float) -> int:
    return round(RACKS_AT_NAMEPLATE * oversubscription)


def job_counts(scenario: Scenario) -> dict[str, int]:
    """Jobs per type (= per priority class here)."""
    w = scenario.spec.workloads
    return {
        "training": sum(e.count or 1 for e in w.training),
        "inference": sum(e.count or 1 for e in w.inference),
        "batch": sum(e.count or 1 for e in w.batch),
    }


def mean_draw_fraction(scenario: Scenario, step_s: float = 0.5) -> float:
    """Average uncapped draw (GPU demand plus baselines) over provisioned (nameplate):
    the scheduler's demand stepped alone, no plant, no losses."""
    tree = PowerTree(scenario.site)
    classes = tuple(c.name for c in scenario.site.policy.priority_classes)
    w = scenario.spec.workloads
    entries: list[TrainingSpec | InferenceSpec] = [*w.training, *w.inference, *w.batch]
    specs = [js for e in entries for js in job_specs(e)]
    sched = SimScheduler(
        tree, specs, seed=scenario.spec.seed, config=SchedulerConfig(priority_classes=classes)
    )
    n = len(tree.gpus)
    nameplate_w = sum(tree.max_draw_w(root) for root in tree.roots)
    base_w = nameplate_w - float(sched.max_w.sum())
    dark = np.zeros(n, dtype=bool)
    total_w = 0.0
    steps = max(1, round(scenario.spec.duration_s / step_s))
    for i in range(steps):
        t = i * step_s
        demand = sched.demand_w(t)
        sched.advance(t, step_s, demand, dark)
        total_w += float(demand.sum()) + base_w
    return total_w / steps / nameplate_w


# -- judging ------------------------------------------------------------------------------


def slowdown_pct(
    work: Mapping[str, float], uncapped: Mapping[str, float], jobs: Mapping[str, int]
) -> tuple[float, dict[str, float]]:
    """Mean slowdown over jobs, and per job type: ``100 * (1 - work / uncapped work)``."""
    per_type: dict[str, float] = {}
    for kind in JOB_TYPES:
        ref = uncapped.get(kind, 0.0)
        if jobs.get(kind, 0) and ref > 0:
            per_type[kind] = 100.0 * (1.0 - work.get(kind, 0.0) / ref)
    return _mean(per_type, jobs), per_type


def slowdown_above_lowest_pct(per_type: Mapping[str, float], jobs: Mapping[str, int]) -> float:
    """Mean slowdown over the jobs of every class but the lowest present.

    Strict priority means the lowest class pays for the others first (the issue's own
    rule); this is the reading of the goal that rule allows. Types are in class order.
    """
    present = [k for k in JOB_TYPES if k in per_type]
    return _mean({k: per_type[k] for k in present[:-1]}, jobs) if len(present) > 1 else 0.0


def _mean(per_type: Mapping[str, float], jobs: Mapping[str, int]) -> float:
    n = sum(jobs[k] for k in per_type)
    return sum(jobs[k] * v for k, v in per_type.items()) / n if n else 0.0


def holds(point: Mapping[str, Any], key: str = "slowdown_pct") -> bool:
    """Zero trips, no breaker past its allowance, mean slowdown (``key``) within the goal."""
    return (
        int(point["trips"]) == 0
        and float(point["worst_i2t_pct"]) < I2T_ALLOWANCE_PCT
        and float(point[key]) <= MAX_SLOWDOWN_PCT
    )


def holds_above_lowest(point: Mapping[str, Any]) -> bool:
    """:func:`holds`, with the lowest class free to pay (``slowdown_above_lowest_pct``)."""
    return holds(point, "slowdown_above_lowest_pct")


def max_oversubscription(
    points: Iterable[Mapping[str, Any]], ok: Callable[[Mapping[str, Any]], bool] = holds
) -> float | None:
    """The largest oversubscription up to which every point holds; None if the first fails.

    A point that holds above one that fails does not count: an operator cannot buy the
    bigger hall if a smaller one trips.
    """
    best: float | None = None
    for p in sorted(points, key=lambda p: float(p["oversubscription"])):
        if not ok(p):
            break
        best = float(p["oversubscription"])
    return best


# -- running ------------------------------------------------------------------------------


def _run_one(task: tuple[float, str, float]) -> tuple[float, str, dict[str, Any]]:
    """One (point, policy) run in a worker process; the reference runs on the relaxed hall."""
    x, policy, duration_s = task
    scenario = capacity_scenario(x, duration_s, relaxed=policy == REFERENCE)
    result = run_policy(scenario, policy, work_bound=False)
    result["jobs"] = job_counts(scenario)
    result["racks"] = racks_at(x)
    result["gpus"] = len(scenario.site.nodes) and sum(
        1 for n in scenario.site.nodes if n.kind == "gpu"
    )
    return x, policy, result


def sweep(
    points: Sequence[float],
    duration_s: float,
    policies: Sequence[str] = POLICIES,
    processes: int = 2,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Every policy and the uncapped reference at every point; the JSON document."""
    tasks = [(x, p, duration_s) for x in points for p in (REFERENCE, *policies)]
    raw: dict[tuple[float, str], dict[str, Any]] = {}
    wall0 = time.perf_counter()
    if processes <= 1:
        done: Iterable[tuple[float, str, dict[str, Any]]] = map(_run_one, tasks)
        for k, (x, p, r) in enumerate(done, 1):
            raw[(x, p)] = r
            log(f"  [{k}/{len(tasks)}] {x:.1f}x {p}: {r['wall_s']:.1f} s")
    else:
        with ProcessPoolExecutor(max_workers=min(2, processes)) as pool:
            futures = [pool.submit(_run_one, t) for t in tasks]
            for k, fut in enumerate(as_completed(futures), 1):
                x, p, r = fut.result()
                raw[(x, p)] = r
                log(f"  [{k}/{len(tasks)}] {x:.1f}x {p}: {r['wall_s']:.1f} s")
    out: dict[str, Any] = {
        "benchmark": "capacity",
        "duration_s": duration_s,
        "racks_at_nameplate": RACKS_AT_NAMEPLATE,
        "criteria": {
            "trips": 0,
            "worst_i2t_pct_below": I2T_ALLOWANCE_PCT,
            "max_slowdown_pct": MAX_SLOWDOWN_PCT,
        },
        "reference": {
            f"{x:.1f}": {
                "trips": raw[(x, REFERENCE)]["trips"],
                "work_delivered": raw[(x, REFERENCE)]["work_delivered"],
            }
            for x in points
        },
        "policies": {},
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    for p in policies:
        rows = []
        for x in points:
            r, ref = raw[(x, p)], raw[(x, REFERENCE)]
            mean, per_type = slowdown_pct(r["work_delivered"], ref["work_delivered"], r["jobs"])
            above = slowdown_above_lowest_pct(per_type, r["jobs"])
            rows.append(
                {
                    "oversubscription": x,
                    "racks": r["racks"],
                    "gpus": r["gpus"],
                    "trips": r["trips"],
                    "seconds_over_envelope": r["seconds_over_envelope"],
                    "worst_i2t_pct": r["worst_i2t_pct"],
                    "max_overshoot_pct": r["max_overshoot_pct"],
                    "slowdown_pct": round(mean, 3),
                    "slowdown_above_lowest_pct": round(above, 3),
                    "slowdown_by_type_pct": {k: round(v, 3) for k, v in per_type.items()},
                    "work_delivered": r["work_delivered"]["total"],
                    "work_uncapped": ref["work_delivered"]["total"],
                    "cap_changes_per_gpu_min": r["cap_changes_per_gpu_min"],
                    "holds": holds({**r, "slowdown_pct": mean}),
                    "holds_above_lowest": holds({**r, "slowdown_pct": above}),
                }
            )
        out["policies"][p] = {
            "max_oversubscription": max_oversubscription(rows),
            "max_oversubscription_above_lowest": max_oversubscription(rows, holds_above_lowest),
            "points": rows,
        }
    return out


# -- output -------------------------------------------------------------------------------


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """Slowdown against oversubscription per policy, the 3 % line, a cross for each trip."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a build machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    panels = (
        (axes[0], "slowdown_pct", "max_oversubscription", "every job"),
        (
            axes[1],
            "slowdown_above_lowest_pct",
            "max_oversubscription_above_lowest",
            "every class but the lowest (strict priority)",
        ),
    )
    for ax, key, cap_key, title in panels:
        for name, pol in doc["policies"].items():
            pts = pol["points"]
            xs = [p["oversubscription"] for p in pts]
            ys = [p[key] for p in pts]
            cap = pol[cap_key]
            label = f"{name} (max {cap:.1f}x)" if cap is not None else f"{name} (none holds)"
            (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=label)
            tx = [p["oversubscription"] for p in pts if p["trips"]]
            ty = [p[key] for p in pts if p["trips"]]
            if tx:
                ax.scatter(tx, ty, marker="x", s=80, color=line.get_color(), zorder=3)
        ax.axhline(MAX_SLOWDOWN_PCT, color="grey", linestyle="--", linewidth=1)
        ax.text(1.0, MAX_SLOWDOWN_PCT, f" {MAX_SLOWDOWN_PCT:g} % goal", va="bottom", color="grey")
        ax.scatter([], [], marker="x", color="black", label="trip")
        ax.set_xlabel("racks / racks that fit at nameplate (same row and hall envelopes)")
        ax.set_title(f"mean slowdown: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("mean job slowdown vs uncapped (%)")
    fig.suptitle(f"Capacity: {doc['duration_s']:g} s of a production-like mix per point")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(doc: Mapping[str, Any]) -> list[str]:
    """One line per point and policy, then each policy's capacity beside the anchors."""
    lines = [
        f"{'policy':<11} {'x':>4} {'racks':>5} {'trips':>5} {'s over':>7} {'i2t %':>6}"
        f" {'slow %':>7} {'above lowest %':>14}  holds (all / above lowest)"
    ]
    for name, pol in doc["policies"].items():
        for p in pol["points"]:
            lines.append(
                f"{name:<11} {p['oversubscription']:>4.1f} {p['racks']:>5} {p['trips']:>5}"
                f" {p['seconds_over_envelope']:>7.1f} {p['worst_i2t_pct']:>6.1f}"
                f" {p['slowdown_pct']:>7.2f} {p['slowdown_above_lowest_pct']:>14.2f}"
                f"  {'yes' if p['holds'] else 'no'} / {'yes' if p['holds_above_lowest'] else 'no'}"
            )
    caps = ", ".join(
        f"{name} {_fmt(pol['max_oversubscription'])}" for name, pol in doc["policies"].items()
    )
    above = ", ".join(
        f"{name} {_fmt(pol['max_oversubscription_above_lowest'])}"
        for name, pol in doc["policies"].items()
    )
    lines.append(
        f"max oversubscription, every job's mean slowdown <= 3 %: {caps}"
        " (anchors: POLCA 1.3x, DPS MaxLPS 1.33x; goal rackpower >= 1.4x)"
    )
    lines.append(f"max oversubscription, the lowest class paying (strict priority): {above}")
    return lines


def _fmt(x: float | None) -> str:
    return f"{x:.1f}x" if x is not None else "none"


def _points(text: str) -> tuple[float, ...]:
    try:
        xs = tuple(sorted({round(float(v), 1) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not xs or any(x < 0.1 for x in xs):
        raise argparse.ArgumentTypeError(f"need oversubscriptions of at least 0.1: {text!r}")
    return xs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument(
        "--quick", action="store_true", help=f"points {QUICK_POINTS}, {QUICK_DURATION_S:g} s each"
    )
    parser.add_argument("--duration-s", type=float, help="simulated seconds per run")
    parser.add_argument(
        "--points", type=_points, help="oversubscriptions to run, e.g. 1.0,1.4 (multiples of 0.1)"
    )
    parser.add_argument("--processes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--policy", action="append", choices=POLICIES)
    args = parser.parse_args(argv)
    points = args.points or (QUICK_POINTS if args.quick else FULL_POINTS)
    duration_s = args.duration_s or (QUICK_DURATION_S if args.quick else FULL_DURATION_S)
    policies = tuple(args.policy or POLICIES)
    first = capacity_scenario(points[0], duration_s, relaxed=True)
    draw = mean_draw_fraction(first)
    print(
        f"capacity: {len(points)} points x {len(policies) + 1} runs of {duration_s:g} s;"
        f" uncapped mean draw at {points[0]:.1f}x: {100 * draw:.0f} % of provisioned",
        file=sys.stderr,
        flush=True,
    )
    doc = sweep(points, duration_s, policies, processes=args.processes)
    doc["mean_draw_pct_of_provisioned"] = round(100 * draw, 1)
    for line in summary(doc):
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(doc, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
