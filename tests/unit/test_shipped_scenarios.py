"""The shipped scenarios run the product's defaults, and the NVL72 site has the shape it claims.

Defaults are the product: a scenario that overrides the policy measures a setting no
site ships with. So a shipped scenario carries no ``policy:`` block unless it exists to
show that setting, and then the comment right above the block says so with the words
"exists to show" (the test reads the file's text, not only the parsed spec). Each new
scenario is also checked for the event or workload it is named after, so that an edit
cannot quietly turn it into a different day. Pure: files on disk only, nothing runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from controller.model.config import NodeDef, Site
from controller.model.loader import load_site
from sim.scenario_spec import (
    ActuationDelay,
    DemandResponse,
    FeedLoss,
    LoadStep,
    TelemetryOutage,
    load_scenario,
)

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "configs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))
NEW = ("nvl72-training", "out-of-band", "production-like", "outage-overlap")
REASON = "exists to show"


def policy_problem(text: str) -> str | None:
    """Why a scenario's text breaks the defaults rule, or None.

    A top-level ``policy:`` line must follow a comment block (the lines directly above
    it) that contains :data:`REASON`.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("policy:"):
            continue
        above: list[str] = []
        for prev in reversed(lines[:i]):
            if not prev.startswith("#"):
                break
            above.append(prev)
        if REASON not in " ".join(above):
            return f"line {i + 1}: a policy: block without a comment above it saying it {REASON}"
    return None


def test_the_rule_flags_an_override_without_a_reason() -> None:
    bare = "name: x\n# tight bands\npolicy:\n  bands: {target: 0.99}\n"
    assert policy_problem(bare) == (
        f"line 3: a policy: block without a comment above it saying it {REASON}"
    )
    far = f"# This scenario {REASON} escalation.\nseed: 1\npolicy:\n  escalation: {{}}\n"
    assert policy_problem(far) is not None  # the reason must sit right above the block
    near = f"seed: 1\n# This scenario {REASON} escalation.\npolicy:\n  escalation: {{}}\n"
    assert policy_problem(near) is None
    assert policy_problem("name: x\n# policy: none here\nworkloads: {}\n") is None


def test_every_new_scenario_is_shipped() -> None:
    assert {p.stem for p in SHIPPED} >= set(NEW)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_parses_names_its_site_and_runs_the_defaults(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "a header comment says what the scenario shows"
    sc = load_scenario(path)
    assert sc.name == path.stem
    assert isinstance(sc.spec.site, str), "a shipped scenario names a shipped site"
    site_path = (path.parent / sc.spec.site).resolve()
    assert site_path.parent == REPO / "configs" / "sites"
    assert load_site(site_path).name == sc.site.name
    assert policy_problem(text) is None
    if sc.spec.policy is None:
        # No override at all: the scenario's site policy is the site file's own.
        assert sc.site.policy == load_site(site_path).policy


@pytest.mark.parametrize("name", NEW)
def test_new_scenarios_run_in_one_to_two_minutes_on_the_defaults(name: str) -> None:
    sc = load_scenario(SCENARIOS / f"{name}.yaml")
    assert sc.spec.policy is None
    assert 600 <= sc.spec.duration_s <= 900


def test_nvl72_training_spans_racks_and_rows() -> None:
    sc = load_scenario(SCENARIOS / "nvl72-training.yaml")
    assert sc.site.name == "nvl72"
    sizes = sorted(j.gpus for j in sc.spec.workloads.training)
    assert sizes[-1] >= 4 * 72 and 2 * 72 in sizes  # a 288-GPU job crosses a row boundary
    assert sc.spec.workloads.inference and sc.spec.workloads.batch


def test_out_of_band_caps_land_after_10_to_40_s_with_a_synchronized_step() -> None:
    sc = load_scenario(SCENARIOS / "out-of-band.yaml")
    delays = [sc.spec.plant.actuation_delay_s] + [
        e.delay_s for e in sc.spec.events if isinstance(e, ActuationDelay)
    ]
    assert all(10.0 <= d <= 40.0 for d in delays), delays
    steps = [e for e in sc.spec.events if isinstance(e, LoadStep) and e.factor > 1]
    assert steps and steps[0].at_s < sc.spec.duration_s - 120


def test_production_like_has_a_daily_cycle_waves_and_finite_jobs() -> None:
    w = load_scenario(SCENARIOS / "production-like.yaml").spec.workloads
    assert all(s.daily_amplitude > 0 for s in w.inference) and len(w.inference) >= 2
    assert {s.arrivals for s in w.inference} == {"azure"}  # the trace is the bursty one
    jobs = [*w.training, *w.batch]
    waves = {j.submit_s for j in jobs}
    assert len(waves) >= 3, waves
    assert sum(j.work_s < 1e6 for j in jobs) >= len(jobs) - 1  # jobs end, not only start


def _overlaps(a_s: float, a_len_s: float, b_s: float, b_len_s: float) -> bool:
    return a_s < b_s + b_len_s and b_s < a_s + a_len_s


def test_outage_overlap_blinds_the_controller_during_a_feed_loss_and_a_demand_response() -> None:
    ev = load_scenario(SCENARIOS / "outage-overlap.yaml").spec.events
    outages = [e for e in ev if isinstance(e, TelemetryOutage) and e.scope == "all"]
    assert outages and all(50 <= o.duration_s <= 90 and not o.nodes for o in outages)
    losses = [e for e in ev if isinstance(e, FeedLoss)]
    responses = [e for e in ev if isinstance(e, DemandResponse)]
    assert any(
        _overlaps(o.at_s, o.duration_s, f.at_s, f.duration_s or 1e9)
        for o in outages
        for f in losses
    )
    assert any(
        _overlaps(o.at_s, o.duration_s, d.at_s, d.duration_s) for o in outages for d in responses
    )


# -- the NVL72-class site ------------------------------------------------------------


def _max_draw_w(site: Site, under: dict[str, list[NodeDef]], node: NodeDef) -> float:
    """GPU maxima plus baselines of every server below ``node`` (before any losses)."""
    if node.kind == "node":
        model = site.gpu_models[node.gpu_model or ""]
        return node.baseline_w + node.gpus * model.max_w
    return sum(_max_draw_w(site, under, c) for c in under[node.id])


def test_nvl72_site_has_72_gpus_per_rack_in_trays_of_4_and_both_levels_bind() -> None:
    site = load_site(REPO / "configs" / "sites" / "nvl72.yaml")
    under: dict[str, list[NodeDef]] = defaultdict(list)
    for n in site.nodes:
        if n.parent is not None:
            under[n.parent].append(n)
    racks = [n for n in site.nodes if n.kind == "rack"]
    rows = [n for n in site.nodes if n.kind == "row"]
    assert len(racks) >= 4 and len(rows) >= 2
    for rack in racks:
        trays = under[rack.id]
        assert len(trays) == 18 and {t.kind for t in trays} == {"node"}
        assert {t.gpus for t in trays} == {4}
        assert all(site.gpu_models[t.gpu_model or ""].max_w == 1200 for t in trays)
        assert all(t.baseline_w > 0 for t in trays)
        assert 110_000 <= rack.envelope_w <= 130_000  # about 120 kW
        assert _max_draw_w(site, under, rack) > 1.05 * rack.envelope_w, rack.id
    for row in rows:
        its_racks = under[row.id]
        assert len(its_racks) >= 3 and {r.kind for r in its_racks} == {"rack"}
        assert row.envelope_w < sum(r.envelope_w for r in its_racks), row.id
        assert _max_draw_w(site, under, row) > 1.05 * row.envelope_w, row.id
