"""Power tree: lookups, aggregation (property-tested), oversubscription and the N-1 view."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import ab_site, tiny_site

BIG = 1e9


@st.composite
def random_sites(draw: st.DrawFn) -> dict[str, Any]:
    """Random valid trees: ratings are huge so only the shape and the loads vary."""
    n_ssts = draw(st.integers(1, 3))
    rows = []
    for r in range(draw(st.integers(1, 4))):
        racks = []
        for k in range(draw(st.integers(0, 3))):
            nodes = [
                {
                    "id": f"r{r}k{k}n{n}",
                    "gpus": draw(st.integers(0, 8)),
                    "gpu_model": draw(st.sampled_from(["small", "big"])),
                    "baseline_w": draw(st.floats(0, 5000, allow_nan=False)),
                }
                for n in range(draw(st.integers(0, 3)))
            ]
            racks.append({"id": f"r{r}k{k}", "rating_w": BIG, "envelope_w": BIG, "nodes": nodes})
        rows.append(
            {
                "id": f"r{r}",
                "parent": f"s{draw(st.integers(0, n_ssts - 1))}",
                "rating_w": BIG,
                "envelope_w": BIG,
                "racks": racks,
            }
        )
    return {
        "site": "prop",
        "gpu_models": {"small": {"min_w": 50, "max_w": 300}, "big": {"min_w": 200, "max_w": 1000}},
        "feeds": [{"id": "f", "rating_w": BIG, "envelope_w": BIG}],
        "ssts": [
            {"id": f"s{i}", "parent": "f", "rating_w": BIG, "envelope_w": BIG}
            for i in range(n_ssts)
        ],
        "rows": rows,
    }


@settings(max_examples=60, deadline=None)
@given(cfg=random_sites(), data=st.data())
def test_aggregate_is_own_plus_children(cfg: dict[str, Any], data: st.DataObject) -> None:
    tree = PowerTree(parse_site(cfg))
    own = {nid: data.draw(st.floats(0, 1e4, allow_nan=False)) for nid in tree.order}
    total = tree.aggregate(own)
    for nid in tree.order:
        expected = own[nid] + sum(total[c] for c in tree.children(nid))
        assert total[nid] == pytest.approx(expected)
    assert sum(total[r] for r in tree.roots) == pytest.approx(sum(own.values()))


@settings(max_examples=60, deadline=None)
@given(cfg=random_sites())
def test_draws_and_gpu_ranges_match_the_subtree(cfg: dict[str, Any]) -> None:
    site = parse_site(cfg)
    tree = PowerTree(site)
    models = site.gpu_models
    for nid in tree.order:
        sub = list(tree.subtree(nid))
        gpus = [g for g in sub if tree.node(g).kind == "gpu"]
        servers = [tree.node(s) for s in sub if tree.node(s).kind == "node"]
        assert sorted(tree.gpus[i].id for i in tree.gpu_indices(nid)) == sorted(gpus)
        max_w = sum(models[tree.node(g).gpu_model or ""].max_w for g in gpus)
        floor_w = sum(models[tree.node(g).gpu_model or ""].min_w for g in gpus)
        base_w = sum(s.baseline_w for s in servers)
        assert tree.max_draw_w(nid) == pytest.approx(max_w + base_w)
        assert tree.floor_draw_w(nid) == pytest.approx(floor_w + base_w)
        for c in tree.children(nid):
            assert tree.parent(c) == nid
            assert tree.ancestors(c)[0] == nid


def test_lookups_on_tiny_site() -> None:
    tree = PowerTree(parse_site(tiny_site()))
    assert tree.ancestors("rack-2-n1-g0") == ("rack-2-n1", "rack-2", "row", "bus", "sst", "feed")
    assert tree.children("row") == ("rack-1", "rack-2")
    assert tree.roots == ("feed",)
    assert tree.constraint_nodes() == ("feed", "sst", "bus", "row", "rack-1", "rack-2")
    # rack: 2 nodes x (200 + 4 x 500) = 4,400 W max against a 7,000 W envelope
    assert tree.max_draw_w("rack-1") == 4400
    assert tree.oversubscription("rack-1") == pytest.approx(4400 / 7000)
    assert tree.gpus[tree.gpu_index["rack-1-n2-g1"]].floor_w == 100
    with pytest.raises(KeyError, match="no node 'nope'"):
        tree.node("nope")


def test_policy_floor_raises_gpu_floor() -> None:
    cfg = tiny_site()
    cfg["policy"] = {"gpu_floor_w": 150}
    tree = PowerTree(parse_site(cfg))
    assert {g.floor_w for g in tree.gpus} == {150}
    assert tree.floor_draw_w("rack-1") == 2 * (200 + 4 * 150)


def test_n_minus_1_view() -> None:
    tree = PowerTree(parse_site(ab_site()))
    assert tree.effective_envelope_w("feed") == 18000
    assert tree.effective_envelope_w("feed", frozenset({"feed-a"})) == 11000
    assert tree.effective_envelope_w("feed", frozenset({"feed-a", "feed-b"})) == 0
    assert tree.n_minus_1() == {"feed-a": {"feed": 11000}, "feed-b": {"feed": 11000}}
