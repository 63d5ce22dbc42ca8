"""The TSDB schema: measurements and the typed builders of one cycle's points.

Building points is the core's job (every cycle, from the snapshot); writing them is an
integration's (:mod:`controller.integrations.tsdb.writer`, off the control path). So the
daemon never writes line protocol by hand and every field is a float: InfluxDB rejects a
whole batch when one field changes type (``3i`` then ``3.5``), so ints are coerced once,
at construction. The schema is documented in ``docs/tsdb-schema.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from influxdb_client.client.write.point import Point as _InfluxPoint

# influxdb-client's Point is unannotated; it is used only to serialise (it owns escaping
# and number formatting), so it is called through Any rather than ignored line by line.
InfluxPoint: Any = _InfluxPoint

# ---------------------------------------------------------------------------
# Schema: measurements and their builders

M_NODE = "rackpower_node"
M_GPU = "rackpower_gpu"
M_JOB = "rackpower_job"
M_DEVICE = "rackpower_device"
M_CYCLE = "rackpower_cycle"
M_ACTIONS = "rackpower_actions"
M_TSDB = "rackpower_tsdb"


@dataclass(frozen=True)
class Point:
    """One TSDB point: ids as tags, numbers as fields, a wall-clock timestamp in ns.

    Non-finite field values (a NaN from a silent meter) are left out rather than refused:
    line protocol cannot carry them and one bad line would make the server reject the
    whole batch. A point left with no fields is counted and skipped by the writer.
    Tags with an empty value are left out too (line protocol has no empty tag value).
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, float]
    ts_ns: int

    def __post_init__(self) -> None:
        if not isinstance(self.measurement, str) or not self.measurement:
            raise ValueError(f"measurement must be a non-empty string, got {self.measurement!r}")
        if isinstance(self.ts_ns, bool) or not isinstance(self.ts_ns, int):
            raise TypeError(f"ts_ns must be an int (ns since the epoch), got {self.ts_ns!r}")
        tags: dict[str, str] = {}
        for key, value in self.tags.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise TypeError(f"tag {key!r}={value!r}: tags are non-empty str keys, str values")
            if value:
                tags[key] = value
        fields: dict[str, float] = {}
        for key, number in self.fields.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"field name must be a non-empty str, got {key!r}")
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise TypeError(f"field {key!r} must be a number, got {number!r}")
            if math.isfinite(number):
                fields[key] = float(number)
        # Read-only views: a frozen snapshot must not change under the writer's thread.
        object.__setattr__(self, "tags", MappingProxyType(tags))
        object.__setattr__(self, "fields", MappingProxyType(fields))

    def to_line(self) -> str:
        """Line protocol via influxdb-client, which owns the escaping rules."""
        p = InfluxPoint(self.measurement)
        for key, value in self.tags.items():
            p.tag(key, value)
        for key, number in self.fields.items():
            p.field(key, number)
        p.time(self.ts_ns)  # default precision: ns
        line: str = p.to_line_protocol()
        return line


def _opt(fields: dict[str, float | None]) -> dict[str, float]:
    return {k: v for k, v in fields.items() if v is not None}


def node_point(
    site: str,
    node: str,
    kind: str,
    *,
    power_w: float,
    envelope_w: float,
    headroom_w: float | None,
    ts_ns: int,
    estimated_w: float | None = None,
    reserved_w: float | None = None,
    cap_w: float | None = None,
    capped_gpus: int | None = None,
    over_envelope: bool | None = None,
    violations: int | None = None,
) -> Point:
    """A power-tree node (feed, sst, bus, row, rack, node) in one cycle.

    ``cap_w`` is the sum of the GPU limits the policy sets below the node, ``violations`` a
    counter of cycles spent above the envelope since the controller started. A GPU server
    has no headroom of its own (the policy keeps none for it): ``headroom_w=None``.
    """
    return Point(
        M_NODE,
        {"site": site, "node": node, "kind": kind},
        _opt(
            {
                "power_w": power_w,
                "envelope_w": envelope_w,
                "headroom_w": headroom_w,
                "estimated_w": estimated_w,
                "reserved_w": reserved_w,
                "cap_w": cap_w,
                "capped_gpus": None if capped_gpus is None else float(capped_gpus),
                "over_envelope": None if over_envelope is None else float(over_envelope),
                "violations": None if violations is None else float(violations),
            }
        ),
        ts_ns,
    )


def gpu_point(
    site: str,
    node: str,
    gpu: int,
    *,
    power_w: float,
    limit_w: float,
    ts_ns: int,
    job: str | None = None,
    target_w: float | None = None,
) -> Point:
    """One GPU: measured power, the NVML power limit in force, the limit the policy sets.

    A NaN power or limit (the agent is silent) is left out; ``target_w`` beside
    ``limit_w`` shows a node that does not apply its lease.
    """
    tags = {"site": site, "node": node, "gpu": str(gpu)}
    if job:
        tags["job"] = job
    return Point(
        M_GPU, tags, _opt({"power_w": power_w, "limit_w": limit_w, "target_w": target_w}), ts_ns
    )


def job_point(
    site: str,
    job: str,
    *,
    cap_w: float,
    gpus: int,
    ts_ns: int,
    priority: str | None = None,
    power_w: float | None = None,
) -> Point:
    """A job's cap: one per-GPU limit for the whole job, since caps are per job."""
    tags = {"site": site, "job": job}
    if priority:
        tags["priority"] = priority
    return Point(
        M_JOB, tags, _opt({"cap_w": cap_w, "gpus": float(gpus), "power_w": power_w}), ts_ns
    )


def device_point(
    site: str,
    device: str,
    driver: str,
    *,
    poll_duration_s: float | None,
    errors: int | None,
    retries: int | None,
    ts_ns: int,
    stale: bool | None = None,
) -> Point:
    """A driver's own health: last poll time and cumulative error/retry counters.

    An agent is not polled: it has only ``stale`` (``None`` for the others).
    """
    return Point(
        M_DEVICE,
        {"site": site, "device": device, "driver": driver},
        _opt(
            {
                "poll_duration_s": poll_duration_s,
                "errors": None if errors is None else float(errors),
                "retries": None if retries is None else float(retries),
                "stale": None if stale is None else float(stale),
            }
        ),
        ts_ns,
    )


def cycle_point(
    site: str,
    *,
    duration_s: float,
    overruns: int,
    ts_ns: int,
    mode: str | None = None,
    period_s: float | None = None,
) -> Point:
    """One control cycle: how long it took and the cumulative overrun count."""
    tags = {"site": site}
    if mode:
        tags["mode"] = mode
    return Point(
        M_CYCLE,
        tags,
        _opt({"duration_s": duration_s, "overruns": float(overruns), "period_s": period_s}),
        ts_ns,
    )


def actions_point(site: str, action: str, *, count: int, ts_ns: int) -> Point:
    """Cumulative count of one kind of action (cap, uncap, migrate, requeue, refuse)."""
    return Point(M_ACTIONS, {"site": site, "action": action}, {"count": float(count)}, ts_ns)
