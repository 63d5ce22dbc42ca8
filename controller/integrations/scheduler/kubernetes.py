"""Kubernetes behind the scheduler adapter Protocol (``base.SchedulerAdapter``), over REST.

Plain ``httpx`` against the real paths rather than ``kubernetes_asyncio``: the adapter
needs five calls (list pods by node, list a job's pods, evict, patch a node, create an
event), httpx is already a dependency of the controller, and the official async client
would add aiohttp and some megabytes of generated models for them. What that costs is
kubeconfig parsing: the adapter takes an API URL, a bearer token file and a CA bundle,
which is what a controller running in the cluster has (:meth:`KubeConnection.in_cluster`)
and what ``kubectl create token`` gives one running outside it.

What a "job" is: pods sharing the value of ``job_label`` in one namespace (``job-name``,
set by the Job controller; ``training.kubeflow.org/job-name`` for Kubeflow), synchronous
unless labelled otherwise; a pod without the label is a job of its own. Its hosts are the
nodes its running pods are bound to, its class labels the value of ``class_label`` (if
set) then the pod's ``priorityClassName``, which the mapping turns into the controller's
classes. Only pods that request ``gpu_resource`` count: a launcher pod draws no GPU power.

Actions:

- requeue = evict every pod of the job through the eviction API (``policy/v1``), so
  PodDisruptionBudgets are honoured; the job's controller recreates the pods. A 429 is a
  budget saying no: :class:`ActionRefused` with the API's message, never retried here.
- migrate = the same (Kubernetes cannot move a running pod): the outcome is "requeued";
  the pods stay off ``away_from_hosts`` only while those are drained, which escalation
  does for the node it relieves.
- drain/resume = cordon/uncordon (``spec.unschedulable`` through a JSON merge patch),
  with an annotation saying rackpower did it and why; resume uncordons only nodes that
  annotation marks, so a node an operator cordoned for maintenance stays cordoned.
- note = a core/v1 ``Event`` on each pod of the job (``kubectl describe pod`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from controller.integrations.scheduler.base import (
    ActionRefused,
    JobNotFound,
    JobState,
    MoveOutcome,
    SchedJob,
    SchedulerUnavailable,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DRAIN_ANNOTATION = "rackpower.io/drained"
MERGE_PATCH = "application/merge-patch+json"
LONE_POD = "pod:"  # job ids of pods without a job label: "<ns>/pod:<name>"

_PHASES: Mapping[str, JobState] = {"Running": "running", "Pending": "pending"}


@dataclass(frozen=True)
class KubeConnection:
    """Where the API server is and how to prove who we are.

    The token is read from ``token_file`` on every request: projected service-account
    tokens rotate (about hourly) and the kubelet rewrites the file in place.
    """

    api_url: str
    token_file: Path | None = None
    ca_file: Path | None = None
    verify_tls: bool = True
    timeout_s: float = 5.0

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str] | None = None) -> KubeConnection:
        """The pod's own service account, as every in-cluster client finds it."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
        host = f"[{host}]" if ":" in host else host
        return cls(
            api_url=f"https://{host}:{port}",
            token_file=SA_DIR / "token",
            ca_file=SA_DIR / "ca.crt",
        )

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SchedulerUnavailable(
                f"kubernetes: cannot read token {self.token_file}: {exc}"
            ) from exc


def _gpu_count(pod: Obj, resource: str) -> int:
    total = 0
    for c in pod.get("spec", {}).get("containers", ()):
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(resource) or (res.get("requests") or {}).get(resource)
        with contextlib.suppress(TypeError, ValueError):  # "1k" is no GPU count
            total += int(value) if value is not None else 0
    return total


def _true(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("true", "yes", "1")


class KubernetesScheduler:
    """A :class:`~controller.integrations.scheduler.base.SchedulerAdapter` for a Kubernetes cluster.

    ``hosts`` are the node names to list pods on (the power tree's GPU servers as
    Kubernetes names them): one ``fieldSelector=spec.nodeName=...`` list per node, at most
    ``concurrency`` at a time, so the cost follows the tree, not the cluster.
    """

    name = "kubernetes"

    def __init__(
        self,
        conn: KubeConnection,
        hosts: Iterable[str],
        *,
        job_label: str = "job-name",
        class_label: str | None = None,
        gpu_resource: str | None = "nvidia.com/gpu",
        requeueable_label: str = "rackpower.io/requeueable",
        requeueable_default: bool = False,
        synchronous_label: str = "rackpower.io/synchronous",
        grace_period_s: int | None = None,
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.conn = conn
        self.hosts = tuple(dict.fromkeys(hosts))
        self.job_label = job_label
        self.class_label = class_label
        self.gpu_resource = gpu_resource
        self.requeueable_label = requeueable_label
        self.requeueable_default = requeueable_default
        self.synchronous_label = synchronous_label
        self.grace_period_s = grace_period_s
        self._limit = asyncio.Semaphore(max(1, concurrency))
        verify: bool | str = str(conn.ca_file) if conn.ca_file is not None else conn.verify_tls
        self._http = httpx.AsyncClient(
            base_url=conn.api_url.rstrip("/"),
            timeout=conn.timeout_s,
            verify=verify,
            transport=transport,
            headers={"Accept": "application/json", "User-Agent": "rackpower"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- HTTP ---------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        """One request; unreachable, 5xx and 401 are :class:`SchedulerUnavailable`
        (nothing the cluster decided), every other answer goes back to the caller."""
        headers = {}
        token = self.conn.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type is not None:
            headers["Content-Type"] = content_type  # wins over json='s default
        try:
            async with self._limit:
                resp = await self._http.request(
                    method, path, params=params, json=body, headers=headers
                )
        except httpx.HTTPError as exc:
            raise SchedulerUnavailable(
                f"kubernetes: {method} {path}: {exc or type(exc).__name__}"
            ) from exc
        if resp.status_code >= 500 or resp.status_code in (401, 408):
            raise SchedulerUnavailable(
                f"kubernetes: {method} {path} answered {resp.status_code}: {_message(resp)}"
            )
        return resp

    async def _get_list(self, path: str, params: Mapping[str, str]) -> list[Obj]:
        resp = await self._call("GET", path, params=params)
        if resp.status_code != 200:
            raise SchedulerUnavailable(
                f"kubernetes: GET {path} answered {resp.status_code}: {_message(resp)}"
            )
        try:
            items = resp.json()["items"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SchedulerUnavailable(f"kubernetes: GET {path}: not a list: {exc}") from exc
        return list(items or ())

    # -- reading ------------------------------------------------------------------------

    async def _pods_on(self, host: str) -> list[Obj]:
        return await self._get_list("/api/v1/pods", {"fieldSelector": f"spec.nodeName={host}"})

    def _job_key(self, pod: Obj) -> tuple[str, str]:
        """(job id, namespace) of a pod."""
        meta = pod.get("metadata", {})
        ns = meta.get("namespace", "default")
        value = (meta.get("labels") or {}).get(self.job_label)
        return (f"{ns}/{value}" if value else f"{ns}/{LONE_POD}{meta.get('name')}"), ns

    def _label(self, pod: Obj, key: str) -> str | None:
        meta = pod.get("metadata", {})
        value = (meta.get("labels") or {}).get(key)
        if value is None:
            value = (meta.get("annotations") or {}).get(key)
        return value

    async def jobs(self) -> Sequence[SchedJob]:
        lists = await asyncio.gather(*(self._pods_on(h) for h in self.hosts))
        grouped: dict[str, list[Obj]] = {}
        for pods in lists:
            for pod in pods:
                phase = pod.get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    continue
                if self.gpu_resource is not None and _gpu_count(pod, self.gpu_resource) == 0:
                    continue
                grouped.setdefault(self._job_key(pod)[0], []).append(pod)
        return tuple(self._sched_job(job_id, pods) for job_id, pods in grouped.items())

    def _sched_job(self, job_id: str, pods: list[Obj]) -> SchedJob:
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        state: JobState = (
            "running"
            if running
            else _PHASES.get(pods[0].get("status", {}).get("phase", ""), "other")
        )
        counted = running or pods
        per_host: dict[str, int] = {}
        for p in counted:
            host = p.get("spec", {}).get("nodeName")
            if host:
                n = _gpu_count(p, self.gpu_resource) if self.gpu_resource else 0
                per_host[host] = per_host.get(host, 0) + n
        counts = set(per_host.values())
        gpus_per_host = counts.pop() if len(counts) == 1 and 0 not in counts else None
        labels: list[str] = []
        first = pods[0]
        if self.class_label is not None:
            value = self._label(first, self.class_label)
            if value:
                labels.append(value)
        pc = first.get("spec", {}).get("priorityClassName")
        if pc:
            labels.append(pc)
        requeueable = _true(self._label(first, self.requeueable_label))
        synchronous = _true(self._label(first, self.synchronous_label))
        return SchedJob(
            id=job_id,
            hosts=tuple(sorted(per_host)),
            class_labels=tuple(labels),
            gpus_per_host=gpus_per_host,
            requeueable=self.requeueable_default if requeueable is None else requeueable,
            migratable=False,  # a running pod cannot move; migrate() requeues
            synchronous=True if synchronous is None else synchronous,
            state=state,
            name=first.get("metadata", {}).get("name", ""),
        )

    async def _job_pods(self, job_id: str) -> list[Obj]:
        ns, sep, rest = job_id.partition("/")
        if not sep or not rest:
            raise JobNotFound(f"kubernetes: {job_id!r} is not a <namespace>/<job> id")
        path = f"/api/v1/namespaces/{quote(ns, safe='')}/pods"
        if rest.startswith(LONE_POD):
            params = {"fieldSelector": f"metadata.name={rest[len(LONE_POD) :]}"}
        else:
            params = {"labelSelector": f"{self.job_label}={rest}"}
        pods = [
            p
            for p in await self._get_list(path, params)
            if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
        ]
        if not pods:
            raise JobNotFound(f"kubernetes: job {job_id} has no live pods")
        return pods

    # -- acting -------------------------------------------------------------------------

    async def requeue(self, job_id: str, reason: str) -> None:
        """Evict the job's pods one by one; stop at the first refusal.

        One at a time because a PodDisruptionBudget usually protects all of a training
        job's pods alike: the first 429 then leaves the job whole instead of half evicted.
        """
        pods = await self._job_pods(job_id)
        consent = _true(self._label(pods[0], self.requeueable_label))
        if not (self.requeueable_default if consent is None else consent):
            raise ActionRefused(
                f"kubernetes: job {job_id} is not requeueable"
                f" (no {self.requeueable_label}=true on its pods)"
            )
        evicted: list[str] = []
        for pod in pods:
            meta = pod["metadata"]
            try:
                await self._evict(meta["namespace"], meta["name"])
            except JobNotFound:
                continue  # went away since the list: gone is what eviction wanted
            except ActionRefused as exc:
                done = f" after evicting {', '.join(evicted)}" if evicted else " (nothing evicted)"
                raise type(exc)(exc.reason + done, retry_after_s=exc.retry_after_s) from exc
            evicted.append(meta["name"])
        log.info("kubernetes: evicted %s of job %s: %s", ", ".join(evicted), job_id, reason)

    async def _evict(self, namespace: str, name: str) -> None:
        body: Obj = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        if self.grace_period_s is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": self.grace_period_s}
        path = (
            f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}/eviction"
        )
        resp = await self._call("POST", path, body=body)
        if resp.status_code in (200, 201):
            return
        message = _message(resp)
        if resp.status_code == 404:
            raise JobNotFound(f"kubernetes: pod {namespace}/{name} is gone: {message}")
        if resp.status_code == 429:
            raise ActionRefused(
                f"kubernetes: eviction of {namespace}/{name} refused: {message}",
                retry_after_s=_retry_after_s(resp),
            )
        raise ActionRefused(
            f"kubernetes: eviction of {namespace}/{name} answered {resp.status_code}: {message}"
        )

    async def migrate(
        self, job_id: str, away_from_hosts: Sequence[str], reason: str
    ) -> MoveOutcome:
        await self.requeue(job_id, f"{reason} (away from {', '.join(away_from_hosts)})")
        return "requeued"

    async def _patch_node(self, host: str, patch: Obj) -> Obj:
        path = f"/api/v1/nodes/{quote(host, safe='')}"
        resp = await self._call("PATCH", path, body=patch, content_type=MERGE_PATCH)
        if resp.status_code != 200:
            raise ActionRefused(
                f"kubernetes: PATCH node {host} answered {resp.status_code}: {_message(resp)}"
            )
        node: Obj = resp.json()
        return node

    async def drain(self, hosts: Sequence[str], reason: str) -> None:
        """Cordon: new pods stay off, running ones stay (that is not ``kubectl drain``)."""
        for host in hosts:
            await self._patch_node(
                host,
                {
                    "metadata": {"annotations": {DRAIN_ANNOTATION: reason or "rackpower"}},
                    "spec": {"unschedulable": True},
                },
            )

    async def resume(self, hosts: Sequence[str]) -> None:
        for host in hosts:
            path = f"/api/v1/nodes/{quote(host, safe='')}"
            resp = await self._call("GET", path)
            if resp.status_code != 200:
                raise ActionRefused(
                    f"kubernetes: GET node {host} answered {resp.status_code}: {_message(resp)}"
                )
            annotations = resp.json().get("metadata", {}).get("annotations") or {}
            if DRAIN_ANNOTATION not in annotations:
                log.info("kubernetes: node %s was not cordoned by rackpower; left as it is", host)
                continue
            await self._patch_node(
                host,
                {
                    "metadata": {"annotations": {DRAIN_ANNOTATION: None}},
                    "spec": {"unschedulable": None},
                },
            )

    async def drained(self) -> dict[str, str]:
        """Nodes of ours cordoned with rackpower's annotation, and its text."""
        out: dict[str, str] = {}
        for node in await self._get_list("/api/v1/nodes", {}):
            meta = node.get("metadata", {})
            note = (meta.get("annotations") or {}).get(DRAIN_ANNOTATION)
            if note is not None and meta.get("name") in self.hosts:
                out[str(meta["name"])] = str(note)
        return out

    async def note(self, job_id: str, text: str) -> None:
        pods = await self._job_pods(job_id)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for pod in pods:
            meta = pod["metadata"]
            event: Obj = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.rackpower-"},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta.get("uid", ""),
                },
                "reason": "PowerControl",
                "message": text[:1024],
                "type": "Normal",
                "source": {"component": "rackpower"},
                "reportingComponent": "rackpower",
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            path = f"/api/v1/namespaces/{quote(meta['namespace'], safe='')}/events"
            resp = await self._call("POST", path, body=event)
            if resp.status_code not in (200, 201):
                raise ActionRefused(
                    f"kubernetes: event on {meta['namespace']}/{meta['name']} answered"
                    f" {resp.status_code}: {_message(resp)}"
                )


def _message(resp: httpx.Response) -> str:
    """The ``message`` of a ``Status`` body, or the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return resp.text[:200]


def _retry_after_s(resp: httpx.Response) -> float | None:
    header = resp.headers.get("Retry-After")
    if header:
        try:
            return float(header)
        except ValueError:
            pass
    try:
        seconds = resp.json().get("details", {}).get("retryAfterSeconds")
    except (ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, int | float) and seconds > 0 else None
