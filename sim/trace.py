"""Request traces for the inference workload: the Azure LLM trace, or synthetic Poisson.

The Azure trace (one hour of a real conversation service, vendored in ``sim/data`` with
its attribution) gives inference power a real arrival process: bursts, lulls, and the
heavy tail of prompt and output lengths that set prefill and decode times.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drivers.shipped import package_path

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

AZURE_TRACE = package_path("sim", "data", "AzureLLMInferenceTrace_conv.csv")


@dataclass(frozen=True)
class RequestTrace:
    """Requests sorted by arrival; ``period_s`` is how long the trace lasts when looped."""

    arrival_s: FloatArray  # seconds from the start of the trace
    context_tokens: IntArray
    generated_tokens: IntArray
    period_s: float

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def mean_rate_per_s(self) -> float:
        return len(self) / self.period_s


def _seconds(stamp: str) -> float:
    """``2023-11-16 18:15:46.6805900`` -> seconds since 0001-01-01 (7 fraction digits)."""
    day, _, clock = stamp.strip().partition(" ")
    h, m, s = clock.split(":")
    ordinal = dt.date.fromisoformat(day).toordinal()
    return ordinal * 86400.0 + int(h) * 3600.0 + int(m) * 60.0 + float(s)


@lru_cache(maxsize=4)
def load_azure_trace(path: Path = AZURE_TRACE) -> RequestTrace:
    """Parse the trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens); cached per path.

    The loop period is the span of the trace rounded up to a whole hour, so a looped
    trace keeps its hourly arrival rate.
    """
    stamps: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if [h.strip() for h in header] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path}: unexpected header {header!r}")
        for row in reader:
            if not row:
                continue
            stamps.append(_seconds(row[0]))
            ctx.append(int(row[1]))
            gen.append(int(row[2]))
    t = np.array(stamps, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    period = max(3600.0, float(np.ceil((t[-1] + 1e-9) / 3600.0)) * 3600.0)
    return RequestTrace(
        arrival_s=t,
        context_tokens=np.array(ctx, dtype=np.int64)[order],
        generated_tokens=np.array(gen, dtype=np.int64)[order],
        period_s=period,
    )


def poisson_trace(
    rate_per_s: float,
    duration_s: float,
    rng: np.random.Generator,
    context_median: float = 1020.0,
    generated_median: float = 129.0,
    sigma: float = 1.0,
) -> RequestTrace:
    """Synthetic arrivals at a constant rate; token counts log-normal around the Azure medians."""
    n = int(rng.poisson(rate_per_s * duration_s))
    t = np.sort(rng.uniform(0.0, duration_s, n))
    ctx = np.maximum(1, np.round(context_median * rng.lognormal(0.0, sigma, n))).astype(np.int64)
    gen = np.maximum(1, np.round(generated_median * rng.lognormal(0.0, sigma, n))).astype(np.int64)
    return RequestTrace(arrival_s=t, context_tokens=ctx, generated_tokens=gen, period_s=duration_s)
