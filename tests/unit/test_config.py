"""Site config validation: one bad config per rule, each must name the path and the reason."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.cli.main import main
from controller.model.config import ConfigError
from controller.model.loader import load_site, parse_site
from tests.helpers.validate import refused
from tests.sites import ab_site, tiny_site

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets ``a.b[0].c`` to ``value`` in the raw config dict."""

    def apply(cfg: dict[str, Any]) -> None:
        parts: list[str | int] = []
        for token in path.replace("]", "").replace("[", ".").split("."):
            parts.append(int(token) if token.isdigit() else token)
        target: Any = cfg
        for key in parts[:-1]:
            target = target[key]
        target[parts[-1]] = value

    return apply


def _append(path: str, value: Any) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        target: Any = cfg
        for key in path.split("."):
            target = target[key]
        target.append(value)

    return apply


RACK = "rows[0].racks[0]"

# (name, base, mutation, expected path in message, expected reason fragment)
BAD_CONFIGS: list[tuple[str, Callable[[], dict[str, Any]], Mutation, str, str]] = [
    ("unknown key", tiny_site, _set("rows[0].envelop_w", 1), "rows[0].envelop_w", "unknown key"),
    (
        "unknown nested key",
        tiny_site,
        _set(f"{RACK}.nodes[0].gpu", 1),
        f"{RACK}.nodes[0].gpu",
        "unknown key",
    ),
    (
        "missing rating",
        tiny_site,
        lambda c: c["ssts"][0].pop("rating_w"),
        "ssts[0].rating_w",
        "required",
    ),
    (
        "negative envelope",
        tiny_site,
        _set("buses[0].envelope_w", -5),
        "buses[0].envelope_w",
        "greater than 0",
    ),
    (
        "NaN envelope",
        tiny_site,
        _set("ssts[0].envelope_w", math.nan),
        "ssts[0].envelope_w",
        "finite",
    ),
    (
        "envelope above rating",
        tiny_site,
        _set("ssts[0].envelope_w", 18500),
        "ssts[0].envelope_w",
        "exceeds rating_w",
    ),
    (
        "child envelope above parent",
        tiny_site,
        _set("rows[0].envelope_w", 16500),
        "rows[0].envelope_w",
        "above its parent 'bus'",
    ),
    (
        "generated rack above rating",
        tiny_site,
        _set(f"{RACK}.envelope_w", 9000),
        f"{RACK}[id=rack-1].envelope_w",
        "exceeds rating_w",
    ),
    (
        "duplicate id",
        tiny_site,
        _append("buses", {"id": "sst", "parent": "sst", "rating_w": 1, "envelope_w": 1}),
        "buses[1]",
        "duplicate id 'sst'",
    ),
    (
        "unknown parent",
        tiny_site,
        _set("buses[0].parent", "sst-9"),
        "buses[0].parent",
        "unknown parent 'sst-9'",
    ),
    (
        "parent of wrong kind",
        tiny_site,
        _set("ssts[0].parent", "row"),
        "ssts[0].parent",
        "cannot hang below row",
    ),
    (
        "unknown meter device",
        tiny_site,
        _set("rows[0].meters", [{"device": "nope"}]),
        "rows[0].meters[0].device",
        "unknown device 'nope'",
    ),
    (
        "unknown gpu model",
        tiny_site,
        _set(f"{RACK}.nodes[0].gpu_model", "h200"),
        f"{RACK}.nodes[0].gpu_model",
        "unknown GPU model 'h200'",
    ),
    (
        "unknown trip curve",
        tiny_site,
        _set("feeds[0].trip_curve", "k"),
        "feeds[0].trip_curve",
        "unknown trip curve 'k'",
    ),
    (
        "unknown template",
        tiny_site,
        _set(f"{RACK}.template", "nvl"),
        f"{RACK}.template",
        "unknown rack template 'nvl'",
    ),
    (
        "timeout not below period",
        tiny_site,
        _set("devices[0].timeout_s", 1.0),
        "devices[0]",
        "must be shorter than period_s",
    ),
    (
        "gpu min above max",
        tiny_site,
        _set("gpu_models.g.min_w", 600),
        "gpu_models.g",
        "min_w 600 is above max_w 500",
    ),
    (
        "trip curve not monotonic",
        tiny_site,
        _set("trip_curves.c.points", [[1.5, 30], [1.1, 600]]),
        "trip_curves.c.points",
        "strictly increasing",
    ),
    (
        "bad pattern name",
        tiny_site,
        _set(f"{RACK}.nodes[0].id", "{rak}-n{i}"),
        f"{RACK}.nodes[0].id",
        "uses {rak}",
    ),
    (
        "modbus without address",
        tiny_site,
        lambda c: c["devices"][0].pop("address"),
        "devices[0]",
        "needs an address",
    ),
    ("zero count", tiny_site, _set(f"{RACK}.count", 0), f"{RACK}.count", "greater than or equal"),
    (
        "unknown device map",
        tiny_site,
        _set("devices[0].map", "acme-x"),
        "devices[0].map",
        "no device map named 'acme-x'",
    ),
    (
        "map of another protocol",
        tiny_site,
        _set("devices[0].map", "apc-rpdu2"),
        "devices[0].map",
        "is for snmp, not modbus",
    ),
    (
        "meter point not in map",
        tiny_site,
        _set("feeds[0].meters[0].point", "watts"),
        "feeds[0].meters[0].point",
        "has no point 'watts'",
    ),
    (
        "A/B source cannot carry floors",
        ab_site,
        _set("feeds[0].sources[1].envelope_w", 2000),
        "feeds[0].sources[1].envelope_w",
        "alone cannot carry",
    ),
    (
        "A/B shares do not add up",
        ab_site,
        _set("feeds[0].sources[0].share", 0.7),
        "feeds[0].sources",
        "shares add up to 1.2",
    ),
    (
        "A/B with one source",
        ab_site,
        lambda c: c["feeds"][0]["sources"].pop(),
        "feeds[0].sources",
        "at least two sources",
    ),
    (
        "A/B source above its rating",
        ab_site,
        _set("feeds[0].sources[0].envelope_w", 13000),
        "feeds[0].sources[0].envelope_w",
        "exceeds rating_w",
    ),
    (
        "kubernetes token from the environment",
        tiny_site,
        _set(
            "integrations",
            {"scheduler": {"kind": "kubernetes", "url": "https://k8s:6443", "token_env": "T"}},
        ),
        "integrations.scheduler",
        "reads its token from token_file",
    ),
    (
        "two token sources",
        tiny_site,
        _set(
            "integrations",
            {
                "scheduler": {
                    "kind": "slurm",
                    "url": "http://s:6820",
                    "token_env": "T",
                    "token_file": "/run/slurm.jwt",
                }
            },
        ),
        "integrations.scheduler",
        "not both",
    ),
]


@pytest.mark.parametrize(
    ("base", "mutate", "path", "reason"),
    [pytest.param(b, m, p, r, id=name) for name, b, m, p, r in BAD_CONFIGS],
)
def test_bad_config_exits_2_with_path_and_reason(
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
    lines = [ln for ln in err.splitlines() if f"{f}: {path}" in ln and reason in ln]
    assert lines, f"expected a line naming {path!r} with {reason!r}, got:\n{err}"


def test_base_configs_are_valid() -> None:
    for base in (tiny_site, ab_site):
        site = parse_site(base())
        assert site.name == "tiny"


def test_generated_instances_repeat_one_mistake_once(tmp_path: Path) -> None:
    cfg = tiny_site()
    cfg["rows"][0]["racks"][0]["nodes"][0]["rating_w"] = 700  # below its 2,200 W max draw...
    cfg["rows"][0]["racks"][0]["nodes"][0]["envelope_w"] = 800  # ...and envelope above rating
    with pytest.raises(ConfigError) as err:
        parse_site(cfg, "x.yaml")
    messages = [p.message for p in err.value.problems]
    assert len(messages) == 1, messages
    assert "and 3 more instances" in messages[0]


def test_yaml_syntax_error_names_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("site: x\nfeeds: [\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "line 3" in err


def test_missing_file_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/nonexistent/site.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_generator_fills_ids_and_references() -> None:
    site = parse_site(tiny_site())
    ids = {n.id for n in site.nodes}
    assert {"rack-1", "rack-2", "rack-1-n1", "rack-2-n2", "rack-2-n2-g3"} <= ids
    rack2 = next(n for n in site.nodes if n.id == "rack-2")
    assert rack2.meters[0].device == "pdu-2"
    assert rack2.path == "rows[0].racks[0][id=rack-2]"
    communities = {d.id: d.community for d in site.devices}
    assert communities["pdu-2"] == "rack-2"


def test_unit_id_pattern_becomes_a_number() -> None:
    cfg = tiny_site()
    cfg["devices"].append(
        {
            "id": "shelf-{i}",
            "count": 3,
            "driver": "modbus",
            "address": "127.0.0.1:15021",
            "unit_id": "{i}",
            "map": "generic-hvdc-rectifier-800v",
        }
    )
    site = parse_site(cfg)
    units = {d.id: d.unit_id for d in site.devices if d.id.startswith("shelf")}
    assert units == {"shelf-1": 1, "shelf-2": 2, "shelf-3": 3}


@pytest.mark.parametrize("name", ["demo", "hall"])
def test_shipped_sites_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[2] / "configs" / "sites" / f"{name}.yaml"
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "most oversubscribed" in out


def test_demo_site_shape() -> None:
    """The demo the issue asked for: 2 rows x 4 racks x 4 nodes x 8 GPUs, racks ~1.3x."""
    from controller.model.topology import PowerTree

    tree = PowerTree(load_site(Path(__file__).parents[2] / "configs/sites/demo.yaml"))
    counts = tree.counts()
    assert (counts["feed"], counts["sst"], counts["bus"]) == (1, 1, 1)
    assert (counts["row"], counts["rack"], counts["node"], counts["gpu"]) == (2, 8, 32, 256)
    for rack in tree.of_kind("rack"):
        assert tree.oversubscription(rack) == pytest.approx(1.3, abs=0.02)


def test_hall_site_shape() -> None:
    from controller.model.topology import PowerTree

    tree = PowerTree(load_site(Path(__file__).parents[2] / "configs/sites/hall.yaml"))
    assert tree.counts()["rack"] >= 1000
    (feed,) = tree.of_kind("feed")
    assert len(tree.sources(feed)) == 2
