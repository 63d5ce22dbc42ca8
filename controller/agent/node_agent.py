"""The node agent: applies the caps a controller leases it, and a failsafe cap otherwise.

Runs on every GPU node (``rackpower agent --config agent.yaml``). Rules, in the order a
lease meets them:

0. only authenticated (with ``auth.key_file``: sealed with this agent's key, for this
   agent, as a lease; see controller.agentlink.msgauth). Anything else is refused, counted in
   telemetry (``auth_refused``) and logged at most once a minute; nothing of it is read.
   The controller id check below stays, but anyone on the broker can copy an id: the
   signature is the defence;
1. only from the configured ``controller_id`` (anyone else is ignored and logged once);
2. ``seq`` within ``seq_window_s`` (10 min) of this agent's wall clock in ms: the
   controller's seq starts at its wall clock in ms (LeaseSequence), so a seq far ahead
   is forged or broken and would lock the real controller out for good (F2: 2**63), and
   one far behind is a replay of an old lease (or a controller clock far off: the agent
   then stays in failsafe, which is safe and said in its telemetry);
3. only newer than the last lease applied (``seq`` greater), so a duplicate or a
   reordered message never rolls a cap back;
4. all or nothing: every cap inside its GPU's NVML [min, max], every GPU one of this
   node's; otherwise the whole lease is refused, the reason logged and reported in
   telemetry (``refused``), and the caps in force stay as they were;
5. a GPU the lease does not name is held at the failsafe cap.

A lease lasts ``lease_s`` (at most ``max_lease_s``) from the moment the agent received
it, measured on the agent's monotonic clock: the controller's wall clock is another
host's and may be skewed or stepped, so ``issued_at`` is never used for expiry. When the
lease runs out without a renewal (the controller died, hung or lost the network: a
silent controller looks exactly like this), the agent applies its failsafe cap, the
static safe share, and says so in its log and in every telemetry report
(``failsafe: true`` and the reason). It does the same at start, before any lease, and
when it stops.

Only changes reach NVML: a renewal that leaves a GPU's cap where it is makes no set
call, so a controller renewing every cycle costs nothing on the GPUs. A limit found
above what the agent set (a GPU reset, or someone with nvidia-smi) is set again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from controller.agent.agent_config import AgentConfig
from controller.agentlink.lease import (
    Lease,
    LeaseRefused,
    LimitRange,
    Refusal,
    Telemetry,
    resolve_caps,
    round_w,
)
from controller.agentlink.msgauth import RefusalLog
from controller.agentlink.transport import AgentLink, BadMessage, LeaseMessage, Unauthenticated
from drivers.nvml import LIMIT_TOLERANCE_W, GpuInfo, GpuSample, LimitResult, NvmlDriverError
from drivers.reading import Quality

log = logging.getLogger(__name__)

# Two caps closer than this are the same cap (no NVML call for the difference).
SAME_CAP_W = 0.01


class GpuDriver(Protocol):
    """What the agent needs from drivers.nvml.NvmlDriver (already started)."""

    @property
    def gpus(self) -> list[GpuInfo | None]: ...

    async def read_all(self) -> list[GpuSample]: ...

    async def set_limit(self, index: int, limit_w: float) -> LimitResult: ...


@dataclass(frozen=True, slots=True)
class LeaseOutcome:
    """What became of one lease message (for tests, the log and the audit trail)."""

    status: Literal["applied", "ignored", "refused"]
    reason: str
    set_gpus: tuple[int, ...] = ()  # GPUs whose limit was set (NVML calls made)
    failed_gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentState:
    """A snapshot of the agent's decision state. ``expires_s`` is on the agent's clock."""

    seq: int | None
    failsafe: bool
    failsafe_reason: str | None
    expires_s: float | None
    targets_w: tuple[float | None, ...]
    applied_w: tuple[float | None, ...]
    refused: Refusal | None


class NodeAgent:
    """One node's agent. ``await agent.run()`` until ``agent.stop()``; or drive it step by
    step (``start``, ``handle``, ``check_expiry``, ``sample``) as the tests do.

    ``clock`` is the monotonic clock leases are timed on; ``wall_clock`` only stamps
    telemetry. The driver must be started; the link is run by whoever made it.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        driver: GpuDriver,
        link: AgentLink,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._driver = driver
        self._link = link
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = asyncio.Lock()
        self._started = False
        self._ranges: list[LimitRange | None] = []
        self._failsafe_w: list[float | None] = []
        self._applied_w: list[float | None] = []
        self._seq: int | None = None
        self._lease: Lease | None = None
        self._lease_s = 0.0
        self._lease_caps: dict[int, float] = {}
        self._expires_s: float | None = None
        self._failsafe = True
        self._failsafe_reason: str | None = "agent not started"
        self._refused: Refusal | None = None
        self._set_errors: dict[int, str] = {}
        # _enforce runs started / finished: a set is in NVML before it is confirmed and
        # recorded in _applied_w, so a sample read while one runs cannot be judged.
        self._enforce_started = 0
        self._enforce_done = 0
        self._warned_controllers: set[str] = set()
        self._auth_refused = 0
        self._auth_log = RefusalLog(log, "an unauthenticated lease", clock=clock)
        self._lease_changed = asyncio.Event()
        self._stop = asyncio.Event()

    # -- state ----------------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return AgentState(
            self._seq,
            self._failsafe,
            self._failsafe_reason,
            self._expires_s,
            tuple(self._targets()),
            tuple(self._applied_w),
            self._refused,
        )

    @property
    def failsafe(self) -> bool:
        return self._failsafe

    # -- steps ----------------------------------------------------------------------

    async def start(self) -> None:
        """Learn the GPUs' limit ranges and apply the failsafe cap: no lease yet."""
        self._refresh_ranges()
        self._applied_w = [None] * len(self._ranges)
        self._started = True
        async with self._lock:
            await self._enter_failsafe("no lease received since the agent started")

    async def handle(self, msg: LeaseMessage) -> LeaseOutcome:
        """Apply, ignore or refuse one message from the link."""
        if isinstance(msg, Unauthenticated):
            # Not reported as ``refused``: that field answers the controller's own leases,
            # and a forger must not be able to overwrite it. Counted instead.
            self._auth_refused += 1
            self._auth_log.refused(msg.reason)
            return LeaseOutcome("refused", f"unauthenticated: {msg.reason}")
        if isinstance(msg, BadMessage):
            return self._refuse(None, msg.reason)
        lease = msg
        cfg = self.cfg
        if lease.controller_id != cfg.controller_id:
            if lease.controller_id not in self._warned_controllers:
                self._warned_controllers.add(lease.controller_id)
                log.warning(
                    "ignoring leases from controller %r: this agent obeys only %r",
                    lease.controller_id,
                    cfg.controller_id,
                )
            return LeaseOutcome("ignored", f"from controller {lease.controller_id!r}")
        if lease.agent_id is not None and lease.agent_id != cfg.agent_id:
            log.warning("ignoring lease %d addressed to agent %r", lease.seq, lease.agent_id)
            return LeaseOutcome("ignored", f"addressed to agent {lease.agent_id!r}")
        now_ms = int(self._wall_clock() * 1000)
        window_ms = int(cfg.seq_window_s * 1000)
        if lease.seq > now_ms + window_ms:
            return self._refuse(
                lease.seq,
                f"seq {lease.seq} is more than {cfg.seq_window_s:g} s beyond this agent's wall"
                f" clock ({now_ms} ms): forged, or the controller's clock is far ahead",
            )
        if lease.seq < now_ms - window_ms:
            return self._refuse(
                lease.seq,
                f"seq {lease.seq} is more than {cfg.seq_window_s:g} s behind this agent's wall"
                f" clock ({now_ms} ms): a replayed old lease, or the controller's clock is far"
                " behind",
            )
        async with self._lock:
            if self._seq is not None and lease.seq <= self._seq:
                log.debug("ignoring lease %d: not newer than %d", lease.seq, self._seq)
                return LeaseOutcome("ignored", f"seq {lease.seq} not newer than {self._seq}")
            try:
                caps = resolve_caps(lease, cfg.node_id, self._ranges)
            except LeaseRefused as exc:
                return self._refuse(lease.seq, str(exc))
            lease_s = min(lease.lease_s, cfg.max_lease_s)
            if lease_s < lease.lease_s:
                log.info(
                    "lease %d asks for %g s; held to max_lease_s %g s",
                    lease.seq,
                    lease.lease_s,
                    lease_s,
                )
            was_failsafe = self._failsafe
            self._seq = lease.seq
            self._lease = lease
            self._lease_s = lease_s
            self._lease_caps = caps
            self._expires_s = self._clock() + lease_s
            self._failsafe = False
            self._failsafe_reason = None
            self._refused = None
            set_gpus, failed = await self._enforce()
        self._lease_changed.set()
        if was_failsafe:
            log.info(
                "leaving failsafe: lease %d from %s applied (%s)",
                lease.seq,
                lease.controller_id,
                _describe(lease, caps),
            )
        elif set_gpus:
            log.info("lease %d applied (%s)", lease.seq, _describe(lease, caps))
        return LeaseOutcome("applied", "", set_gpus, failed)

    async def check_expiry(self) -> bool:
        """Fall back to the failsafe cap if the lease has run out; True if it just did."""
        async with self._lock:
            if self._failsafe or self._expires_s is None or self._clock() < self._expires_s:
                return False
            assert self._lease is not None
            await self._enter_failsafe(
                f"lease {self._seq} from controller {self._lease.controller_id} expired: "
                f"no renewal within {self._lease_s:g} s of receipt (controller silent?)"
            )
            return True

    async def sample(self) -> Telemetry:
        """Read every GPU, put back limits found above what was set, and report."""
        started_before = self._enforce_started
        in_flight = started_before != self._enforce_done
        samples = await self._driver.read_all()
        # A lease's set ran while we read: the sample may show a limit set but not yet
        # recorded (not out of band). Judge the next sample instead.
        in_flight = in_flight or self._enforce_started != started_before
        if self._refresh_ranges():
            log.info("GPU limit ranges changed (a GPU came back): caps re-evaluated")
        need = False
        for s in samples:
            if s.quality is Quality.ERROR or s.index >= len(self._applied_w):
                continue
            if in_flight:
                continue
            applied = self._applied_w[s.index]
            if applied is not None and s.limit_w is not None:
                if s.limit_w > applied + LIMIT_TOLERANCE_W:
                    log.warning(
                        "GPU %d: enforced limit %g W is above the %g W this agent set "
                        "(GPU reset or changed out of band?): setting it again",
                        s.index,
                        s.limit_w,
                        applied,
                    )
                    self._applied_w[s.index] = None
                    need = True
            elif applied is None and self._target(s.index) is not None:
                need = True  # a set that failed, or a GPU that is readable again
        if need:
            async with self._lock:
                await self._enforce()
        return self._telemetry(samples)

    # -- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Start, then receive leases, watch expiry and send telemetry until ``stop()``.

        On stop the failsafe cap is applied: NVML limits outlive the process, and a node
        left at a lease's cap with nobody to renew or lower it is unmanaged.
        """
        if not self._started:
            await self.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._receive_loop(), name="agent-leases"),
                    tg.create_task(self._expiry_loop(), name="agent-expiry"),
                    tg.create_task(self._telemetry_loop(), name="agent-telemetry"),
                ]
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            async with self._lock:
                await self._enter_failsafe("agent stopping")

    def stop(self) -> None:
        self._stop.set()

    async def _receive_loop(self) -> None:
        async for msg in self._link.leases():
            try:
                await self.handle(msg)
            except Exception:  # a bug in one message must not stop the agent
                log.exception("handling a lease failed")

    async def _expiry_loop(self) -> None:
        while True:
            self._lease_changed.clear()
            delay_s = None if self._expires_s is None else max(0.0, self._expires_s - self._clock())
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that lands as
            # the event fires, and this loop would then outlive stop() (run() never returns).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._lease_changed.wait()
            try:
                await self.check_expiry()
            except Exception:
                log.exception("applying the failsafe cap failed")

    async def _telemetry_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period_s = 1.0 / self.cfg.telemetry_hz
        next_s = loop.time()
        while True:
            try:
                self._link.send_telemetry(await self.sample())
            except Exception:
                log.exception("reading the GPUs for telemetry failed")
            next_s += period_s
            now_s = loop.time()
            if next_s < now_s:  # overran: skip the missed ticks, keep the phase
                next_s += ((now_s - next_s) // period_s + 1) * period_s
            await asyncio.sleep(next_s - now_s)

    # -- inside ---------------------------------------------------------------------

    def _refresh_ranges(self) -> bool:
        """Limit ranges (and failsafe caps) from the driver; True if any changed."""
        ranges = [
            LimitRange(g.min_w, g.max_w) if g is not None else None for g in self._driver.gpus
        ]
        if ranges == self._ranges:
            return False
        self._ranges = ranges
        want = self.cfg.failsafe_w
        self._failsafe_w = []
        for i, r in enumerate(ranges):
            if r is None:
                self._failsafe_w.append(None)
                continue
            clamped = min(max(want, r.min_w), r.max_w)
            if clamped != want:
                log.warning(
                    "GPU %d: failsafe_w %g W is outside its NVML range [%g, %g] W; using %g W",
                    i,
                    want,
                    r.min_w,
                    r.max_w,
                    clamped,
                )
            self._failsafe_w.append(clamped)
        if len(self._applied_w) < len(ranges):
            self._applied_w += [None] * (len(ranges) - len(self._applied_w))
        return True

    def _target(self, index: int) -> float | None:
        if not self._failsafe and index in self._lease_caps:
            return self._lease_caps[index]
        return self._failsafe_w[index]

    def _targets(self) -> list[float | None]:
        return [self._target(i) for i in range(len(self._failsafe_w))]

    async def _enter_failsafe(self, reason: str) -> None:
        """Switch to the failsafe cap (caller holds the lock)."""
        self._failsafe = True
        self._failsafe_reason = reason
        self._expires_s = None
        self._lease_caps = {}
        set_gpus, failed = await self._enforce()
        caps = sorted({w for w in self._failsafe_w if w is not None})
        log.warning(
            "FAILSAFE: %s; GPUs held at the failsafe cap %s W (%d set, %d failed)",
            reason,
            "/".join(f"{w:g}" for w in caps) or "-",
            len(set_gpus),
            len(failed),
        )

    async def _enforce(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Set every GPU whose target differs from what was last set (caller holds the lock).

        The sets run side by side: each waits for NVML to confirm its limit, and one slow
        or dead GPU must not hold the others back.
        """
        todo = []
        for i, want in enumerate(self._targets()):
            have = self._applied_w[i]
            if want is not None and (have is None or abs(have - want) > SAME_CAP_W):
                todo.append((i, want))
        if not todo:
            return (), ()
        self._enforce_started += 1
        try:
            results = await asyncio.gather(
                *(self._driver.set_limit(i, w) for i, w in todo), return_exceptions=True
            )
        finally:
            self._enforce_done += 1
        done, failed = [], []
        for (i, want), result in zip(todo, results, strict=True):
            if isinstance(result, NvmlDriverError):
                self._applied_w[i] = None
                failed.append(i)
                message = str(result)
                if self._set_errors.get(i) != message:  # say it once, not every renewal
                    log.error("GPU %d: cap %g W not applied: %s", i, want, message)
                self._set_errors[i] = message
            elif isinstance(result, BaseException):
                raise result
            else:
                self._applied_w[i] = want
                self._set_errors.pop(i, None)
                done.append(i)
        return tuple(done), tuple(failed)

    def _refuse(self, seq: int | None, reason: str) -> LeaseOutcome:
        what = f"lease {seq}" if seq is not None else "a lease message"
        log.warning("refused %s: %s; nothing of it applied", what, reason)
        self._refused = Refusal(seq=seq, reason=reason)
        return LeaseOutcome("refused", reason)

    def _telemetry(self, samples: Sequence[GpuSample]) -> Telemetry:
        left_s = None
        if not self._failsafe and self._expires_s is not None:
            left_s = round(max(0.0, self._expires_s - self._clock()), 2)
        return Telemetry(
            agent_id=self.cfg.agent_id,
            node_id=self.cfg.node_id,
            ts=round(self._wall_clock(), 3),
            seq=self._seq,
            failsafe=self._failsafe,
            failsafe_reason=self._failsafe_reason,
            lease_left_s=left_s,
            refused=self._refused,
            auth_refused=self._auth_refused or None,
            power_w=[round_w(s.power_w) for s in samples],
            power_avg_w=[round_w(s.power_avg_w) for s in samples],
            limit_w=[round_w(s.limit_w) for s in samples],
            min_w=[round_w(s.min_w) for s in samples],
            max_w=[round_w(s.max_w) for s in samples],
            q=[s.quality for s in samples],
        )


def _describe(lease: Lease, caps: dict[int, float]) -> str:
    values = sorted(set(caps.values()))
    text = f"{len(caps)} GPUs at {'/'.join(f'{w:g}' for w in values)} W" if caps else "no caps"
    if lease.job_id:
        text += f", job {lease.job_id}"
    if lease.reason:
        text += f": {lease.reason}"
    return text
