"""The reservation store: granted only when every level up to the feed has the power,
counted at the node and all its ancestors, expiring by itself. Pure: ``now_s`` is passed in.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.reservations import Refusal, Reservation, ReservationStore
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from tests.sites import tiny_site

NOW_S = 1_750_000_000.0
CHAIN = ("rack-1", "row", "bus", "sst", "feed")

# envelope - load before reservations: rack-1 has 2000 W, rack-2 3000 W, but the row only
# 4000 W between them, so two racks together are bounded by the row.
FREE_W = {
    "feed": 9000.0,
    "sst": 8000.0,
    "bus": 7000.0,
    "row": 4000.0,
    "rack-1": 2000.0,
    "rack-2": 3000.0,
}


@pytest.fixture(scope="module")
def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


def counter_ids() -> ReservationStore:
    n = itertools.count(1)
    return ReservationStore(new_id=lambda: f"r{next(n)}")


def grant(
    store: ReservationStore, tree: PowerTree, node: str, watts: float, **kw: float
) -> Reservation:
    got = store.add(
        tree,
        node=node,
        power_w=watts,
        ttl_s=kw.get("ttl_s", 60.0),
        job_id="job",
        now_s=kw.get("now_s", NOW_S),
        free_w=FREE_W,
    )
    assert isinstance(got, Reservation), got
    return got


def test_reservation_counts_at_the_node_and_every_ancestor(tree: PowerTree) -> None:
    store = counter_ids()
    r = grant(store, tree, "rack-1", 1500.0)
    assert (r.id, r.node, r.power_w, r.expires_at_s) == ("r1", "rack-1", 1500.0, NOW_S + 60.0)
    reserved = store.reserved_w(tree, NOW_S)
    assert reserved == dict.fromkeys(CHAIN, 1500.0)
    assert "rack-2" not in reserved
    assert store.own_w(NOW_S) == {"rack-1": 1500.0}


def test_reservations_on_siblings_add_up_at_the_parent(tree: PowerTree) -> None:
    store = counter_ids()
    grant(store, tree, "rack-1", 1000.0)
    grant(store, tree, "rack-2", 2000.0)
    grant(store, tree, "row", 500.0)
    reserved = store.reserved_w(tree, NOW_S)
    assert reserved["rack-1"] == 1000.0
    assert reserved["rack-2"] == 2000.0
    assert reserved["row"] == reserved["feed"] == 3500.0
    assert store.own_w(NOW_S) == {"rack-1": 1000.0, "rack-2": 2000.0, "row": 500.0}


def test_refused_when_the_node_itself_lacks_headroom(tree: PowerTree) -> None:
    store = counter_ids()
    got = store.add(
        tree, node="rack-1", power_w=2000.5, ttl_s=60, job_id="j", now_s=NOW_S, free_w=FREE_W
    )
    assert got == Refusal(
        node="rack-1", requested_w=2000.5, limiting_node="rack-1", available_w=2000.0
    )
    assert "requested 2000.5 W, available 2000 W" in got.reason
    assert len(store) == 0


def test_exactly_the_headroom_is_granted(tree: PowerTree) -> None:
    store = counter_ids()
    grant(store, tree, "rack-1", 2000.0)
    got = store.add(
        tree, node="rack-1", power_w=0.001, ttl_s=60, job_id="j", now_s=NOW_S, free_w=FREE_W
    )
    assert isinstance(got, Refusal)
    assert got.available_w == 0.0


def test_refused_by_an_ancestor_names_it(tree: PowerTree) -> None:
    """rack-2 alone has 3000 W, but rack-1 already took 2000 W of the row's 4000 W."""
    store = counter_ids()
    grant(store, tree, "rack-1", 2000.0)
    got = store.add(
        tree, node="rack-2", power_w=2500.0, ttl_s=60, job_id="j", now_s=NOW_S, free_w=FREE_W
    )
    assert isinstance(got, Refusal)
    assert (got.limiting_node, got.available_w) == ("row", 2000.0)
    assert "limited by 'row'" in got.reason
    grant(store, tree, "rack-2", 2000.0)  # what the row still has is granted


def test_expiry_at_exactly_the_deadline(tree: PowerTree) -> None:
    store = counter_ids()
    r = grant(store, tree, "rack-1", 1000.0, ttl_s=30.0)
    assert store.active(NOW_S + 29.999) == (r,)
    assert store.reserved_w(tree, NOW_S + 29.999)["feed"] == 1000.0
    assert store.expire(NOW_S + 30.0) == (r,)
    assert store.active(NOW_S + 30.0) == ()
    assert store.reserved_w(tree, NOW_S + 30.0) == {}


def test_expired_reservations_free_the_headroom_for_new_ones(tree: PowerTree) -> None:
    store = counter_ids()
    grant(store, tree, "rack-1", 2000.0, ttl_s=10.0)
    refused = store.add(
        tree, node="rack-1", power_w=500, ttl_s=60, job_id="j", now_s=NOW_S + 5, free_w=FREE_W
    )
    assert isinstance(refused, Refusal)
    grant(store, tree, "rack-1", 500.0, now_s=NOW_S + 10.0)


def test_delete_releases_and_answers_none_for_unknown(tree: PowerTree) -> None:
    store = counter_ids()
    r1 = grant(store, tree, "rack-1", 1000.0)
    r2 = grant(store, tree, "rack-2", 1000.0)
    assert store.delete("r1", NOW_S) == r1
    assert store.delete("r1", NOW_S) is None
    assert store.delete("nope", NOW_S) is None
    assert store.active(NOW_S) == (r2,)
    assert store.reserved_w(tree, NOW_S)["row"] == 1000.0
    assert store.get("r2", NOW_S) == r2
    assert store.get("r2", NOW_S + 61) is None


def test_nodes_without_free_figure_do_not_constrain(tree: PowerTree) -> None:
    """A GPU server has no entry in FREE_W: only the rack and above bound it."""
    store = counter_ids()
    room, where = store.available_w(tree, "rack-1-n1", FREE_W, NOW_S)
    assert (room, where) == (2000.0, "rack-1")
    r = grant(store, tree, "rack-1-n1", 2000.0)
    assert store.reserved_w(tree, NOW_S)["rack-1"] == r.power_w


def test_reservation_on_a_node_gone_after_reload_counts_nowhere(tree: PowerTree) -> None:
    store = counter_ids()
    grant(store, tree, "rack-2", 1000.0)
    site = tiny_site()
    site["rows"][0]["racks"][0]["count"] = 1  # rack-2 is gone
    smaller = PowerTree(parse_site(site))
    assert "rack-2" not in smaller
    assert store.reserved_w(smaller, NOW_S) == {}
    assert store.own_w(NOW_S) == {"rack-2": 1000.0}  # still listed until it expires


@pytest.mark.parametrize(
    ("node", "watts", "ttl_s", "error"),
    [
        ("no-such-rack", 100.0, 60.0, KeyError),
        ("rack-1", 0.0, 60.0, ValueError),
        ("rack-1", -5.0, 60.0, ValueError),
        ("rack-1", math.nan, 60.0, ValueError),
        ("rack-1", math.inf, 60.0, ValueError),
        ("rack-1", 100.0, 0.0, ValueError),
        ("rack-1", 100.0, 86_401.0, ValueError),
        ("rack-1", 100.0, math.nan, ValueError),
    ],
)
def test_nonsense_is_a_callers_bug(
    tree: PowerTree, node: str, watts: float, ttl_s: float, error: type[Exception]
) -> None:
    store = counter_ids()
    with pytest.raises(error):
        store.add(
            tree, node=node, power_w=watts, ttl_s=ttl_s, job_id="j", now_s=NOW_S, free_w=FREE_W
        )
    assert len(store) == 0


def test_default_ids_are_unique(tree: PowerTree) -> None:
    store = ReservationStore()
    ids = {grant(store, tree, "rack-1", 1.0).id for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("r-") for i in ids)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["feed", "sst", "bus", "row", "rack-1", "rack-2", "rack-1-n1"]),
            st.floats(min_value=1.0, max_value=5000.0),
            st.floats(min_value=1.0, max_value=100.0),
        ),
        max_size=25,
    )
)
def test_no_level_is_ever_promised_more_than_it_has(
    requests: list[tuple[str, float, float]],
) -> None:
    """Whatever the sequence of requests (each a second apart, some expiring), the sum
    of live reservations under any node never exceeds that node's free power."""
    tree = PowerTree(parse_site(tiny_site()))
    store = ReservationStore()
    for k, (node, watts, ttl_s) in enumerate(requests):
        now = NOW_S + k
        store.add(tree, node=node, power_w=watts, ttl_s=ttl_s, job_id="j", now_s=now, free_w=FREE_W)
        reserved = store.reserved_w(tree, now)
        for nid, free in FREE_W.items():
            assert reserved.get(nid, 0.0) <= free + 1e-6
        own = store.own_w(now)
        assert math.isclose(sum(own.values()), reserved.get("feed", 0.0), abs_tol=1e-6)
