"""Slurm through slurmrestd (reads) and ``scontrol`` (actions).

Slurm 22.05 (Debian 12) serves REST API ``v0.0.38``: jobs and nodes can be read, but
requeue and node drain/resume are not in that version, so actions run ``scontrol`` as an
asyncio subprocess (never blocking the loop) and turn its exit status and message into
:class:`ActionRefused` (Slurm said no) or :class:`SchedulerUnavailable` (could not ask).

Slurm cannot move a running job. :meth:`SlurmAdapter.migrate` therefore requeues it held,
excludes the named hosts (``ExcNodeList``) and releases it: it restarts elsewhere from its
last checkpoint, which is what "migrate" means to a batch scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from controller.integrations.scheduler.base import (
    DRAIN_PREFIX,
    ActionRefused,
    JobNotFound,
    JobState,
    MoveOutcome,
    SchedJob,
    SchedulerUnavailable,
)
from controller.model.secrets import read_secret

log = logging.getLogger(__name__)

API_VERSION = "v0.0.38"

_STATES: Mapping[str, JobState] = {
    "RUNNING": "running",
    "PENDING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "SUSPENDED": "suspended",
    "COMPLETING": "completing",
}

# scontrol's messages (22.05) that mean "Slurm refused" rather than "could not ask".
_NOT_FOUND = ("invalid job id", "does not exist")
_REFUSED = (
    "presently disabled",
    "only batch jobs",
    "job is no longer pending",
    "already completing or completed",
    "access/permission denied",
    "invalid node state",
    "invalid node name",
    "requested operation not supported",
)
_UNREACHABLE = ("unable to contact slurm controller", "connection refused", "timed out")


def expand_hostlist(expr: str) -> tuple[str, ...]:
    """Slurm's compact host list (``gpu[01-03,7],login1``) as names, in order.

    Zero padding of a range's first number is kept (``[08-10]`` -> 08, 09, 10). Bracket
    groups may repeat in one name (``r[1-2]n[1-2]``).
    """
    names: list[str] = []
    for part in _split_top(expr.strip()):
        if part:
            names.extend(_expand_one(part))
    return tuple(names)


def _split_top(expr: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out: list[str] = []
    for item in m.group(1).split(","):
        if "-" in item:
            a, b = item.split("-", 1)
            width = len(a)
            for n in range(int(a), int(b) + 1):
                out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
        else:
            out.extend(_expand_one(head + item + tail))
    return out


def _gres_indices(detail: str) -> tuple[int, ...] | None:
    """GPU indices on one node from a ``gres_detail`` entry (``gpu:a100:2(IDX:0,2-3)``)."""
    gpu = [p for p in re.split(r",(?=[a-z_]+:)", detail) if p.startswith("gpu")]
    if not gpu:
        return None
    out: list[int] = []
    for part in gpu:
        m = re.search(r"IDX:([0-9,\-]+)", part)
        if m is None:
            return None
        for item in m.group(1).split(","):
            a, _, b = item.partition("-")
            out.extend(range(int(a), int(b or a) + 1))
    return tuple(sorted(set(out)))


def parse_job(raw: Mapping[str, Any]) -> SchedJob:
    """One entry of ``GET /slurm/v0.0.38/jobs`` as a :class:`SchedJob`.

    Class labels are QOS then partition (QOS is the finer intent; a site without
    accounting has no QOS). Jobs are synchronous: Slurm does not say, and capping a
    training job GPU by GPU would slow it to its slowest GPU anyway.
    """
    hosts = expand_hostlist(str(raw.get("nodes") or ""))
    details = [str(d) for d in raw.get("gres_detail") or ()]
    local: tuple[tuple[int, ...], ...] = ()
    if details and len(details) == len(hosts):
        parsed = [_gres_indices(d) for d in details]
        if all(p is not None for p in parsed):
            local = tuple(p for p in parsed if p is not None)
    labels = tuple(
        str(v)
        for v in (raw.get("qos"), str(raw.get("partition") or "").split(",")[0])
        if v and str(v) != "(null)"
    )
    state = str(raw.get("job_state") or "").upper()
    return SchedJob(
        id=str(raw["job_id"]),
        hosts=hosts,
        class_labels=labels,
        local_gpus=local,
        requeueable=bool(raw.get("requeue")) and bool(raw.get("batch_flag", True)),
        migratable=False,
        synchronous=True,
        state=_STATES.get(state, "other"),
        name=str(raw.get("name") or ""),
    )


def _is_drained(node: Mapping[str, Any]) -> bool:
    words = [str(node.get("state", ""))] + [str(f) for f in node.get("state_flags") or ()]
    return any("DRAIN" in w.upper() for w in words)


TokenSource = str | Callable[[], str] | None


def token_source(env_var: str | None, file: Path | None) -> Callable[[], str] | None:
    """The JWT from ``env_var`` or ``file``, read on every request so a rotated token
    (``scontrol token`` has a lifespan) is picked up; None when neither is configured."""
    if env_var is None and file is None:
        return None

    def read() -> str:
        try:
            value = read_secret("slurm JWT", env_var, file)
        except ValueError as exc:
            raise SchedulerUnavailable(f"slurm: {exc}") from None
        assert value is not None  # a source is configured
        return value

    return read


class SlurmAdapter:
    """:class:`~controller.integrations.scheduler.base.SchedulerAdapter` for Slurm 22.05.

    ``url`` is slurmrestd (``http://host:6820``); with ``unix_socket`` the URL's host is
    ignored and local authentication applies (no token). ``token`` is the JWT (or a
    callable returning it) sent as ``X-SLURM-USER-TOKEN`` with ``user``. ``env`` is
    added to ``scontrol``'s environment (``SLURM_CONF``); ``scontrol`` names the binary.
    """

    name = "slurm"

    def __init__(
        self,
        url: str = "http://127.0.0.1:6820",
        *,
        user: str = "root",
        token: TokenSource = None,
        unix_socket: str | None = None,
        scontrol: str = "scontrol",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self._token = token
        self._scontrol = scontrol
        self._env = {**os.environ, **(env or {})}
        self.timeout_s = timeout_s
        transport = httpx.AsyncHTTPTransport(uds=unix_socket) if unix_socket else None
        self._http = httpx.AsyncClient(
            base_url="http://localhost" if unix_socket else self.url,
            transport=transport,
            timeout=timeout_s,
        )

    # -- reads --------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            return {}
        token = self._token() if callable(self._token) else self._token
        return {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": token}

    async def _get(self, path: str) -> dict[str, Any]:
        where = f"slurmrestd {self.url}{path}"
        try:
            resp = await self._http.get(path, headers=self._headers())
        except httpx.HTTPError as exc:
            raise SchedulerUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in (401, 403):
            raise SchedulerUnavailable(f"{where}: HTTP {resp.status_code}: token refused")
        try:
            body = resp.json()
        except ValueError as exc:
            raise SchedulerUnavailable(f"{where}: HTTP {resp.status_code}, not JSON") from exc
        errors = body.get("errors") if isinstance(body, dict) else None
        if resp.status_code != 200 or errors:
            text = "; ".join(
                str(e.get("description") or e.get("error") or e) if isinstance(e, dict) else str(e)
                for e in errors or ()
            )
            raise SchedulerUnavailable(
                f"{where}: HTTP {resp.status_code}: {text or resp.text[:200]}"
            )
        if not isinstance(body, dict):
            raise SchedulerUnavailable(f"{where}: unexpected JSON {type(body).__name__}")
        return body

    async def jobs(self) -> Sequence[SchedJob]:
        body = await self._get(f"/slurm/{API_VERSION}/jobs")
        out = []
        for raw in body.get("jobs") or ():
            try:
                out.append(parse_job(raw))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("slurm: skipping a job entry I cannot read: %s", exc)
        return out

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Slurm's nodes by name (state, reason, ...) as slurmrestd reports them."""
        body = await self._get(f"/slurm/{API_VERSION}/nodes")
        return {str(n["name"]): n for n in body.get("nodes") or ()}

    # -- actions --------------------------------------------------------------------------

    async def scontrol(self, *args: str) -> str:
        """Run ``scontrol ARGS``; its output, or the error Slurm gave, classified."""
        what = "scontrol " + " ".join(args)
        try:
            proc = await asyncio.create_subprocess_exec(
                self._scontrol,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise SchedulerUnavailable(f"{what}: cannot run: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s * 2)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SchedulerUnavailable(f"{what}: no answer in {self.timeout_s * 2:.0f} s") from None
        text = (err or b"").decode(errors="replace").strip() or out.decode(errors="replace").strip()
        if proc.returncode == 0:
            return out.decode(errors="replace")
        low = text.lower()
        message = f"{what}: {text or f'exit {proc.returncode}'}"
        if any(s in low for s in _NOT_FOUND):
            raise JobNotFound(message)
        if any(s in low for s in _UNREACHABLE):
            raise SchedulerUnavailable(message)
        if any(s in low for s in _REFUSED):
            raise ActionRefused(message)
        raise SchedulerUnavailable(message)

    async def requeue(self, job_id: str, reason: str) -> None:
        await self.scontrol("requeue", job_id)

    async def migrate(
        self, job_id: str, away_from_hosts: Sequence[str], reason: str
    ) -> MoveOutcome:
        """Requeue held, exclude the hosts, release: the job restarts elsewhere.

        Held so that it cannot start again on the same hosts between the requeue and the
        exclusion. If excluding fails the job is still released (a job held forever is
        worse than one that may come back), and the outcome is a plain requeue.
        """
        await self.scontrol("requeuehold", job_id)
        try:
            away = await self._known(away_from_hosts, f"migrate {job_id}")
            if away:
                await self.scontrol("update", f"JobId={job_id}", f"ExcNodeList={','.join(away)}")
        except (ActionRefused, SchedulerUnavailable) as exc:
            log.warning(
                "slurm: job %s requeued but not kept off %s: %s", job_id, away_from_hosts, exc
            )
        finally:
            await self.scontrol("release", job_id)
        return "requeued"

    async def _known(
        self, hosts: Sequence[str], what: str, nodes: Mapping[str, object] | None = None
    ) -> list[str]:
        """The hosts Slurm manages (scontrol rejects a whole update for one unknown name).

        A power tree may hold servers another scheduler runs; those are skipped with a log
        line. None known at all is a refusal: there is nothing Slurm can do.
        """
        if nodes is None:
            nodes = await self.nodes()
        known = [h for h in hosts if h in nodes]
        unknown = [h for h in hosts if h not in nodes]
        if unknown:
            log.info("slurm: %s skips hosts Slurm does not manage: %s", what, ", ".join(unknown))
        if hosts and not known:
            raise ActionRefused(f"slurm: {what}: none of {', '.join(hosts)} is a Slurm node")
        return known

    async def drain(self, hosts: Sequence[str], reason: str) -> None:
        """``State=DRAIN``: running jobs stay, nothing new starts; the reason is shown by
        ``sinfo -R`` and ``scontrol show node``."""
        known = await self._known(hosts, "drain")
        if known:
            await self.scontrol(
                "update", f"NodeName={','.join(known)}", "State=DRAIN", f"Reason={reason}"
            )

    async def resume(self, hosts: Sequence[str]) -> None:
        """``State=RESUME``, only for hosts that are draining or drained (Slurm refuses
        to resume a node in any other state, and a resume must be safe to repeat)."""
        nodes = await self.nodes()
        known = await self._known(hosts, "resume", nodes)
        draining = [h for h in known if _is_drained(nodes[h])]
        if draining:
            await self.scontrol("update", f"NodeName={','.join(draining)}", "State=RESUME")

    async def drained(self) -> dict[str, str]:
        """Nodes draining or drained with a reason of ours (``rackpower: ...``)."""
        return {
            name: str(node.get("reason", ""))
            for name, node in (await self.nodes()).items()
            if _is_drained(node) and str(node.get("reason", "")).startswith(DRAIN_PREFIX)
        }

    async def note(self, job_id: str, text: str) -> None:
        """``AdminComment``: visible in ``scontrol show job``, not the user's own ``Comment``."""
        await self.scontrol("update", f"JobId={job_id}", f"AdminComment={text[:1000]}")

    async def aclose(self) -> None:
        await self._http.aclose()
