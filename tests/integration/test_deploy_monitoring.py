"""The monitoring that ships in configs/deploy/: Prometheus alert rules and a Grafana dashboard.

What an operator loads must work the day they load it, so this checks:

* ``promtool check rules`` accepts the rules (Debian's ``prometheus`` package);
* ``promtool test rules`` passes rackpower-rules.test.yml, where every rule has a case
  that fires it and cases that must not, and a rule whose expression can never fire is
  caught (each rule is replaced in turn by a dead one and the tests must then fail);
* every runbook text names only labels its alert has;
* every metric the rules and the dashboard query exists in ``/metrics`` of a running
  ``rackpower demo`` with its broker and TSDB (real Mosquitto and VictoriaMetrics), by the
  series names Prometheus stores: a histogram only as ``_bucket``/``_sum``/``_count``, a
  counter only as ``_total``;
* the dashboard is Grafana JSON an import accepts (schemaVersion, a datasource variable,
  every panel querying it with PromQL, no overlapping panels).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import eventually
from tests.fixtures.mosquitto import Mosquitto
from tests.fixtures.process import stop_process
from tests.fixtures.victoriametrics import VictoriaMetrics
from tests.helpers.tools import require_tool

pytest_plugins = ["tests.fixtures.mosquitto", "tests.fixtures.victoriametrics"]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "configs/deploy/prometheus/rackpower-rules.yml"
RULE_TESTS = ROOT / "configs/deploy/prometheus/rackpower-rules.test.yml"
DASHBOARD = ROOT / "configs/deploy/grafana/rackpower.json"
RACKPOWER = Path(sys.executable).parent / "rackpower"

# Series Prometheus makes itself on every scrape: not in /metrics, but fine to query.
SCRAPE_SERIES = {"up"}


# -- PromQL: which series an expression reads ----------------------------------------------

_FUNCS_AND_KEYWORDS = {
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "inf", "nan", "le",
}  # fmt: skip
_IDENT = re.compile(r"(?<![\w.:$])[a-zA-Z_:][\w:]*")


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names matched) for every vector selector in a PromQL expression.

    Small, not a parser: strings, ranges, grouping clauses and Grafana ``$variables`` go
    first, then an identifier not followed by ``(`` and not a keyword is a series name.
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\$\{?\w+\}?", "1", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\w+", " ", e)
    braces = [(b.start(), b.end()) for b in re.finditer(r"\{[^}]*\}", e)]
    out: list[tuple[str, set[str]]] = []
    for m in _IDENT.finditer(e):
        if any(lo < m.start() < hi for lo, hi in braces):
            continue  # a label name
        name, rest = m.group(0), e[m.end() :].lstrip()
        if name in _FUNCS_AND_KEYWORDS or rest.startswith("("):
            continue
        if name.startswith(("e", "E")) and e[: m.start()].endswith(tuple("0123456789")):
            continue  # an exponent
        labels: set[str] = set()
        if rest.startswith("{"):
            body = rest[1 : rest.index("}")]
            labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
        out.append((name, labels))
    # a selector with no name ({__name__="x"}) would be missed: the files use none
    assert not re.search(r"(?:^|[^\w\s])\s*\{", e), f"a selector without a name in {expr}"
    return out


def exposed_series(metrics_text: str) -> dict[str, set[str]]:
    """Series names Prometheus stores from a scrape, with their label names.

    By family type, not by the sample lines, so a family with no sample yet (a labelled
    counter never incremented, no alarm active) still counts, under the right names.
    """
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics_text):
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        if fam.type == "histogram":
            names = [f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"]
        elif fam.type == "counter":
            names = [f"{fam.name}_total"]
        elif fam.type == "summary":
            names = [fam.name, f"{fam.name}_sum", f"{fam.name}_count"]
        else:
            names = [fam.name]
        for n in names:
            out.setdefault(n, set()).update(labels)
    return out


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield f"panel {panel['title']!r}", t["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, var
            yield f"variable {var['name']}", m.group(1)


def missing(used: Iterator[tuple[str, str]], exposed: dict[str, set[str]]) -> list[str]:
    """What an expression reads that the controller does not expose (or under a label it
    does not have), one line each."""
    problems: list[str] = []
    for where, expr in used:
        for name, labels in selectors(expr):
            if name in SCRAPE_SERIES:
                continue
            if name not in exposed:
                problems.append(f"{where}: {name} not in /metrics")
            elif exposed[name] and (labels - exposed[name] - {"instance", "job"}):
                problems.append(f"{where}: {name} has no label {labels - exposed[name]}")
    return problems


def test_selectors_name_series_not_functions_strings_or_labels() -> None:
    sel = selectors(
        'histogram_quantile(0.99, sum by (instance, le) (rate(rackpower_x_bucket{a="b c",'
        ' d=~"$node"}[5m]))) > on (instance) 0.5e3 * max(rackpower_y offset 5m) or vector(0)'
    )
    assert sel == [("rackpower_x_bucket", {"a", "d"}), ("rackpower_y", set())]


def test_missing_catches_wrong_suffixes_and_labels() -> None:
    """The check can fail: a bare histogram, a gauge as a histogram, a counter without
    ``_total``, a typo and a label the family does not have are all reported."""
    text = (
        "# TYPE rackpower_cycle_duration_seconds histogram\n"
        'rackpower_cycle_duration_seconds_bucket{le="+Inf"} 1\n'
        "rackpower_cycle_duration_seconds_sum 0.1\nrackpower_cycle_duration_seconds_count 1\n"
        "# TYPE rackpower_cycle_overruns_total counter\nrackpower_cycle_overruns_total 0\n"
        "# TYPE rackpower_up gauge\nrackpower_up 1\n"
        '# TYPE rackpower_node_power_watts gauge\nrackpower_node_power_watts{node="a"} 1\n'
    )
    exposed = exposed_series(text)
    good = [
        ("ok", "rate(rackpower_cycle_duration_seconds_bucket[5m])"),
        ("ok", "rackpower_cycle_duration_seconds_count + rackpower_cycle_overruns_total"),
        ("ok", 'rackpower_node_power_watts{node="a", instance="x"} * rackpower_up'),
        ("ok", 'up{job="rackpower"} == 0'),
    ]
    assert missing(iter(good), exposed) == []
    bad = [
        ("bare", "rackpower_cycle_duration_seconds"),
        ("gauge", "rackpower_up_bucket"),
        ("counter", "rackpower_cycle_overruns"),
        ("typo", "rackpower_node_power_watt"),
        ("label", 'rackpower_node_power_watts{rack="a"}'),
    ]
    assert [p.split(":")[0] for p in missing(iter(bad), exposed)] == [w for w, _ in bad]


# -- the rules -------------------------------------------------------------------------------


def promtool() -> str:
    return require_tool("promtool", "prometheus")


def rules_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def alert_names() -> list[str]:
    return [name for name, _ in rule_exprs()]


def test_promtool_check_rules_accepts_the_file() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in out.stdout, out.stdout


def test_every_rule_is_runbook_style() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), "alert names repeat"
    for group in rules_doc()["groups"]:
        for rule in group["rules"]:
            where = rule["alert"]
            assert where.startswith("Rackpower"), where
            assert "for" in rule, f"{where}: no for:"
            assert rule["labels"]["severity"] in ("warning", "critical"), where
            ann = rule["annotations"]
            assert len(ann["summary"]) <= 90, f"{where}: a summary is one line"
            assert len(ann["description"].split()) >= 12, f"{where}: say what to do"


def run_rule_tests(tmp_path: Path, rules: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` on a copy of the rules without annotations (promtool would
    compare the runbook texts exactly; they are checked by the test below instead)."""
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    return subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_promtool_rule_tests_pass(tmp_path: Path) -> None:
    out = run_rule_tests(tmp_path, rules_doc())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def expected_alerts() -> dict[str, list[dict[str, str]]]:
    """Alert name -> the label sets the test file expects it to fire with."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    out: dict[str, list[dict[str, str]]] = {}
    for t in tests:
        for check in t["alert_rule_test"]:
            out.setdefault(check["alertname"], []).extend(
                e["exp_labels"] for e in check.get("exp_alerts") or []
            )
    return out


def test_every_rule_fires_in_a_test_and_names_only_its_labels() -> None:
    expected = expected_alerts()
    for group in rules_doc()["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            assert expected.get(name), f"{name}: no test makes it fire"
            text = rule["annotations"]["summary"] + rule["annotations"]["description"]
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert all(label in labels for labels in expected[name]), (
                    f"{name}: the runbook names $labels.{label}, the alert has no such label"
                )


@pytest.mark.parametrize("dead", alert_names())
def test_a_rule_that_never_fires_fails_the_rule_tests(tmp_path: Path, dead: str) -> None:
    """Each rule in turn made one that cannot fire: the test file must notice."""
    rules = rules_doc()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == dead:
                rule["expr"] = "vector(0) > 1"
    out = run_rule_tests(tmp_path, rules)
    assert out.returncode != 0 and f"alertname: {dead}," in out.stdout + out.stderr, out.stdout


# -- the dashboard ---------------------------------------------------------------------------


def test_dashboard_is_grafana_json_over_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            assert selectors(t["expr"]), f"{p['title']!r}: {t['expr']} reads no series"
    for var in dash["templating"]["list"][1:]:
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, var["name"]


# -- against a running controller ------------------------------------------------------------


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body.decode()


async def test_every_metric_the_rules_and_dashboard_use_is_in_metrics(
    tmp_path: Path, mosquitto: Mosquitto, victoriametrics: VictoriaMetrics
) -> None:
    """`rackpower demo` with a broker and a TSDB, so the BMS and TSDB series exist too."""
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, not awaited on)
            [
                str(RACKPOWER),
                "demo",
                "--duration",
                "60",
                "--api-port",
                "0",
                "--mqtt",
                mosquitto.url,
                "--influx",
                victoriametrics.url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        url_re = re.compile(r"metrics\s+(http://127\.0\.0\.1:\d+/metrics)")
        await eventually(
            lambda: url_re.search(log_path.read_text(errors="replace")) is not None,
            "the demo to print its metrics URL",
            60,
        )
        match = url_re.search(log_path.read_text(errors="replace"))
        assert match is not None
        url = match.group(1)

        def ready() -> bool:
            text = scrape(url)
            return (
                "rackpower_bms_connected 1.0" in text
                and "rackpower_cycle_duration_seconds_count" in text
            )

        await eventually(
            lambda: asyncio.to_thread(ready), "cycles and the BMS link on /metrics", 60
        )
        exposed = exposed_series(await asyncio.to_thread(scrape, url))
        assert "rackpower_alarm" in exposed and "rackpower_health_status" in exposed
        assert missing(rule_exprs(), exposed) == []
        assert missing(dashboard_exprs(), exposed) == []
    finally:
        stop_process(proc)
    assert "Traceback" not in log_path.read_text(errors="replace")
