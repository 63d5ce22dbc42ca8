"""docs/tsdb-schema.md is the contract: the controller writes exactly what it lists.

The expected measurements, tags, fields and rates are parsed from the doc's tables, not
restated here, so the doc and the code cannot drift apart again (audit finding F9: four
of the seven documented measurements were never written, and node points came every 5 s
instead of every cycle). The controller runs real cycles on a stepped wall clock and its
points go through the real ``TsdbWriter`` to a real VictoriaMetrics on loopback; they
are read back through its export API.

What stands in for the outside world: agents' telemetry is handed to
``Controller.accept_telemetry`` as the link would, meters' readings to
``accept_readings``, and the device statistics the poll group would report are given as
``DeviceStats`` values (a real poll group needs real devices; drivers are tested on
their own). The scheduler's jobs come from a ``jobs`` callable, as the adapters give them.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path

from controller.agentlink.lease import Telemetry
from controller.core.controller import Controller
from controller.core.points import Point
from controller.integrations.tsdb.writer import TsdbWriter, tsdb_point
from controller.model.config import InfluxConfig, Site
from controller.model.loader import parse_site
from controller.policy import Job
from drivers.base import DeviceStats
from drivers.reading import Quality, Reading
from tests.fixtures.victoriametrics import VictoriaMetrics
from tests.helpers.waiting import until
from tests.sites import tiny_site, with_rack_agents

pytest_plugins = ["tests.fixtures.victoriametrics"]


DOC = Path(__file__).resolve().parents[2] / "docs" / "tsdb-schema.md"


# ---------------------------------------------------------------------------
# The doc, parsed


@dataclass
class Measurement:
    name: str
    every_cycle: bool  # else every `period_s`
    period_s: float
    exceptions: dict[tuple[str, str], float]  # (tag, value) -> its own period in s
    required_tags: set[str]
    optional_tags: set[str]
    required_fields: set[str]
    optional_fields: set[str]


_HEADING = re.compile(r"^### `(rackpower_\w+)`", re.M)
_ROW = re.compile(r"^\| `(\w+)` \|(.*)$", re.M)
_EVERY_S = re.compile(r"every (\d+(?:\.\d+)?) s")


def parse_doc(text: str) -> dict[str, Measurement]:
    """Every ``### `rackpower_x``` section: its Rate line and its tag and field tables."""
    section = text[text.index("## Measurements") : text.index("## Example")]
    heads = list(_HEADING.finditer(section))
    out: dict[str, Measurement] = {}
    for i, h in enumerate(heads):
        body = section[h.end() : heads[i + 1].start() if i + 1 < len(heads) else None]
        rate_line = next(line for line in body.splitlines() if line.startswith("Rate:"))
        first, _, rest = rate_line.removeprefix("Rate:").partition(";")
        every_cycle = "every cycle" in first
        m_s = _EVERY_S.search(first)
        exceptions = {}
        for tag, value, secs in re.findall(r"`(\w+)=(\w+)` every (\d+(?:\.\d+)?) s", rest):
            exceptions[(tag, value)] = float(secs)
        m = Measurement(
            h.group(1),
            every_cycle,
            float(m_s.group(1)) if m_s else 0.0,
            exceptions,
            set(),
            set(),
            set(),
            set(),
        )
        assert every_cycle or m_s, f"{m.name}: rate not understood: {rate_line!r}"
        # Tables: the tag table's rows have 3 cells, the field table's 4.
        for name, cells in _ROW.findall(body):
            parts = [c.strip() for c in cells.strip().strip("|").split("|")]
            written = parts[-2]
            assert written in ("every point", "optional"), f"{m.name}.{name}: {written!r}"
            if len(parts) == 2:
                (m.required_tags if written == "every point" else m.optional_tags).add(name)
            else:
                (m.required_fields if written == "every point" else m.optional_fields).add(name)
        assert "site" in m.required_tags, f"{m.name}: every point has `site`"
        assert m.required_fields | m.optional_fields, f"{m.name}: no field table parsed"
        out[m.name] = m
    return out


def test_the_doc_parses_into_every_measurement_it_describes() -> None:
    """The parser reads what the doc says (a parser that read nothing would pass F9)."""
    doc = parse_doc(DOC.read_text())
    assert set(doc) == {
        "rackpower_node",
        "rackpower_gpu",
        "rackpower_job",
        "rackpower_device",
        "rackpower_cycle",
        "rackpower_actions",
        "rackpower_tsdb",
    }
    node = doc["rackpower_node"]
    assert node.every_cycle and node.exceptions == {("kind", "node"): 5.0}
    assert {"power_w", "violations"} <= node.optional_fields
    assert "envelope_w" in node.required_fields
    assert doc["rackpower_gpu"].optional_tags == {"job"}
    assert not doc["rackpower_gpu"].every_cycle and doc["rackpower_gpu"].period_s == 5.0


# ---------------------------------------------------------------------------
# A controller, run for real cycles


CYCLE_S = 0.5
N_CYCLES = 25  # 12.5 s: every 5 s detail series gets 2 or 3 points, each cycle series 25
SITE = "f9"


def f9_site() -> Site:
    """tiny_site with agents on every server, so GPUs report and can be capped."""
    cfg = tiny_site()
    cfg["site"] = SITE
    rack = cfg["rows"][0]["racks"][0]
    rack["envelope_w"] = 3000.0  # rack-1 runs hot below: over its envelope, then capped
    with_rack_agents(cfg)
    cfg["policy"] = {"cycle_s": CYCLE_S, "lease_s": 5.0}
    return parse_site(cfg)


class Clock:
    """Wall and monotonic time that advance one cycle per step (whole ms: VM keeps ms)."""

    def __init__(self) -> None:
        self.wall_s = (time.time_ns() // 1_000_000 - 120_000) / 1000  # 2 min ago
        self.mono_s = 1000.0

    def step(self) -> None:
        self.wall_s = round(self.wall_s + CYCLE_S, 3)
        self.mono_s += CYCLE_S


def feed_inputs(ctl: Controller, clock: Clock, rack_w: dict[str, float]) -> None:
    """What the meters and agents report this cycle; one GPU of rack-2-n2 is not GOOD."""
    wall = clock.wall_s
    readings = [
        Reading("sst-meter", "input_power_w", sum(rack_w.values()) * 1.05, "W", clock.mono_s, wall)
    ]
    readings += [
        Reading(f"pdu-{k}", "power_w", w, "W", clock.mono_s, wall)
        for k, w in enumerate(rack_w.values(), start=1)
    ]
    ctl.accept_readings(readings)
    # The agents obey: a GPU draws its demand up to the cap the policy set (an agent that
    # reported more than it was leased would rightly be flagged as ignoring its caps).
    target_w = None if ctl.policy_state is None else ctl.policy_state.target_w
    for info in ctl.agents.values():
        hot = info.node_id.startswith("rack-1")
        n = info.stop - info.first
        limit = [
            500.0 if target_w is None else float(min(500.0, target_w[k]))
            for k in range(info.first, info.stop)
        ]
        power: list[float | None] = [min(480.0 if hot else 100.0, cap) for cap in limit]
        q = [Quality.GOOD] * n
        if info.node_id == "rack-2-n2":
            q[0] = Quality.BAD
        ctl.accept_telemetry(
            Telemetry(
                agent_id=info.agent_id,
                node_id=info.node_id,
                ts=wall,
                failsafe=False,
                power_w=power,
                power_avg_w=power,
                limit_w=list[float | None](limit),
                min_w=[100.0] * n,
                max_w=[500.0] * n,
                q=q,
            ),
            received_s=clock.mono_s,
        )


async def run_controller_into(vm: VictoriaMetrics) -> tuple[Controller, list[int]]:
    site = f9_site()
    clock = Clock()
    ctl = Controller(
        site,
        controller_id="ctl",
        clock=lambda: clock.mono_s,
        wall_clock=lambda: clock.wall_s,
    )
    ctl._startup_grace_s = 0.0
    gpus = {g.id: k for k, g in enumerate(ctl.tree.gpus)}
    rack1 = tuple(k for gid, k in gpus.items() if ctl.tree.gpus[k].node.startswith("rack-1"))
    ctl.jobs_provider = lambda: [Job("train-1", "training", rack1)]
    free = {nid: 1e9 for nid in ctl.tree.order}
    ctl.reservations.add(
        ctl.tree,
        node="rack-2",
        power_w=400.0,
        ttl_s=3600.0,
        job_id="res-job",
        now_s=clock.wall_s,
        free_w=free,
    )
    polled = {d.id for d in site.devices if d.driver != "agent"}
    ctl.device_stats = lambda: {
        dev: DeviceStats(dev, polls=9, errors=2, retries=1, last_poll_duration_s=0.02)
        for dev in polled
    }
    ctl.device_health = lambda: {dev: (dev == "pdu-2", None) for dev in polled}

    writer = TsdbWriter(InfluxConfig.model_validate({"url": vm.url, "flush_s": 0.05}))
    submitted = 0
    cycle_ms: list[int] = []  # each cycle's wall clock, as the daemon stamps it

    def sink(points: object) -> None:
        nonlocal submitted
        pts: list[Point] = list(points)  # type: ignore[call-overload]
        # As controller.service does: the writer's own counters ride with each cycle.
        ts = pts[0].ts_ns if pts else time.time_ns()
        writer.submit([*pts, tsdb_point(SITE, writer.stats(), ts_ns=ts)])
        submitted += len(pts) + 1

    async with writer:
        for _ in range(N_CYCLES):
            feed_inputs(ctl, clock, {"rack-1": 3900.0, "rack-2": 900.0})
            cycle_ms.append(round(clock.wall_s * 1e9) // 1_000_000)
            started = time.monotonic()
            sink(ctl.run_cycle(clock.mono_s).points)
            ctl.cycle_stats.record(time.monotonic() - started)
            clock.step()
            await asyncio.sleep(0)
        await until(lambda: writer.stats().written_points >= submitted)
    assert writer.stats().written_points == submitted
    return ctl, cycle_ms


def split_name(name: str, measurements: set[str]) -> tuple[str, str]:
    """``rackpower_node_power_w`` -> (``rackpower_node``, ``power_w``)."""
    for m in sorted(measurements, key=len, reverse=True):
        if name.startswith(m + "_"):
            return m, name[len(m) + 1 :]
    raise AssertionError(f"{name}: not a field of any documented measurement")


async def test_f9_every_documented_measurement_field_and_tag_is_written(
    victoriametrics: VictoriaMetrics,
) -> None:
    doc = parse_doc(DOC.read_text())
    ctl, cycle_ms = await run_controller_into(victoriametrics)
    series = victoriametrics.wait_for(f'{{site="{SITE}"}}', bool)

    # (measurement) -> {tag set -> {field -> [ts_ms]}}
    seen: dict[str, dict[tuple[tuple[str, str], ...], dict[str, list[int]]]] = {}
    for s in series:
        labels = dict(s["metric"])
        m, fld = split_name(labels.pop("__name__"), set(doc))
        key = tuple(sorted(labels.items()))
        seen.setdefault(m, {}).setdefault(key, {})[fld] = sorted(s["timestamps"])

    problems: list[str] = []
    missing = sorted(set(doc) - set(seen))
    if missing:
        problems.append(f"measurements never written: {missing}")
    for name, spec in doc.items():
        points = seen.get(name, {})
        if not points:
            continue
        all_fields = spec.required_fields | spec.optional_fields
        all_tags = spec.required_tags | spec.optional_tags
        fields_seen = {f for by_field in points.values() for f in by_field}
        tags_seen = {t for key in points for t, _ in key}
        for what, documented, got in (
            ("fields", all_fields, fields_seen),
            ("tags", all_tags, tags_seen),
        ):
            if got - documented:
                problems.append(f"{name}: undocumented {what} {sorted(got - documented)}")
            if documented - got:
                problems.append(
                    f"{name}: documented {what} never written {sorted(documented - got)}"
                )
        for key, by_field in points.items():
            tags = dict(key)
            if lacking := spec.required_tags - set(tags):
                problems.append(f"{name}{tags}: lacks tags {sorted(lacking)}")
            if lacking := spec.required_fields - set(by_field):
                problems.append(f"{name}{tags}: lacks fields {sorted(lacking)}")
            # The rate: every field of a series is written at the series' rate.
            period_s = next(
                (p for (t, v), p in spec.exceptions.items() if tags.get(t) == v),
                None if spec.every_cycle else spec.period_s,
            )
            for fld, stamps in by_field.items():
                if fld in spec.optional_fields:
                    continue  # may be left out of some points (the doc says why)
                if period_s is None:
                    if stamps != cycle_ms:
                        problems.append(
                            f"{name}{tags}.{fld}: {len(stamps)} points, want one per cycle"
                            f" ({len(cycle_ms)})"
                        )
                    continue
                step_ms = round(period_s * 1000)
                gaps = {b - a for a, b in itertools.pairwise(stamps)}
                n_min = N_CYCLES // round(period_s / CYCLE_S)
                if gaps - {step_ms} or len(stamps) < n_min or stamps[0] > cycle_ms[0] + step_ms:
                    problems.append(
                        f"{name}{tags}.{fld}: points at {[t - cycle_ms[0] for t in stamps]} ms,"
                        f" want every {step_ms} ms"
                    )
    assert not problems, "\n".join(problems)

    # Values that say the points mean what the doc says (not only that they exist).
    def last(m: str, fld: str, **tags: str) -> float:
        for key, by_field in seen[m].items():
            if tags.items() <= dict(key).items() and fld in by_field:
                got = victoriametrics.export(f'{m}_{fld}{{site="{SITE}",{_sel(tags)}}}')
                return float(got[0]["values"][-1])
        raise AssertionError(f"{m}.{fld}{tags} not written")

    assert last("rackpower_node", "over_envelope", node="rack-1") == 1.0
    assert last("rackpower_node", "violations", node="rack-1") >= N_CYCLES - 2
    assert last("rackpower_node", "reserved_w", node="rack-2") == 400.0
    assert last("rackpower_node", "capped_gpus", node="rack-1") > 0
    assert last("rackpower_job", "gpus", job="train-1") == 8
    assert last("rackpower_device", "stale", device="pdu-2") == 1.0
    assert last("rackpower_device", "errors", device="pdu-1") == 2.0
    caps = last("rackpower_actions", "count", action="cap")
    assert caps >= 1 and last("rackpower_actions", "count", action="release") == 0
    cap_samples = [
        v
        for fam in ctl.metrics.actions.collect()
        for v in fam.samples
        if v.name.endswith("_total") and v.labels == {"kind": "cap"}
    ]
    assert caps == cap_samples[0].value  # the same number as /metrics


def _sel(tags: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in tags.items())
