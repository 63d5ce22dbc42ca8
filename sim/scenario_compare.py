"""How rackpower's work compares with the static cap and three-band, class by class.

The yardstick of issue 13 is *prefix dominance*: for every priority class present except
the lowest, the GPU-seconds delivered to that class and every class above it together
must be at least what ``static`` delivers to the same classes, and at least what
``three-band`` does (a single-class scenario: total work). The lowest class may pay for
the ones above it, which is what strict priority means; the comparison says how much.
``work_value`` weighs each class's GPU-seconds by its ``weight`` (reported, not a gate).

Classes are ordered by the site's ``priority_classes``: index 0 is the highest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from controller.model.config import class_weights
from sim.scenario_spec import Scenario, TelemetryOutage

SUBJECT = "rackpower"
PEERS = ("static", "three-band")

#: The issue's gates for the subject policy (``rackpower scenario run --check``).
MAX_TRIPS = 0
MAX_INVERSIONS_S = 0
MAX_CAP_CHANGES_PER_GPU_MIN = 6.0
MIN_ORACLE_FRACTION = 0.90


def work_value(work_delivered: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Class-weighted GPU-seconds: the sum over classes of weight x work delivered."""
    return sum(weights.get(c, 1.0) * w for c, w in work_delivered.items() if c != "total")


def classes_present(scenario: Scenario, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The classes some job of the run belongs to, highest first (the site's order)."""
    seen = {c for r in results.values() for c in r["work_demanded"] if c != "total"}
    return [c.name for c in scenario.site.policy.priority_classes if c.name in seen]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def compare(scenario: Scenario, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``comparison`` block of a scenario's results.

    ``prefix`` has, per class except the lowest (``"total"`` for a single class), the
    GPU-seconds of that class and every class above it per policy, and rackpower's ratio
    to each peer run; ``lowest`` the same for the lowest class alone (what it paid);
    ``prefix_dominance`` per peer whether every prefix ratio is at least 1, on the
    reported (0.1 GPU-s) figures; ``oracle_fraction`` per policy, total work over the
    bound. Ratios and dominance need rackpower and the peer among the policies run.
    """
    classes = classes_present(scenario, results)
    peers = [p for p in PEERS if p in results] if SUBJECT in results else []
    out: dict[str, Any] = {
        "classes": classes,
        "subject": SUBJECT if SUBJECT in results else None,
        "peers": peers,
        "oracle_fraction": {
            name: _ratio(r["work_delivered"]["total"], r["oracle_work"])
            for name, r in results.items()
        },
    }

    def block(members: Sequence[str]) -> dict[str, Any]:
        gpu_s = {
            name: round(sum(r["work_delivered"].get(c, 0.0) for c in members), 1)
            for name, r in results.items()
        }
        entry: dict[str, Any] = {"classes": list(members), "gpu_s": gpu_s}
        for p in peers:
            entry[f"vs_{p}"] = _ratio(gpu_s[SUBJECT], gpu_s[p])
        return entry

    prefix: dict[str, Any] = {}
    if len(classes) <= 1:
        prefix["total"] = block(classes)
        out["lowest"] = None
    else:
        for k, c in enumerate(classes[:-1]):
            prefix[c] = block(classes[: k + 1])
        out["lowest"] = {"class": classes[-1], **block(classes[-1:])}
    out["prefix"] = prefix
    out["prefix_dominance"] = {
        p: all(e["gpu_s"][SUBJECT] >= e["gpu_s"][p] for e in prefix.values()) for p in peers
    }
    return out


def weights_for(scenario: Scenario) -> dict[str, float]:
    """The site's class weights (explicit, or twice the class below, lowest 1)."""
    return class_weights(scenario.site.policy.priority_classes)


def has_telemetry_outage(scenario: Scenario) -> bool:
    return any(isinstance(ev, TelemetryOutage) for ev in scenario.spec.events)


def gate_failures(
    scenario: Scenario,
    results: Mapping[str, Mapping[str, Any]],
    comparison: Mapping[str, Any],
) -> list[str]:
    """Each of the issue's gates rackpower fails on this run, as a sentence (empty: none).

    Needs rackpower, static and three-band among the results (the caller checks).
    """
    r = results[SUBJECT]
    out: list[str] = []
    if r["trips"] > MAX_TRIPS:
        out.append(f"trips: {r['trips']} (must be {MAX_TRIPS})")
    if r["priority_inversions"] > MAX_INVERSIONS_S:
        out.append(f"priority inversions: {r['priority_inversions']} s (must be 0)")
    for peer, ok in comparison["prefix_dominance"].items():
        if not ok:
            worst = [
                f"{c} {e[f'vs_{peer}']}"
                for c, e in comparison["prefix"].items()
                if e["gpu_s"][SUBJECT] < e["gpu_s"][peer]
            ]
            out.append(f"prefix dominance vs {peer} fails: {', '.join(worst)}")
    if r["cap_changes_per_gpu_min"] > MAX_CAP_CHANGES_PER_GPU_MIN:
        out.append(
            f"cap changes: {r['cap_changes_per_gpu_min']} per GPU per minute"
            f" (at most {MAX_CAP_CHANGES_PER_GPU_MIN:g})"
        )
    frac = comparison["oracle_fraction"].get(SUBJECT)
    if not has_telemetry_outage(scenario) and (frac is None or frac < MIN_ORACLE_FRACTION):
        out.append(
            f"oracle fraction: {frac} of the bound (at least {MIN_ORACLE_FRACTION:g}"
            " without a telemetry outage)"
        )
    return out
