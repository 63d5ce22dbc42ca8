"""Readings store: silent or bad meters become unknown, never a stale number."""

from __future__ import annotations

import numpy as np

from controller.core.readings import ReadingsStore
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from drivers.reading import Quality, Reading
from tests.sites import ab_site, tiny_site


def _r(device: str, point: str, value: float, ts: float, q: Quality = Quality.GOOD) -> Reading:
    return Reading(device, point, value, "W", ts, 1e9 + ts, q)


def test_metered_power_sums_meters_and_ages_out() -> None:
    tree = PowerTree(parse_site(tiny_site()))  # pdu-1 meters rack-1; stale limit 3 s default
    store = ReadingsStore(tree)
    store.put(_r("pdu-1", "power_w", 4000, ts=10.0))
    store.put(_r("sst-meter", "input_power_w", 9000, ts=10.0))
    got = store.metered_power_w(now_s=11.0)
    assert got["rack-1"] == 4000 and got["feed"] == 9000
    assert got["rack-2"] is None  # metered, never read: unknown
    assert store.metered_power_w(now_s=13.5)["rack-1"] is None  # older than 3 s
    assert "row" not in got  # no meter: the policy estimates it from below


def test_bad_quality_is_unknown_and_health_reports_it() -> None:
    store = ReadingsStore(PowerTree(parse_site(tiny_site())))
    store.put(_r("pdu-1", "power_w", 4000, ts=10.0))
    store.put(Reading("pdu-1", "power_w", float("nan"), "W", 11.0, 0, Quality.BAD, "NaN"))
    assert store.metered_power_w(now_s=11.0)["rack-1"] is None
    health = store.health(now_s=11.0)
    assert not health["pdu-1"].stale and health["pdu-1"].last_error == "NaN"
    assert health["pdu-2"].stale


def test_feed_without_meters_reads_its_sources() -> None:
    cfg = ab_site()
    cfg["feeds"][0]["sources"][0]["meters"] = [{"device": "sst-meter", "point": "input_power_w"}]
    cfg["feeds"][0]["sources"][1]["meters"] = [{"device": "sst-meter", "point": "output_power_w"}]
    store = ReadingsStore(PowerTree(parse_site(cfg)))
    store.put(_r("sst-meter", "input_power_w", 5000, ts=1.0))
    assert store.metered_power_w(now_s=1.5)["feed"] is None  # side B unread: unknown
    store.put(_r("sst-meter", "output_power_w", 4000, ts=1.0))
    assert store.metered_power_w(now_s=1.5)["feed"] == 9000


def test_gpu_view_marks_stale_gpus_nan() -> None:
    tree = PowerTree(parse_site(tiny_site()))
    store = ReadingsStore(tree)
    idx = np.arange(0, 4)
    store.put_gpus(idx, np.full(4, 300.0), np.full(4, 450.0), ts_s=5.0)
    power, limit = store.gpu_view(now_s=6.0, stale_s=2.0)
    assert np.all(power[:4] == 300) and np.all(limit[:4] == 450)
    assert np.all(np.isnan(power[4:]))
    power, _ = store.gpu_view(now_s=8.0, stale_s=2.0)
    assert np.all(np.isnan(power))
