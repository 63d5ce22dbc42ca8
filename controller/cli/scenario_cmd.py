"""``rackpower scenario run FILE [--policy NAME]... [--json OUT] [--check]``, ``scenario validate``.

Policies on one seeded plant. The one place (with ``demo``) where the controller reaches
into the simulator: ``sim`` is imported inside the handler, so the daemon never loads it.
Exit codes: 0 ran (and, with ``--check``, rackpower met every gate), 2 bad scenario or
arguments (every problem on stderr with file and path), 1 a ``--check`` gate failed or
anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.model.config import ConfigError
from controller.policy import POLICIES

if TYPE_CHECKING:
    from sim.scenario_spec import Scenario

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2

METRICS_HELP = """\
figures (per policy, measured on the plant's true state):
  trips                     breakers that tripped (a failure: everything below goes dark)
  max_overshoot_pct         highest input/effective-envelope - 1 of any feed..rack, any step
  seconds_over_envelope     time with at least one node above its effective envelope
  worst_i2t_pct             highest breaker trip-integrator fill (100 = trip)
  work_delivered            GPU-seconds of progress kept, total and per priority class
  work_demanded             GPU-seconds the jobs would have used uncapped
  oracle_work               upper bound on work any policy could deliver inside the
                            envelopes along this run (per-step Lagrangian bound of the
                            water-filling optimum; see sim/scenario_oracle.py)
  priority_inversions       seconds with a higher class capped below demand while a lower
                            class under every node holding it back runs above its floor
  cap_changes_per_gpu_min   changed GPU limits per GPU per minute (oscillation shows here)
  migrations                jobs moved or requeued by the policy
  peak_ramp_w_per_s         largest change of the feed input over 1 s
  work_value                class-weighted GPU-seconds: sum of each class's weight x its
                            work (weight: the site's priority_classes[].weight, default
                            twice the class below it, the lowest 1); reported, not a gate

per class (a second table, and "comparison" in the JSON): GPU-h of each class per policy;
  for every class but the lowest, rackpower / static and rackpower / three-band of the work
  of that class and every class above it together (prefix dominance: each at least 1);
  for the lowest class its own ratio (what strict priority made it pay); oracle_fraction:
  total work / oracle_work.

--check exits 1, naming each failure, unless rackpower (run with static and three-band)
  has 0 trips, 0 s of priority inversions, prefix dominance over static and over
  three-band, at most 6 cap changes per GPU per minute, and at least 0.90 of the oracle
  bound (not required when the scenario has a telemetry_outage event).
"""


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "scenario",
        help="run policies against a simulated scenario and compare them",
        description="Accelerated-time control-quality benchmark of policies on the plant model.",
    )
    ssub = p.add_subparsers(dest="scenario_command", metavar="ACTION", required=True)
    r = ssub.add_parser(
        "run",
        help="run a scenario file",
        description=(
            "Run each named policy on the same seeded plant, workloads and events, in"
            " accelerated time, and print a table of figures."
        ),
        epilog=METRICS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("file", type=Path, help="scenario YAML, e.g. configs/scenarios/sync-step.yaml")
    r.add_argument(
        "--policy",
        action="append",
        choices=sorted(POLICIES),
        metavar="NAME",
        help=f"policy to run (repeatable; default: all of {', '.join(POLICIES)})",
    )
    r.add_argument("--json", type=Path, metavar="OUT", help="write the figures as JSON here")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--check",
        action="store_true",
        help=(
            "exit 1 if rackpower fails a gate of issue 13 (trips, inversions, prefix"
            " dominance vs static and three-band, cap changes > 6/GPU/min, < 0.90 of the"
            " bound without a telemetry outage); needs those three policies (the default)"
        ),
    )
    r.set_defaults(handler=cmd_scenario_run)
    v = ssub.add_parser(
        "validate",
        help="check a scenario file, its site and its trace files without running it",
        description=(
            "Validate a scenario file: its schema, its site, its jobs against the site's"
            " classes and GPUs, its events, and every trace file it replays. Exits 2 with"
            " every problem (file and path, and the trace file's line) on stderr."
        ),
    )
    v.add_argument("file", type=Path, help="scenario YAML")
    v.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    v.set_defaults(handler=cmd_scenario_validate)


def _load(path: Path) -> Scenario | None:
    """The scenario, or None after printing every problem to stderr."""
    from sim.scenario_spec import load_scenario

    try:
        return load_scenario(path)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"{exc.source}: {n} problem{'s' if n != 1 else ''}:", file=sys.stderr)
        for prob in exc.problems:
            print(f"  {prob.render(exc.source)}", file=sys.stderr)
        return None


def cmd_scenario_validate(args: argparse.Namespace) -> int:
    scenario = _load(args.file)
    if scenario is None:
        return EXIT_BAD_INPUT
    spec = scenario.spec
    w = spec.workloads
    jobs = len(w.training) + len(w.inference) + len(w.batch)
    print(
        f"{scenario.source}: scenario {scenario.name!r} is valid: {spec.duration_s:g} s,"
        f" {jobs} workload entries, {len(spec.events)} events, site {scenario.site.name!r}"
    )
    return EXIT_OK


def cmd_scenario_run(args: argparse.Namespace) -> int:
    from sim.scenario import run_policy, scenario_document
    from sim.scenario_compare import PEERS, SUBJECT, gate_failures

    scenario = _load(args.file)
    if scenario is None:
        return EXIT_BAD_INPUT
    policies: list[str] = args.policy or list(POLICIES)
    if args.check:
        missing = [p for p in (SUBJECT, *PEERS) if p not in policies]
        if missing:
            print(
                f"--check compares rackpower with static and three-band: add --policy"
                f" {' --policy '.join(missing)}",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
    console = Console(stderr=True)
    results: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.fields[sim]:>8} sim"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    ) as bar:
        tasks = {
            name: bar.add_task(name, total=scenario.spec.duration_s, sim="0 s") for name in policies
        }

        def progress(name: str, done_s: float, total_s: float) -> None:
            bar.update(tasks[name], completed=done_s, total=total_s, sim=f"{done_s:.0f} s")

        for name in policies:
            results[name] = run_policy(scenario, name, progress)
    out = scenario_document(scenario, results)
    out_console = Console()
    if not out_console.is_terminal:
        out_console = Console(width=160)  # a pipe or file gets the whole table, unwrapped
    out_console.print(render_table(scenario.name, results))
    out_console.print(render_class_table(results, out["comparison"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.check:
        failures = gate_failures(scenario, results, out["comparison"])
        for line in failures:
            print(f"check failed: rackpower: {line}")
        if failures:
            return EXIT_CHECK_FAILED
        print("check passed: rackpower meets every gate")
    return EXIT_OK


COLUMNS: tuple[tuple[str, str], ...] = (
    ("trips", "trips"),
    ("overshoot %", "max_overshoot_pct"),
    ("s over", "seconds_over_envelope"),
    ("i2t %", "worst_i2t_pct"),
    ("work GPU-h", "work"),
    ("% of oracle", "vs_oracle"),
    ("inversions", "priority_inversions"),
    ("caps/GPU/min", "cap_changes_per_gpu_min"),
    ("moves", "migrations"),
    ("ramp kW/s", "ramp"),
    ("x real time", "speed"),
)


def row_values(r: dict[str, Any]) -> dict[str, str]:
    """The table's cells for one policy's figures (also used by the benchmark printout)."""
    work = r["work_delivered"]["total"]
    oracle = r["oracle_work"]
    return {
        "trips": str(r["trips"]),
        "max_overshoot_pct": f"{r['max_overshoot_pct']:.1f}",
        "seconds_over_envelope": f"{r['seconds_over_envelope']:.1f}",
        "worst_i2t_pct": f"{r['worst_i2t_pct']:.1f}",
        "work": f"{work / 3600:.1f}",
        "vs_oracle": f"{100 * work / oracle:.1f}" if oracle > 0 else "-",
        "priority_inversions": str(r["priority_inversions"]),
        "cap_changes_per_gpu_min": f"{r['cap_changes_per_gpu_min']:.2f}",
        "migrations": str(r["migrations"]),
        "ramp": f"{r['peak_ramp_w_per_s'] / 1e3:.1f}",
        "speed": f"{r['sim_s'] / r['wall_s']:.0f}" if r["wall_s"] > 0 else "-",
    }


def render_table(name: str, results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"scenario {name}", header_style="bold")
    table.add_column("policy")
    for title, _ in COLUMNS:
        table.add_column(title, justify="right")
    for policy, r in results.items():
        cells = row_values(r)
        table.add_row(policy, *(cells[key] for _, key in COLUMNS))
    return table


def _ratio_cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_class_table(results: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> Table:
    """GPU-h per class (highest first) per policy, rackpower's prefix ratios, work_value.

    A class row's ratios are of the work of that class and every class above it; the
    lowest class's are of its own work (it may pay for the others); "total" of all.
    """
    peers: list[str] = comparison["peers"]
    table = Table(
        title="per class (GPU-h; ratio: rackpower / peer, of the class and all above it)",
        header_style="bold",
    )
    table.add_column("class")
    for policy in results:
        table.add_column(policy, justify="right")
    for p in peers:
        table.add_column(f"vs {p}", justify="right")
    prefix: dict[str, Any] = comparison["prefix"]
    lowest: dict[str, Any] | None = comparison["lowest"]
    for c in comparison["classes"]:
        if len(comparison["classes"]) == 1:  # one class: its work is the total
            entry, label = prefix.get("total"), c
        else:
            entry = prefix.get(c) or (lowest if lowest and lowest["class"] == c else None)
            label = c if c in prefix else f"{c} (lowest, own)"
        cells = [f"{r['work_delivered'].get(c, 0.0) / 3600:.2f}" for r in results.values()]
        ratios = [_ratio_cell(entry.get(f"vs_{p}") if entry else None) for p in peers]
        table.add_row(label, *cells, *ratios)
    total = {name: r["work_delivered"]["total"] for name, r in results.items()}
    subject = comparison["subject"]
    table.add_row(
        "total",
        *(f"{w / 3600:.2f}" for w in total.values()),
        *(
            _ratio_cell(round(total[subject] / total[p], 4) if total[p] > 0 else None)
            for p in peers
        ),
    )
    table.add_row(
        "work_value",
        *(f"{r['work_value'] / 3600:.2f}" for r in results.values()),
        *(
            _ratio_cell(
                round(results[subject]["work_value"] / results[p]["work_value"], 4)
                if results[p]["work_value"] > 0
                else None
            )
            for p in peers
        ),
    )
    dom = comparison["prefix_dominance"]
    if dom:
        table.caption = "prefix dominance: " + ", ".join(
            f"vs {p} {'yes' if ok else 'NO'}" for p, ok in dom.items()
        )
    return table
