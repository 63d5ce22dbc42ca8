"""The readings store: latest value, time and quality of every point the drivers poll.

Drivers write into it at their own pace; the control cycle takes a frozen view of it once
per cycle. Staleness is judged at that moment against each device's stale limit, so a
meter that went silent turns into "unknown" (worst case for the policy) without anybody
having to notice the silence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree
from controller.policy.inputs import node_power_from_readings
from drivers.reading import Quality, Reading

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DeviceHealth:
    device: str
    last_good_s: float | None
    stale: bool
    last_error: str | None


class ReadingsStore:
    """Latest reading per (device, point), and per-GPU telemetry in arrays by GPU index."""

    def __init__(self, tree: PowerTree) -> None:
        self.tree = tree
        self._stale_s = {d.id: d.effective_stale_s for d in tree.site.devices}
        self._latest: dict[tuple[str, str], Reading] = {}
        self._last_good: dict[str, float] = {}
        self._last_error: dict[str, str] = {}
        n = len(tree.gpus)
        self.gpu_power_w: FloatArray = np.full(n, np.nan)
        self.gpu_limit_w: FloatArray = np.full(n, np.nan)
        self.gpu_ts_s: FloatArray = np.full(n, -np.inf)

    def stale_limit_s(self, device: str) -> float:
        return self._stale_s.get(device, 3.0)

    def put(self, reading: Reading) -> None:
        self._latest[(reading.device, reading.point)] = reading
        if reading.quality is Quality.GOOD:
            self._last_good[reading.device] = reading.ts_s
        elif reading.error:
            self._last_error[reading.device] = reading.error

    def put_many(self, readings: Iterable[Reading]) -> None:
        for r in readings:
            self.put(r)

    def put_gpus(
        self,
        indices: npt.NDArray[np.intp],
        power_w: FloatArray,
        limit_w: FloatArray,
        ts_s: float,
    ) -> None:
        """GPU telemetry from a node agent: power and enforced limit of some GPUs."""
        self.gpu_power_w[indices] = power_w
        self.gpu_limit_w[indices] = limit_w
        self.gpu_ts_s[indices] = ts_s

    def get(self, device: str, point: str) -> Reading | None:
        return self._latest.get((device, point))

    def value(self, device: str, point: str, now_s: float) -> float | None:
        """The value if fresh and good, else None (which the policy reads as worst case)."""
        r = self._latest.get((device, point))
        if r is None or not r.usable(now_s, self.stale_limit_s(device)):
            return None
        return r.value

    def metered_power_w(self, now_s: float) -> dict[str, float | None]:
        """Measured power of every metered node; one unusable meter makes the node unknown."""
        return node_power_from_readings(self.tree, self._latest, now_s)

    def gpu_view(self, now_s: float, stale_s: float) -> tuple[FloatArray, FloatArray]:
        """Per-GPU power and limit with stale entries as NaN (the policy's worst case)."""
        fresh = (now_s - self.gpu_ts_s) <= stale_s
        power = np.where(fresh, self.gpu_power_w, np.nan)
        limit = np.where(fresh, self.gpu_limit_w, np.nan)
        return power, limit

    def health(self, now_s: float) -> Mapping[str, DeviceHealth]:
        out: dict[str, DeviceHealth] = {}
        for dev, stale_s in self._stale_s.items():
            last = self._last_good.get(dev)
            out[dev] = DeviceHealth(
                device=dev,
                last_good_s=last,
                stale=last is None or now_s - last > stale_s,
                last_error=self._last_error.get(dev),
            )
        return out
