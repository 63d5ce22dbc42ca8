"""``arrivals: {trace: PATH}``: an inference service replays any trace file in the Azure format.

The files are small CSVs written per test; the runs use the real plant, scheduler and
workloads on the tiny inline site, and the real ``rackpower scenario run`` / ``validate``
commands, so a bad file is seen the way an operator sees it (exit 2, file and line).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from controller.cli import scenario_cmd
from controller.model.config import ConfigError
from sim.scenario import run_policy
from sim.scenario_spec import load_scenario
from sim.trace import AZURE_TRACE, TraceError, load_azure_trace
from tests.sites import tiny_site

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def trace_rows(times_s: list[float], ctx: int = 500, gen: int = 200) -> str:
    """Rows at the given seconds after 2024-01-01 00:00:00."""
    rows = []
    for t in times_s:
        m, s = divmod(t, 60.0)
        rows.append(f"2024-01-01 00:{int(m):02d}:{s:010.7f},{ctx},{gen}\n")
    return HEADER + "".join(rows)


def scenario_doc(arrivals: Any, duration_s: float = 30.0) -> dict[str, Any]:
    return {
        "name": "trace-replay",
        "site": tiny_site(),
        "seed": 3,
        "duration_s": duration_s,
        "workloads": {"inference": [{"id": "svc", "gpus": 8, "arrivals": arrivals}]},
    }


def write_scenario(where: Path, doc: dict[str, Any], name: str = "s.yaml") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rackpower")
    scenario_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_trace_file_parses_sorted_and_loops_on_the_hour(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(trace_rows([5.0, 1.5, 70.25]), encoding="utf-8")
    tr = load_azure_trace(path)
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 3.5, 68.75])
    assert tr.context_tokens.tolist() == [500, 500, 500]
    assert tr.period_s == 3600.0


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("TIME,ctx,gen\n2024-01-01 00:00:01,1,1\n", 1, "header must be"),
        ("", 1, "header must be"),
        (HEADER, 0, "no requests"),
        (HEADER + "2024-01-01 00:00:01,1,1\n2024-01-01 00:00:02,12\n", 3, "expected 3 fields"),
        (HEADER + "2024-01-01 00:00:01,1,1\nyesterday,1,1\n", 3, "timestamp 'yesterday'"),
        (HEADER + "2024-01-01 25:00:01,1,1\n", 2, "timestamp"),
        (HEADER + "2024-01-01 00:00:nan,1,1\n", 2, "timestamp"),
        (HEADER + "2024-01-01 00:00:01,many,1\n", 2, "ContextTokens 'many'"),
        (HEADER + "2024-01-01 00:00:01,1,-4\n", 2, "GeneratedTokens '-4'"),
    ],
)
def test_malformed_trace_is_refused_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, message: str
) -> None:
    (tmp_path / "traces").mkdir()
    trace = tmp_path / "traces" / "bad.csv"
    trace.write_text(text, encoding="utf-8")
    path = write_scenario(tmp_path / "scen", scenario_doc({"trace": "../traces/bad.csv"}))
    for action in ("run", "validate"):
        assert run_cli(["scenario", action, str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        where = f"{trace.parent.parent / 'scen' / '../traces/bad.csv'}"
        assert f"{path}: workloads.inference[0].arrivals.trace: {where}" in err, err
        if line:
            assert f"bad.csv line {line}: " in err, err
        assert message in err, err


def test_missing_or_unreadable_trace_is_refused(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, scenario_doc({"trace": "nowhere.csv"}))
    with pytest.raises(ConfigError, match=r"arrivals\.trace: .*nowhere\.csv: cannot read"):
        load_scenario(path)
    (tmp_path / "adir.csv").mkdir()
    path = write_scenario(tmp_path, scenario_doc({"trace": "adir.csv"}))
    with pytest.raises(ConfigError, match=r"adir\.csv: cannot read"):
        load_scenario(path)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_azure_trace(binary)


def test_a_job_arrival_trace_is_checked_too(tmp_path: Path) -> None:
    doc = scenario_doc("poisson")
    doc["events"] = [
        {
            "at_s": 5,
            "kind": "job_arrival",
            "inference": {"id": "late", "gpus": 4, "arrivals": {"trace": "gone.csv"}},
        }
    ]
    path = write_scenario(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"events\[0\]\.inference\.arrivals\.trace: .*gone"):
        load_scenario(path)


def test_unknown_arrivals_key_or_name_is_refused(tmp_path: Path) -> None:
    for arrivals, message in (({"trace": "x.csv", "loop": 1}, "unknown key"), ("aws", "azure")):
        path = write_scenario(tmp_path, scenario_doc(arrivals))
        with pytest.raises(ConfigError, match=message):
            load_scenario(path)


def inference_demand(path: Path) -> float:
    r = run_policy(load_scenario(path), "none", work_bound=False)
    demanded: float = r["work_demanded"]["inference"]
    return demanded


def test_trace_replay_sets_inference_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vendored trace copied to a file replays bit for bit like ``azure``; a trace with
    other arrivals gives other demand, and one busy all run demands every replica."""
    shutil.copy(AZURE_TRACE, tmp_path / "copy.csv")
    # 40 requests/s of long decodes: every one of the 8 replicas busy from the first second.
    busy = [k / 40.0 for k in range(40 * 40)]
    (tmp_path / "busy.csv").write_text(trace_rows(busy, gen=400), encoding="utf-8")
    # A single request at the start, then nothing for the rest of the hour.
    (tmp_path / "one.csv").write_text(trace_rows([0.0], ctx=10, gen=10), encoding="utf-8")
    paths = {
        "azure": write_scenario(tmp_path, scenario_doc("azure"), "azure.yaml"),
        **{
            k: write_scenario(tmp_path, scenario_doc({"trace": f"{k}.csv"}), f"{k}.yaml")
            for k in ("copy", "busy", "one")
        },
    }
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # found next to the scenario, not in the cwd
    demand = {k: inference_demand(p) for k, p in paths.items()}
    assert demand["copy"] == demand["azure"] > 0
    assert demand["busy"] != demand["azure"]
    # 8 one-GPU replicas busy for (almost) all of the 30 s run.
    assert demand["busy"] == pytest.approx(8 * 30.0, rel=0.05)
    # One 0.3 s request on one GPU, and nothing else.
    assert 0 < demand["one"] < 1.0
    assert np.isfinite(list(demand.values())).all()
