"""The override store: what the control cycle reads as the envelopes in force, and expiry.

Pure: ``now_s`` is passed in. Commands are built through the same checks the BMS link
uses, so the expiry they carry is the absolute one.
"""

from __future__ import annotations

import pytest

from controller.core.overrides import EnvelopeOverrides
from controller.core.setpoints import DemandResponse, EnvelopeOverride, check_command
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0


@pytest.fixture
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


def dr(tree: PowerTree, node: str, limit_w: float, ttl_s: float, cid: str = "d") -> DemandResponse:
    cmd = DemandResponse(
        type="demand_response", command_id=cid, node=node, limit_w=limit_w, ttl_s=ttl_s
    )
    checked = check_command(cmd, tree, NOW_S)
    assert isinstance(checked, DemandResponse)
    return checked


def override(
    tree: PowerTree, node: str, envelope_w: float, ttl_s: float, cid: str = "e"
) -> EnvelopeOverride:
    cmd = EnvelopeOverride(
        type="envelope_override", command_id=cid, node=node, envelope_w=envelope_w, ttl_s=ttl_s
    )
    checked = check_command(cmd, tree, NOW_S)
    assert isinstance(checked, EnvelopeOverride)
    return checked


def test_empty_store_constrains_nothing(tree: PowerTree) -> None:
    assert EnvelopeOverrides(tree).active(NOW_S) == {}


def test_demand_response_lowers_but_never_raises(tree: PowerTree) -> None:
    store = EnvelopeOverrides(tree)
    store.apply(dr(tree, "rack-1", 5000, 60), NOW_S)
    store.apply(dr(tree, "rack-2", 7500, 60, "d2"), NOW_S)  # above its 7000 W envelope
    assert store.active(NOW_S) == {"rack-1": 5000.0, "rack-2": 7000.0}


def test_override_replaces_and_demand_response_caps_it(tree: PowerTree) -> None:
    store = EnvelopeOverrides(tree)
    store.apply(override(tree, "rack-1", 6800, 600), NOW_S)
    assert store.active(NOW_S) == {"rack-1": 6800.0}
    store.apply(dr(tree, "rack-1", 6000, 60), NOW_S)
    assert store.active(NOW_S) == {"rack-1": 6000.0}
    # The demand response lapses first; the override is still in force.
    assert store.active(NOW_S + 60) == {"rack-1": 6800.0}
    assert store.active(NOW_S + 600) == {}
    assert len(store) == 0


def test_newer_command_of_the_same_kind_replaces_the_older(tree: PowerTree) -> None:
    store = EnvelopeOverrides(tree)
    store.apply(dr(tree, "row", 12000, 600, "a"), NOW_S)
    store.apply(dr(tree, "row", 10000, 30, "b"), NOW_S + 1)
    [entry] = store.entries(NOW_S + 2)
    assert (entry.command_id, entry.value_w, entry.applied_at_s) == ("b", 10000.0, NOW_S + 1)
    assert store.active(NOW_S + 31) == {}


def test_expire_returns_what_ran_out(tree: PowerTree) -> None:
    store = EnvelopeOverrides(tree)
    store.apply(dr(tree, "rack-1", 5000, 10, "short"), NOW_S)
    store.apply(dr(tree, "rack-2", 5000, 100, "long"), NOW_S)
    assert store.expire(NOW_S + 9.999) == ()
    assert [e.command_id for e in store.expire(NOW_S + 10)] == ["short"]
    assert [e.node for e in store.entries(NOW_S + 10)] == ["rack-2"]


def test_reload_drops_settings_for_nodes_that_are_gone(tree: PowerTree) -> None:
    store = EnvelopeOverrides(tree)
    store.apply(dr(tree, "rack-1", 5000, 60), NOW_S)
    store.apply(dr(tree, "rack-2", 5000, 60, "d2"), NOW_S)
    smaller = tiny_site()
    smaller["rows"][0]["racks"][0]["count"] = 1
    dropped = store.replace_tree(PowerTree(parse_site(smaller)))
    assert [e.node for e in dropped] == ["rack-2"]
    assert store.active(NOW_S) == {"rack-1": 5000.0}


def test_f8_envelope_in_force_never_exceeds_the_configured_one(tree: PowerTree) -> None:
    """After a reload that lowers rack-1's envelope below an active override, the store
    reports the configured value: what it says is in force is what the policy uses."""
    from controller.model.loader import parse_site
    from tests.sites import tiny_site

    store = EnvelopeOverrides(tree)
    store.apply(override(tree, "rack-1", 6800, 600), NOW_S)
    cfg = tiny_site()
    cfg["rows"][0]["racks"][0]["envelope_w"] = 6500
    store.replace_tree(PowerTree(parse_site(cfg)))
    assert store.active(NOW_S) == {"rack-1": 6500.0}
