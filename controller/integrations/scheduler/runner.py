"""The daemon's side of a scheduler: a job list that never blocks, and queued actions.

The control cycle must not wait on a scheduler that may be slow or down. The link polls
the adapter in its own task and keeps the last good mapping; the cycle reads it with
:meth:`SchedulerLink.jobs_for_policy` (a plain attribute read). Escalation actions are
queued by :meth:`submit_action` and executed one at a time by :meth:`run`; each outcome
goes to ``on_result`` for the audit trail and MQTT.

When the scheduler cannot be reached, the alarm is raised at once (``status().alarm``) and
the last good list is still served for ``stale_after_s`` (jobs rarely change within
seconds); after that the policy gets :func:`fallback_jobs` (every server one capping
group, nothing movable) until a poll succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from controller.integrations.scheduler.base import (
    DRAIN_PREFIX,
    ActionRefused,
    SchedJob,
    SchedulerAdapter,
    SchedulerError,
    SchedulerUnavailable,
)
from controller.integrations.scheduler.mapping import HostMap, JobMapping, fallback_jobs, map_jobs
from controller.model.config import SchedulerConfig
from controller.model.topology import PowerTree
from controller.policy.types import Job, Migrate, Requeue

log = logging.getLogger(__name__)

ActionKind = Literal["requeue", "migrate", "drain", "resume"]


@dataclass(frozen=True)
class ActionResult:
    """What became of one scheduler action (audit line, MQTT event).

    ``outcome``: ``requeued``/``migrated``/``drained``/``resumed`` when done, ``refused``
    when the scheduler said no (``error`` says why), ``failed`` when it could not be asked,
    ``adopted`` for a drain an earlier run left (now resumed in its turn).
    """

    kind: ActionKind
    target: str  # job id, or the power-tree node drained/resumed
    hosts: tuple[str, ...]
    outcome: str
    reason: str
    error: str = ""
    t_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome not in ("refused", "failed")


@dataclass(frozen=True)
class LinkStatus:
    """For the API, metrics and alarms. ``alarm`` is set while the scheduler is unreachable."""

    scheduler: str
    connected: bool
    fallback: bool  # the policy is getting per-server groups, not jobs
    alarm: str | None
    last_ok_s: float | None  # monotonic time of the last good poll
    jobs: int
    unknown_hosts: tuple[str, ...]
    drained: tuple[str, ...]  # power-tree nodes this link keeps new work off


@dataclass(frozen=True)
class _Item:
    kind: ActionKind
    target: str  # job id (requeue, migrate) or power-tree node (drain, resume)
    reason: str
    node_id: str = ""  # migrate: the node the job must leave
    resume_above_w: float = 0.0  # drain: headroom needed before resuming


@dataclass
class _Drain:
    hosts: tuple[str, ...]
    resume_above_w: float
    clear_since_s: float | None = None


class SchedulerLink:
    """Non-blocking job list and queued escalation for the control daemon.

    ``headroom_w(node_id)`` is read (never awaited) to decide when a drained node may
    take work again: its headroom must stay above the drain's ``resume_above_w`` for
    ``resume_hold_s``. ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        adapter: SchedulerAdapter,
        tree: PowerTree,
        config: SchedulerConfig,
        *,
        hosts: HostMap | None = None,
        poll_s: float = 5.0,
        stale_after_s: float = 30.0,
        resume_hold_s: float = 60.0,
        headroom_w: Callable[[str], float | None] | None = None,
        on_result: Callable[[ActionResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [c.name for c in tree.site.policy.priority_classes]
        for label, cls in config.class_map.items():
            if cls not in names:
                raise ValueError(
                    f"integrations.scheduler.class_map.{label}: {cls!r} is not a priority"
                    f" class (one of {names})"
                )
        self.adapter = adapter
        self.tree = tree
        self.config = config
        self.hosts = hosts or HostMap(tree)
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.resume_hold_s = resume_hold_s
        self._headroom_w = headroom_w
        self._on_result = on_result
        self._clock = clock
        self._fallback = fallback_jobs(tree, tree.site.policy)
        self._mapping: JobMapping | None = None
        self._raw: tuple[SchedJob, ...] | None = None
        self._last_ok_s: float | None = None
        self._error: str | None = None
        self._in_fallback = False
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._busy: set[str] = set()
        self._drains: dict[str, _Drain] = {}
        self._adopted = False  # drains left by an earlier run taken over
        # Cap notes: the newest text per job waits here (a job noted again before its turn
        # just gets the newer text); never in the escalation queue, so they cannot delay it.
        self._notes: dict[str, str] = {}
        self._notes_ready = asyncio.Event()
        self._noted: dict[str, tuple[bool, float]] = {}  # job -> (capped, when noted)
        self._moved: dict[str, float] = {}  # job -> when we moved it (its note stands)
        self._note_lock = asyncio.Lock()  # a move's note lands after any cap note in flight
        self.results: list[ActionResult] = []  # recent outcomes, newest last (bounded)

    # -- read side (called from the cycle: never awaits) ------------------------------------

    def jobs_for_policy(self) -> tuple[Job, ...]:
        """The last good job list, or the per-server fallback when there is none."""
        now = self._clock()
        fresh = (
            self._mapping is not None
            and self._last_ok_s is not None
            and (self._error is None or now - self._last_ok_s <= self.stale_after_s)
        )
        if fresh and self._mapping is not None:
            if self._in_fallback:
                log.warning("scheduler %s: job list back, fallback ended", self.adapter.name)
                self._in_fallback = False
            return self._mapping.jobs
        if not self._in_fallback:
            log.error(
                "scheduler %s: no job list (%s); capping each GPU server as one group",
                self.adapter.name,
                self._error or "not polled yet",
            )
            self._in_fallback = True
        return self._fallback

    def status(self) -> LinkStatus:
        jobs = self.jobs_for_policy()
        return LinkStatus(
            scheduler=self.adapter.name,
            connected=self._error is None and self._last_ok_s is not None,
            fallback=jobs is self._fallback,
            alarm=None if self._error is None else f"scheduler {self.adapter.name}: {self._error}",
            last_ok_s=self._last_ok_s,
            jobs=0 if jobs is self._fallback else len(jobs),
            unknown_hosts=self._mapping.unknown_hosts if self._mapping else (),
            drained=tuple(sorted(self._drains)),
        )

    # -- write side (called from the cycle: queues, never awaits) ----------------------------

    def submit_action(self, action: Migrate | Requeue) -> bool:
        """Queue an escalation; False when the same job already has one queued or running."""
        if action.job_id in self._busy:
            return False
        self._busy.add(action.job_id)
        kind: ActionKind = "migrate" if isinstance(action, Migrate) else "requeue"
        self._queue.put_nowait(_Item(kind, action.job_id, action.reason, action.node_id))
        if action.node_id in self.tree:
            # The job must not come straight back: keep new work off until headroom returns.
            self._queue.put_nowait(_Item("drain", action.node_id, action.reason))
        return True

    def drain_until_headroom(self, node_id: str, reason: str, resume_above_w: float = 0.0) -> None:
        """Keep new work off every GPU server under ``node_id`` until its headroom returns.

        ``run`` resumes the servers once ``headroom_w(node_id)`` has stayed above
        ``resume_above_w`` for ``resume_hold_s`` (so a dip does not flap the drain).
        """
        self.tree.node(node_id)  # KeyError names an unknown node
        self._queue.put_nowait(_Item("drain", node_id, reason, resume_above_w=resume_above_w))

    def note_cap(self, job_id: str, capped: bool, text: str) -> bool:
        """Queue a note on the job when it is first capped or released, and at most once
        per ``note_caps_every_s`` while it stays capped; True when one was queued."""
        every_s = self.config.note_caps_every_s
        now = self._clock()
        if job_id in self._busy or now - self._moved.get(job_id, -math.inf) < every_s:
            return False  # being moved, or just moved: the note saying why must stand
        last = self._noted.get(job_id)
        if last is not None and last[0] == capped and now - last[1] < every_s:
            return False
        if last is None and not capped:
            return False  # never capped by us: nothing to take back
        self._noted[job_id] = (capped, now)
        self._notes[job_id] = text
        self._notes_ready.set()
        return True

    def resume(self, node_id: str) -> None:
        """Let work back onto ``node_id`` now (an operator's decision)."""
        self._queue.put_nowait(_Item("resume", node_id, "operator"))

    # -- the task ---------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Poll the scheduler once; False (and the alarm set) when it could not be read."""
        try:
            raw = tuple(await self.adapter.jobs())
        except SchedulerError as exc:
            if self._error is None:
                log.error("scheduler %s unreachable: %s", self.adapter.name, exc)
            self._error = str(exc)
            return False
        if self._error is not None:
            log.warning("scheduler %s reachable again", self.adapter.name)
        self._error = None
        self._last_ok_s = self._clock()
        if raw != self._raw:
            self._raw = raw
            self._mapping = map_jobs(
                raw, self.tree, self.hosts, self.config.class_map, self.tree.site.policy
            )
            running = {j.id for j in raw}
            self._noted = {j: v for j, v in self._noted.items() if j in running}
        every_s = self.config.note_caps_every_s
        self._moved = {j: t for j, t in self._moved.items() if self._last_ok_s - t < every_s}
        return True

    async def run(self) -> None:
        """Poll, execute queued actions and resume drains, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._poll_loop())
            tg.create_task(self._action_loop())
            tg.create_task(self._note_loop())

    async def _poll_loop(self) -> None:
        while True:
            if await self.refresh() and not self._adopted:
                await self.adopt_drains()
            self.check_drains()
            await asyncio.sleep(self.poll_s)

    async def adopt_drains(self) -> None:
        """Take over the drains an earlier run left, so they are resumed in their turn.

        A controller restarted while a node was drained would otherwise never let work
        back on it. The drain's reason names the power-tree node (``rackpower: <node>:
        ...``); a host whose reason does not is kept under its own GPU server.
        """
        try:
            found = await self.adapter.drained()
        except SchedulerError as exc:
            log.warning("scheduler %s: drained hosts not listed yet: %s", self.adapter.name, exc)
            return
        self._adopted = True
        by_node: dict[str, list[str]] = {}
        for host, reason in sorted(found.items()):
            node = _named_node(reason, self.tree) or self.hosts.node_of(host)
            if node is not None and node not in self._drains:
                by_node.setdefault(node, []).append(host)
        for node, hosts in by_node.items():
            self._drains[node] = _Drain(tuple(hosts), 0.0)
            reason = found[hosts[0]]
            log.warning(
                "scheduler %s: %s (%s) left drained by an earlier run: %s; resumed once its"
                " headroom holds",
                self.adapter.name,
                node,
                ", ".join(hosts),
                reason,
            )
            self._report(
                ActionResult("drain", node, tuple(hosts), "adopted", reason, t_s=self._clock())
            )

    async def _action_loop(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self.execute(item)
            finally:
                self._queue.task_done()

    async def _note_loop(self) -> None:
        while True:
            await self._notes_ready.wait()
            await self.send_notes()

    async def send_notes(self) -> None:
        """Leave every queued cap note now; a note that fails is logged, not retried (the
        next change or interval brings a newer one)."""
        self._notes_ready.clear()
        while self._notes:
            job_id, text = self._notes.popitem()
            if job_id in self._busy:
                continue  # a move is under way: its own note says why
            try:
                async with self._note_lock:
                    await self.adapter.note(job_id, f"{DRAIN_PREFIX} {text}"[:1000])
            except SchedulerError as exc:
                log.info("scheduler %s: no note on job %s: %s", self.adapter.name, job_id, exc)

    async def drain_queue(self) -> None:
        """Execute everything queued now (tests and shutdown; ``run`` does this itself)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            try:
                await self.execute(item)
            finally:
                self._queue.task_done()

    def check_drains(self) -> None:
        """Queue a resume for every drained node whose headroom has been back long enough."""
        if self._headroom_w is None:
            return
        now = self._clock()
        for node_id, drain in list(self._drains.items()):
            room = self._headroom_w(node_id)
            if room is None or room <= drain.resume_above_w:
                drain.clear_since_s = None
                continue
            if drain.clear_since_s is None:
                drain.clear_since_s = now
            if now - drain.clear_since_s >= self.resume_hold_s:
                drain.clear_since_s = None
                self._queue.put_nowait(_Item("resume", node_id, "headroom back"))

    async def execute(self, item: _Item) -> ActionResult:
        """Carry out one queued action now and report it."""
        kind, target, reason, above_w = item.kind, item.target, item.reason, item.resume_above_w
        hosts: tuple[str, ...] = ()
        try:
            if kind in ("requeue", "migrate"):
                self._notes.pop(target, None)  # a pending cap note must not replace this one
                self._noted.pop(target, None)
                self._moved[target] = self._clock()
                hosts = self._hosts_of_job(target)
                with contextlib.suppress(SchedulerError):  # a note is nice, not needed
                    async with self._note_lock:
                        await self.adapter.note(target, f"{DRAIN_PREFIX} {reason}"[:1000])
                if kind == "requeue":
                    await self.adapter.requeue(target, reason)
                    outcome = "requeued"
                else:
                    away = self._away_hosts(target, item.node_id)
                    outcome = await self.adapter.migrate(target, away, reason)
            elif kind == "drain":
                hosts = self.hosts.hosts_under(self.tree, target)
                if target in self._drains:
                    self._drains[target].resume_above_w = max(
                        self._drains[target].resume_above_w, above_w
                    )
                    outcome = "drained"
                else:
                    await self.adapter.drain(hosts, f"{DRAIN_PREFIX} {reason}"[:200])
                    self._drains[target] = _Drain(hosts, above_w)
                    outcome = "drained"
            else:
                drain = self._drains.get(target)
                hosts = drain.hosts if drain else self.hosts.hosts_under(self.tree, target)
                # Another drained node may cover some of the same servers: keep those off.
                still = {h for n, d in self._drains.items() if n != target for h in d.hosts}
                await self.adapter.resume([h for h in hosts if h not in still])
                self._drains.pop(target, None)
                outcome = "resumed"
            result = ActionResult(kind, target, hosts, outcome, reason, t_s=self._clock())
        except ActionRefused as exc:
            result = ActionResult(kind, target, hosts, "refused", reason, exc.reason, self._clock())
        except SchedulerUnavailable as exc:
            result = ActionResult(kind, target, hosts, "failed", reason, str(exc), self._clock())
        finally:
            self._busy.discard(target)
        log.log(
            logging.INFO if result.ok else logging.WARNING,
            "scheduler %s: %s %s -> %s%s",
            self.adapter.name,
            kind,
            target,
            result.outcome,
            f" ({result.error})" if result.error else "",
        )
        self._report(result)
        return result

    def _report(self, result: ActionResult) -> None:
        self.results = [*self.results[-99:], result]
        if self._on_result is not None:
            self._on_result(result)

    def _hosts_of_job(self, job_id: str) -> tuple[str, ...]:
        for sj in self._raw or ():
            if sj.id == job_id:
                return sj.hosts
        return ()

    def _away_hosts(self, job_id: str, node_id: str) -> Sequence[str]:
        """Hosts the job must leave: every server under the node the policy named (a rack
        over its envelope), or the job's own known hosts when the node is not in the tree."""
        if node_id in self.tree:
            return self.hosts.hosts_under(self.tree, node_id)
        return [h for h in self._hosts_of_job(job_id) if self.hosts.node_of(h) is not None]


def _named_node(reason: str, tree: PowerTree) -> str | None:
    """The power-tree node a drain reason of ours names (``rackpower: <node>: ...``)."""
    if not reason.startswith(DRAIN_PREFIX):
        return None
    head = reason[len(DRAIN_PREFIX) :].split(":", 1)[0].strip()
    return head if head in tree and tree.node(head).kind != "gpu" else None
