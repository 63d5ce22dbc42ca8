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
    hour, minute, sec = int(h), int(m), float(s)
    if not (0 <= hour < 24 and 0 <= minute < 60 and 0.0 <= sec < 61.0):
        raise ValueError(f"clock {clock!r} out of range")
    return ordinal * 86400.0 + hour * 3600.0 + minute * 60.0 + sec


class TraceError(ValueError):
    """A trace file that cannot be replayed: names the file and the line (1-based, 0: none).

    Raised while a scenario is validated, so a bad file is a refused scenario with the
    place to fix, never a crash an hour into a run.
    """

    def __init__(self, path: Path, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path} line {line}" if line else str(path)
        super().__init__(f"{where}: {message}")


TRACE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]


@lru_cache(maxsize=8)
def load_azure_trace(path: Path = AZURE_TRACE) -> RequestTrace:
    """Parse a trace CSV in the Azure format (TIMESTAMP, ContextTokens, GeneratedTokens).

    Cached per path: a scenario validates its trace files and its runs read them again.
    The loop period is the span of the trace rounded up to a whole hour, so a looped
    trace keeps its hourly arrival rate. Any problem is a :class:`TraceError` naming the
    line: an unreadable file, a wrong header, a row without three fields, a timestamp
    not ``YYYY-MM-DD HH:MM:SS[.fraction]``, token counts not whole numbers >= 0, or no
    request at all.
    """
    stamps: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != TRACE_HEADER:
                raise TraceError(
                    path, 1, f"header must be {','.join(TRACE_HEADER)} (got {header!r})"
                )
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                line = reader.line_num
                if len(row) != 3:
                    raise TraceError(path, line, f"expected 3 fields, got {len(row)}: {row!r}")
                try:
                    stamps.append(_seconds(row[0]))
                except ValueError:
                    raise TraceError(
                        path, line, f"timestamp {row[0]!r} is not YYYY-MM-DD HH:MM:SS[.f]"
                    ) from None
                for name, cell, out in (
                    ("ContextTokens", row[1], ctx),
                    ("GeneratedTokens", row[2], gen),
                ):
                    try:
                        n = int(cell)
                    except ValueError:
                        n = -1
                    if n < 0:
                        raise TraceError(path, line, f"{name} {cell!r} is not a whole number >= 0")
                    out.append(n)
    except OSError as exc:
        raise TraceError(path, 0, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(path, 0, f"not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise TraceError(path, 0, f"not CSV: {exc}") from None
    if not stamps:
        raise TraceError(path, 0, "no requests (a header and no rows)")
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
