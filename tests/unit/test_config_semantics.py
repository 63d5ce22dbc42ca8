"""Semantic config rules: each mistake that makes the controller act on a wrong number is
refused (exit 2, file, path, reason); each legal but suspicious setting is a warning
(exit 0, one stderr line naming file and path). One table row per rule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.agent_config import parse_agent_config
from controller.cli.main import main
from controller.model.config import ConfigError
from tests.helpers.validate import refused
from tests.sites import ab_site, tiny_site
from tests.unit.test_config import Mutation, _append, _set

RACK = "rows[0].racks[0]"
NODE = f"{RACK}.nodes[0]"


def _both(*mutations: Mutation) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        for m in mutations:
            m(cfg)

    return apply


def _modbus(dev_id: str, address: str, unit_id: int = 1) -> dict[str, Any]:
    return {
        "id": dev_id,
        "driver": "modbus",
        "address": address,
        "unit_id": unit_id,
        "map": "generic-sst-mv800",
    }


_use_meter2 = _set("ssts[0].meters", [{"device": "meter-2", "point": "input_power_w"}])

# (name, base, mutation, expected path, expected reason fragment)
ERRORS: list[tuple[str, Callable[[], dict[str, Any]], Mutation, str, str]] = [
    (
        "meter on a voltage",
        tiny_site,
        _set("feeds[0].meters[0].point", "mv_input_voltage_v"),
        "feeds[0].meters[0].point",
        "is in 'V', not W",
    ),
    (
        "meter on a unitless point",
        tiny_site,
        _set("feeds[0].meters[0].point", "status_word"),
        "feeds[0].meters[0].point",
        "is in no unit, not W",
    ),
    (
        "meter on energy, not power",
        tiny_site,
        _set("ssts[0].meters", [{"device": "sst-meter", "point": "input_energy_wh"}]),
        "ssts[0].meters[0].point",
        "is in 'Wh', not W",
    ),
    (
        "A/B source meter on a current",
        ab_site,
        _set(
            "feeds[0].sources[0].meters", [{"device": "sst-meter", "point": "mv_input_current_a"}]
        ),
        "feeds[0].sources[0].meters[0].point",
        "is in 'A', not W",
    ),
    (
        "one meter twice on a node",
        tiny_site,
        lambda c: c["feeds"][0]["meters"].append({"device": "sst-meter", "point": "input_power_w"}),
        "feeds[0].meters[1]",
        "counted twice",
    ),
    (
        "rack floors above its envelope",
        tiny_site,
        _set(f"{RACK}.envelope_w", 1100),
        f"{RACK}[id=rack-1].envelope_w",
        "rack 'rack-1' cannot be held inside envelope_w 1100 W even with every GPU at its floor",
    ),
    (
        "row floors above its envelope",
        tiny_site,
        _set("rows[0].envelope_w", 2300),
        "rows[0].envelope_w",
        "row 'row' cannot be held inside envelope_w 2300 W",
    ),
    (
        "feed floors above its envelope (site-wide gpu floor)",
        tiny_site,
        _both(_set("policy", {"gpu_floor_w": 450}), _set(f"{RACK}.count", 8)),
        "feeds[0].envelope_w",
        "feed 'feed' cannot be held",
    ),
    (
        "node floors above its envelope",
        tiny_site,
        _set(f"{NODE}.envelope_w", 500),
        f"{NODE}[id=rack-1-n1].envelope_w",
        "node 'rack-1-n1' cannot be held inside envelope_w 500 W",
    ),
    (
        "baseline above the node's rating",
        tiny_site,
        _both(_set(f"{NODE}.rating_w", 150), _set(f"{NODE}.envelope_w", 150)),
        f"{NODE}[id=rack-1-n1].baseline_w",
        "baseline_w 200 W is above the node's rating_w 150 W",
    ),
    (
        "one modbus unit under two ids",
        tiny_site,
        _both(_append("devices", _modbus("meter-2", "127.0.0.1:15020")), _use_meter2),
        "devices[2]",
        "same physical device as 'sst-meter'",
    ),
    (
        "one modbus unit, host spelt in capitals",
        tiny_site,
        _both(
            _append("devices", _modbus("meter-2", "LOCALHOST.:15020")),
            _set("devices[0].address", "localhost:15020"),
            _use_meter2,
        ),
        "devices[2]",
        "same physical device",
    ),
    (
        "one snmp agent and community under two ids",
        tiny_site,
        _both(
            _append(
                "devices",
                {
                    "id": "pdu-x",
                    "driver": "snmp",
                    "address": "127.0.0.1:16161",
                    "community": "rack-1",
                    "map": "apc-rpdu2",
                },
            ),
            _set(f"{RACK}.meters", [{"device": "pdu-{rack_i}"}, {"device": "pdu-x"}]),
        ),
        "devices[2]",
        "same physical device as 'pdu-1'",
    ),
    (
        "efficiency curve out of load order",
        tiny_site,
        _set("ssts[0].efficiency", {"points": [[0.5, 0.97], [0.1, 0.93]]}),
        "ssts[0].efficiency.points",
        "strictly increasing",
    ),
    (
        "efficiency above 1",
        tiny_site,
        _set("ssts[0].efficiency", {"points": [[0.1, 0.93], [0.5, 1.2]]}),
        "ssts[0].efficiency.points[1][1]",
        "less than or equal to 1",
    ),
    (
        "port above 65535",
        tiny_site,
        _set("devices[0].address", "127.0.0.1:70000"),
        "devices[0].address",
        "port 70000 is outside 1-65535",
    ),
    (
        "port 0",
        tiny_site,
        _set("devices[0].address", "127.0.0.1:0"),
        "devices[0].address",
        "port 0 is outside",
    ),
    (
        "empty host",
        tiny_site,
        _set("devices[0].address", ":502"),
        "devices[0].address",
        "the host is empty",
    ),
    (
        "garbage host",
        tiny_site,
        _set("devices[0].address", "pdu_1!:502"),
        "devices[0].address",
        "not a valid host name",
    ),
    (
        "address with a scheme",
        tiny_site,
        _set("devices[0].address", "tcp://10.0.0.1:502"),
        "devices[0].address",
        "without a scheme",
    ),
    (
        "v6 without brackets",
        tiny_site,
        _set("devices[0].address", "::1:502"),
        "devices[0].address",
        "needs brackets",
    ),
    (
        "generated address, bad port",
        tiny_site,
        _set("devices[1].address", "127.0.0.1:9{i}9999"),
        "devices[1][id=pdu-1].address",
        "outside 1-65535",
    ),
    (
        "mqtt scheme misspelt",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "mqqt://h:1883"}}),
        "integrations.mqtt.url",
        "scheme 'mqqt://' is not one of mqtt://, mqtts://",
    ),
    (
        "mqtt url with http",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "http://h:1883"}}),
        "integrations.mqtt.url",
        "is not one of mqtt://",
    ),
    (
        "mqtt port above 65535",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "mqtt://h:65536"}}),
        "integrations.mqtt.url",
        "not a number in 1-65535",
    ),
    (
        "mqtt no host",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "mqtt://:1883"}}),
        "integrations.mqtt.url",
        "the host is empty",
    ),
    (
        "mqtt no scheme",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "broker:1883"}}),
        "integrations.mqtt.url",
        "not a URL",
    ),
    (
        "mqtt with a path",
        tiny_site,
        _set("integrations", {"mqtt": {"url": "mqtt://h/x"}}),
        "integrations.mqtt.url",
        "a path is not supported",
    ),
    (
        "influx scheme misspelt",
        tiny_site,
        _set("integrations", {"influx": {"url": "htp://h:8086"}}),
        "integrations.influx.url",
        "is not one of http://, https://",
    ),
    (
        "influx port 0",
        tiny_site,
        _set("integrations", {"influx": {"url": "http://h:0"}}),
        "integrations.influx.url",
        "port 0 is outside",
    ),
    (
        "influx url with a space",
        tiny_site,
        _set("integrations", {"influx": {"url": "http://h :8086"}}),
        "integrations.influx.url",
        "white space",
    ),
    (
        "scheduler url misspelt",
        tiny_site,
        _set("integrations", {"scheduler": {"kind": "slurm", "url": "slurm://s:6820"}}),
        "integrations.scheduler.url",
        "is not one of http://, https://",
    ),
    (
        "api host empty",
        tiny_site,
        _set("integrations", {"api": {"host": ""}}),
        "integrations.api.host",
        "the host is empty",
    ),
    (
        "api port above 65535",
        tiny_site,
        _set("integrations", {"api": {"port": 70000}}),
        "integrations.api.port",
        "less than or equal to 65535",
    ),
    (
        "gpu max_w absurd",
        tiny_site,
        _set("gpu_models.g.max_w", 700000),
        "gpu_models.g.max_w",
        "is not a GPU power limit",
    ),
    (
        "gpu min_w 0",
        tiny_site,
        _set("gpu_models.g.min_w", 0),
        "gpu_models.g.min_w",
        "greater than 0",
    ),
    (
        "gpu default_w outside range",
        tiny_site,
        _set("gpu_models.g.default_w", 50),
        "gpu_models.g",
        "default_w 50 is outside",
    ),
    (
        "gpu_floor_w above a model's max",
        tiny_site,
        _both(
            _set("policy", {"gpu_floor_w": 600}),
            _set(f"{RACK}.envelope_w", 8000),
            _set("rows[0].envelope_w", 16000),
            _set("buses[0].envelope_w", 17000),
            _set("ssts[0].envelope_w", 18000),
        ),
        "policy.gpu_floor_w",
        "above GPU model 'g''s max_w 500 W",
    ),
    (
        "node floor_w above the GPU's max",
        tiny_site,
        _set(f"{NODE}.floor_w", 600),
        f"{NODE}[id=rack-1-n1].gpus[0]",
        "floor_w 600 W is above the GPU's max_w",
    ),
    (
        "lease shorter than two cycles",
        tiny_site,
        _set("policy", {"cycle_s": 1.0, "lease_s": 1.5}),
        "policy.lease_s",
        "shorter than two cycles",
    ),
    (
        "lease longer than agents accept",
        tiny_site,
        _set("policy", {"lease_s": 7200}),
        "policy.lease_s",
        "above the longest lease agents accept",
    ),
    (
        "node agent is a PDU",
        tiny_site,
        _set(f"{NODE}.agent", "pdu-1"),
        f"{NODE}[id=rack-1-n1].agent",
        "is a snmp device, not a node agent",
    ),
    (
        "scheduler stale before its next poll",
        tiny_site,
        _set("integrations", {"scheduler": {"kind": "sim", "poll_s": 10, "stale_after_s": 5}}),
        "integrations.scheduler.stale_after_s",
        "shorter than poll_s",
    ),
    (
        "trip curve ratio at or below 1",
        tiny_site,
        _set("trip_curves.c.points", [[1.0, 600]]),
        "trip_curves.c.points[0][0]",
        "greater than 1",
    ),
    (
        "trip curve instant below its points",
        tiny_site,
        _set("trip_curves.c.instant_ratio", 1.2),
        "trip_curves.c",
        "instant_ratio must be above",
    ),
    (
        "class_map to an unknown class",
        tiny_site,
        _set("integrations", {"scheduler": {"kind": "sim", "class_map": {"hi": "gold"}}}),
        "",
        "not priority classes",
    ),
    (
        "stale_s below the poll period",
        tiny_site,
        _set("devices[0].stale_s", 0.5),
        "devices[0]",
        "must be at least period_s",
    ),
    (
        "snmp v3 without a user",
        tiny_site,
        _set("devices[1].snmp_version", "3"),
        "devices[1]",
        "snmp_version 3 needs v3_user",
    ),
    (
        "snmp v3 user on a 2c device",
        tiny_site,
        _set("devices[1].v3_user", "ops"),
        "devices[1]",
        "need snmp_version: '3'",
    ),
    (
        "snmp community twice",
        tiny_site,
        _set("devices[1].community_env", "PDU_COMMUNITY"),
        "devices[1]",
        "community or community_env, not both",
    ),
    (
        "snmp v3 privacy without auth",
        tiny_site,
        _both(
            lambda c: c["devices"][1].pop("community"),
            _set("devices[1].snmp_version", "3"),
            _set("devices[1].v3_user", "ops"),
            _set("devices[1].v3_priv_key_env", "K"),
        ),
        "devices[1]",
        "v3 privacy needs authentication",
    ),
]


@pytest.mark.parametrize(
    ("base", "mutate", "path", "reason"),
    [pytest.param(b, m, p, r, id=name) for name, b, m, p, r in ERRORS],
)
def test_semantic_error_exits_2_with_path_and_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: Callable[[], dict[str, Any]],
    mutate: Mutation,
    path: str,
    reason: str,
) -> None:
    cfg = base()
    mutate(cfg)
    f, err = refused(tmp_path, capsys, cfg)
    where = f"{f}: {path}: " if path else f"{f}: "
    lines = [ln for ln in err.splitlines() if where in ln and reason in ln]
    assert lines, f"expected a line naming {path!r} with {reason!r}, got:\n{err}"


# (name, base, mutation, expected path, expected warning fragment)
WARNINGS: list[tuple[str, Callable[[], dict[str, Any]], Mutation, str, str]] = [
    (
        "node oversubscribed above 2x",
        tiny_site,
        _set(f"{NODE}.envelope_w", 1000),
        f"{NODE}[id=rack-1-n1].envelope_w",
        "oversubscribed 2.20x",
    ),
    (
        "trip curve first point under three cycles",
        tiny_site,
        _set("trip_curves.c.points", [[1.1, 1.0], [1.5, 0.5]]),
        "feeds[0].trip_curve",
        "allows 1 s at 1.1x, less than 3 control cycles (1.5 s)",
    ),
    (
        "trip curve at the worst uncapped ratio under three cycles",
        tiny_site,
        _both(
            _set("trip_curves.c.points", [[1.1, 600], [1.2, 1.0]]),
            _set(f"{RACK}.trip_curve", "c"),
            _set(f"{RACK}.rating_w", 3500),
            _set(f"{RACK}.envelope_w", 3400),
        ),
        f"{RACK}[id=rack-1].trip_curve",
        "at 1.26x (every GPU at max), less than 3 control cycles",
    ),
    (
        "meter stale longer than the 1.2x allowance",
        tiny_site,
        _both(
            _set("trip_curves.c.points", [[1.1, 20], [1.5, 2]]),
            _set("devices[0].stale_s", 30),
        ),
        "feeds[0]",
        "device 'sst-meter' counts as fresh for 30 s (stale_s), longer than the breaker"
        " allows at 1.2x",
    ),
    (
        "agent stale longer than the 1.2x allowance",
        tiny_site,
        _both(
            _set("trip_curves.c.points", [[1.1, 20], [1.5, 2]]),
            _append(
                "devices", {"id": "agent-{node}", "driver": "agent", "period_s": 30, "timeout_s": 1}
            ),
            lambda c: c["devices"].pop(),
            _set(
                f"{RACK}.devices",
                [{"id": "agent-{rack}", "driver": "agent", "period_s": 30, "timeout_s": 1}],
            ),
            _set(f"{NODE}.count", 1),
            _set(f"{NODE}.agent", "agent-{rack}"),
        ),
        "feeds[0]",
        "device 'agent-rack-1' counts as fresh for 90 s",
    ),
    (
        "child rated above its parent",
        tiny_site,
        _set("ssts[0].rating_w", 25000),
        "ssts[0].rating_w",
        "above its parent 'feed''s rating_w 20000 W",
    ),
    (
        "gpu_floor_w below a model's min_w",
        tiny_site,
        _set("policy", {"gpu_floor_w": 50}),
        "policy.gpu_floor_w",
        "below GPU model 'g''s min_w 100 W",
    ),
    (
        "node floor_w below min_w",
        tiny_site,
        _set(f"{NODE}.floor_w", 50),
        f"{NODE}[id=rack-1-n1].floor_w",
        "below the GPU's min_w",
    ),
    (
        "device nobody reads",
        tiny_site,
        _append("devices", _modbus("spare", "127.0.0.1:15020", unit_id=7)),
        "devices[2]",
        "device 'spare' is not used by any meter or node",
    ),
]


@pytest.mark.parametrize(
    ("base", "mutate", "path", "warning"),
    [pytest.param(b, m, p, w, id=name) for name, b, m, p, w in WARNINGS],
)
def test_warning_exits_0_with_path_on_stderr(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: Callable[[], dict[str, Any]],
    mutate: Mutation,
    path: str,
    warning: str,
) -> None:
    cfg = base()
    mutate(cfg)
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if f"{f}: {path}: warning: " in ln]
    assert any(warning in ln for ln in lines), f"expected {warning!r} at {path!r}:\n{captured.err}"
    assert "is valid" in captured.out


def test_base_site_has_no_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The warning table's starting point is clean, so each row's warning is its mutation's."""
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(tiny_site()))
    assert main(["validate", str(f)]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo", "ab-demo", "hall"])
def test_shipped_sites_validate_without_warnings(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(__file__).parents[2] / "configs" / "sites" / f"{name}.yaml"
    assert main(["validate", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_shipped_scenarios_load() -> None:
    from sim.scenario_spec import load_scenario

    for path in sorted((Path(__file__).parents[2] / "configs" / "scenarios").glob("*.yaml")):
        load_scenario(path)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mqtt://broker:0", "port 0 is outside"),
        ("mqtts//broker", "not a URL"),
        ("tcp://broker:1883", "scheme 'tcp://' is not one of mqtt://, mqtts://"),
        ("mqtt://", "the host is empty"),
    ],
)
def test_agent_config_refuses_urls_that_cannot_work(url: str, reason: str) -> None:
    data = {
        "site": "tiny",
        "agent_id": "a1",
        "node_id": "n1",
        "controller_id": "c1",
        "failsafe_w": 300,
        "mqtt": {"url": url},
    }
    with pytest.raises(ConfigError) as err:
        parse_agent_config(data, "agent.yaml")
    assert f"agent.yaml: mqtt.url: {reason}" in str(err.value)


def test_run_logs_the_warnings_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from controller.cli.cmdutil import log_site_warnings
    from controller.model.loader import parse_site

    cfg = tiny_site()
    cfg["rows"][0]["racks"][0]["nodes"][0]["envelope_w"] = 1000
    caplog.set_level("WARNING", logger="controller.model.config")
    log_site_warnings(parse_site(cfg, "site.yaml"))
    assert "site.yaml: rows[0].racks[0].nodes[0][id=*]" not in caplog.text  # real ids kept
    assert "warning: oversubscribed 2.20x" in caplog.text
