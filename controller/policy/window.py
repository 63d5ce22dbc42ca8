"""A sliding-window maximum kept in a few time buckets.

Exact sliding maxima need the whole history; a handful of buckets (the window is at
most one bucket longer than asked) is enough for peak-hold demand and worst-rise
margins, and costs one small array per quantity instead of one per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import FloatArray


@dataclass(frozen=True, eq=False)
class WindowMax:
    """Per-bucket maxima of a vector quantity; ``epoch`` is the bucket of the last update."""

    buckets: FloatArray  # shape (n_buckets, size); -inf in empty buckets
    bucket_s: float
    epoch: int

    @classmethod
    def empty(cls, size: int, window_s: float, n_buckets: int) -> WindowMax:
        return cls(
            buckets=np.full((n_buckets, size), -np.inf),
            bucket_s=window_s / n_buckets,
            epoch=-(1 << 62),
        )

    def push(self, now_s: float, values: FloatArray) -> WindowMax:
        """A new window with ``values`` folded in at ``now_s`` (buckets that aged out dropped)."""
        n_buckets = self.buckets.shape[0]
        epoch = int(np.floor(now_s / self.bucket_s))
        buckets = self.buckets.copy()
        if epoch > self.epoch:
            aged = min(epoch - self.epoch, n_buckets)
            for e in range(epoch - aged + 1, epoch + 1):
                buckets[e % n_buckets] = -np.inf
        else:
            epoch = self.epoch  # time went backwards or stood still: stay in this bucket
        row = epoch % n_buckets
        np.maximum(buckets[row], values, out=buckets[row])
        return WindowMax(buckets=buckets, bucket_s=self.bucket_s, epoch=epoch)

    def maximum(self) -> FloatArray:
        out: FloatArray = self.buckets.max(axis=0)
        return out
