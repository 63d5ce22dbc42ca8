"""Every shipped scenario against every policy: the figures table of the issue.

Run: ``python -m benchmarks.scenario [--json OUT] [--policy NAME]... [FILE]...``
(default: every ``configs/scenarios/*.yaml``, all policies). Prints one row per scenario
and policy and, per scenario, how rackpower compares with what it must show: no trips,
no priority inversions, more work than ``static`` and ``three-band``, work as a share of
the bound, cap changes per GPU per minute. Figures, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from controller.cli.scenario_cmd import COLUMNS, row_values
from controller.policy import POLICIES
from drivers.shipped import config_path
from sim.scenario import run_policy, scenario_document
from sim.scenario_spec import load_scenario

SCENARIOS = config_path("scenarios")


def checks(results: dict[str, dict[str, Any]]) -> list[str]:
    """What rackpower must show on this scenario, as readable verdicts."""
    if "rackpower" not in results:
        return []
    rp = results["rackpower"]
    work = rp["work_delivered"]["total"]
    out = [
        f"trips {rp['trips']}",
        f"inversions {rp['priority_inversions']}",
        f"{100 * work / rp['oracle_work']:.1f} % of bound" if rp["oracle_work"] else "no bound",
        f"{rp['cap_changes_per_gpu_min']:.2f} cap changes/GPU/min",
    ]
    for other in ("static", "three-band"):
        if other in results:
            theirs = results[other]["work_delivered"]["total"]
            sign = "+" if work >= theirs else ""
            out.append(f"vs {other} {sign}{100 * (work / theirs - 1):.1f} % work")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scenario", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="scenario files (default: all)")
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES))
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    files = args.files or sorted(SCENARIOS.glob("*.yaml"))
    policies = args.policy or list(POLICIES)
    console = Console(width=170)
    table = Table(title="scenarios x policies", header_style="bold")
    table.add_column("scenario")
    table.add_column("policy")
    for title, _ in COLUMNS:
        table.add_column(title, justify="right")
    everything: dict[str, Any] = {}
    verdicts: dict[str, list[str]] = {}
    for path in files:
        scenario = load_scenario(path)
        results = {}
        for name in policies:
            results[name] = run_policy(scenario, name)
            print(
                f"  {scenario.name}: {name} done in {results[name]['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        everything[scenario.name] = scenario_document(scenario, results)
        verdicts[scenario.name] = checks(results)
        for name, r in results.items():
            cells = row_values(r)
            table.add_row(scenario.name, name, *(cells[key] for _, key in COLUMNS))
        table.add_section()
    console.print(table)
    for name, lines in verdicts.items():
        console.print(f"{name}: rackpower " + ", ".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps({"benchmark": "scenario", "scenarios": everything}, indent=2) + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
