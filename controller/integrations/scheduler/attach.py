"""Join the controller and the site's scheduler: jobs in, escalations out, all audited.

The cycle never awaits the scheduler: it reads the last good job list and queues
escalations; :class:`~controller.integrations.scheduler.runner.SchedulerLink` runs them in
its own task.
Each outcome (requeued, migrated, drained, resumed, refused, failed) goes to the audit
trail and, as an ``escalation`` alarm, to the BMS. A scheduler that cannot be reached
raises an alarm and the policy falls back to grouping GPUs by server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from controller.core.alarms import Alarm, AlarmKind
from controller.core.audit import CAP, action_kind
from controller.core.controller import Controller
from controller.core.result import CycleResult
from controller.integrations.scheduler.base import SchedulerAdapter
from controller.integrations.scheduler.factory import host_map
from controller.integrations.scheduler.mapping import FALLBACK_PREFIX
from controller.integrations.scheduler.runner import ActionResult, SchedulerLink
from controller.model.config import SchedulerConfig
from controller.policy import Action, SetCap
from controller.support.retry import retry_forever

log = logging.getLogger(__name__)


class SchedulerIntegration:
    """The scheduler link as an :class:`~controller.core.integration.Integration`: each
    cycle's escalations and cap notes are queued on the link, its drains requested."""

    name = "scheduler"

    def __init__(self, link: SchedulerLink, on_action: Callable[[Action], None]) -> None:
        self.link = link
        self._on_action = on_action

    async def run(self, stop: asyncio.Event) -> None:
        await retry_forever("scheduler", self.link.run, stop)

    def publish(self, result: CycleResult) -> None:
        for action in result.actions:
            self._on_action(action)
        for drain in result.drains:
            self.link.drain_until_headroom(drain.node_id, drain.reason)

    async def aclose(self) -> None:
        return None  # the link's task ends with ``stop``


def attach_scheduler(
    controller: Controller, adapter: SchedulerAdapter, cfg: SchedulerConfig
) -> SchedulerIntegration:
    """Wire ``adapter`` into ``controller`` (jobs and alarms in); the service runs the
    returned integration and hands it each cycle's result (escalations and drains out)."""

    def headroom_w(node_id: str) -> float | None:
        state = controller.policy_state
        if state is None or node_id not in state.nodes.node_ids:
            return None
        k = state.nodes.node_ids.index(node_id)
        return float(state.nodes.headroom_w[k])

    def on_result(result: ActionResult) -> None:
        now = time.time()
        text = f"{result.kind} {result.target}: {result.outcome}"
        if result.error:
            text += f" ({result.error})"
        controller.audit.record(
            f"scheduler:{result.outcome}",
            f"{text}; because {result.reason}",
            now_s=now,
            job_id=result.target if result.kind in ("requeue", "migrate") else None,
            node=result.target if result.kind in ("drain", "resume") else None,
            details={"hosts": list(result.hosts)},
        )
        if result.kind in ("requeue", "migrate"):
            controller.notify(
                Alarm(
                    AlarmKind.ESCALATION,
                    result.target,
                    text,
                    now,
                    severity="critical" if result.outcome in ("refused", "failed") else "warning",
                    details={"reason": result.reason[:200]},
                )
            )

    link = SchedulerLink(
        adapter,
        controller.tree,
        cfg,
        hosts=host_map(cfg, controller.tree),
        poll_s=cfg.poll_s,
        stale_after_s=cfg.stale_after_s,
        resume_hold_s=cfg.resume_hold_s,
        headroom_w=headroom_w,
        on_result=on_result,
    )

    def on_action(action: Action) -> None:
        if controller.mode != "enforce":
            return  # advisory: audited by the cycle, not carried out
        if isinstance(action, SetCap):
            if (
                cfg.note_caps_every_s > 0
                and action.job_id
                and not action.job_id.startswith(FALLBACK_PREFIX)
            ):
                capped = action_kind(action, controller.tree) == CAP and action.limiting
                text = (
                    f"capped to {action.limit_w:.0f} W per GPU: {action.reason}"
                    if capped
                    else f"no longer capped (limit {action.limit_w:.0f} W per GPU, above"
                    " what it draws)"
                )
                link.note_cap(action.job_id, capped, text)
            return
        # The link also drains the node until its headroom returns, then resumes it.
        if not link.submit_action(action):
            log.info("escalation for job %s already under way", action.job_id)

    def scheduler_alarms(now_s: float) -> list[Alarm]:
        status = link.status()
        if not status.alarm:
            return []
        return [
            Alarm(
                AlarmKind.ESCALATION,
                f"scheduler-{status.scheduler}",
                f"scheduler {status.scheduler} unreachable: caps fall back to grouping GPUs"
                " by server and no job can be moved",
                now_s,
                severity="critical",
            )
        ]

    controller.jobs_provider = link.jobs_for_policy
    # A node that ignores its caps stays drained until an operator resumes it (its
    # headroom never "returns": a GPU server is not a constraint node).
    controller.can_drain = True
    controller.alarm_sources.append(scheduler_alarms)
    return SchedulerIntegration(link, on_action)
