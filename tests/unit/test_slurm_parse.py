"""Reading slurmrestd v0.0.38 job entries: host lists, GPU indices, classes, states.

The entries are trimmed copies of what Slurm 22.05's slurmrestd returned in
tests/integration/test_slurm.py (plus multi-node forms Slurm prints on bigger clusters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.integrations.scheduler.base import SchedulerUnavailable
from controller.integrations.scheduler.slurm import (
    _gres_indices,
    expand_hostlist,
    parse_job,
    token_source,
)


@pytest.mark.parametrize(
    ("expr", "hosts"),
    [
        ("rp-gpu1", ("rp-gpu1",)),
        ("", ()),
        ("gpu[08-10],login1", ("gpu08", "gpu09", "gpu10", "login1")),
        ("r[1-2]n[1,3]", ("r1n1", "r1n3", "r2n1", "r2n3")),
        ("a[1,3-4]-ib", ("a1-ib", "a3-ib", "a4-ib")),
    ],
)
def test_hostlist_expansion(expr: str, hosts: tuple[str, ...]) -> None:
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    ("detail", "idx"),
    [
        ("gpu:1(IDX:0)", (0,)),
        ("gpu:2(IDX:1-2)", (1, 2)),
        ("gpu:a100:3(IDX:0,2-3)", (0, 2, 3)),
        ("gpu:a100:1(IDX:1),gpu:h100:1(IDX:5)", (1, 5)),
        ("gpu:1(IDX:N/A)", None),
        ("mps:100", None),
    ],
)
def test_gres_detail_indices(detail: str, idx: tuple[int, ...] | None) -> None:
    assert _gres_indices(detail) == idx


def entry(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": 7,
        "job_state": "RUNNING",
        "nodes": "rp-gpu1",
        "gres_detail": ["gpu:2(IDX:1-2)"],
        "qos": "",
        "partition": "low",
        "requeue": True,
        "batch_flag": True,
        "name": "wrap",
    }
    return base | kw


def test_job_entry_becomes_a_sched_job() -> None:
    job = parse_job(entry())
    assert (job.id, job.hosts, job.local_gpus) == ("7", ("rp-gpu1",), ((1, 2),))
    assert job.class_labels == ("low",) and job.requeueable and job.state == "running"
    assert not job.migratable and job.synchronous


def test_qos_comes_before_partition_and_states_fold() -> None:
    job = parse_job(entry(qos="high", partition="low,high", job_state="PENDING", requeue=False))
    assert job.class_labels == ("high", "low") and job.state == "pending"
    assert not job.requeueable
    assert parse_job(entry(job_state="COMPLETED")).state == "other"


def test_gres_per_node_only_when_every_node_has_one() -> None:
    two = parse_job(entry(nodes="n[1-2]", gres_detail=["gpu:4(IDX:0-3)", "gpu:2(IDX:0-1)"]))
    assert two.hosts == ("n1", "n2") and two.local_gpus == ((0, 1, 2, 3), (0, 1))
    # No GRES (whole-node jobs) or entries that do not line up: all GPUs of each host.
    assert parse_job(entry(nodes="n[1-2]", gres_detail=[])).local_gpus == ()
    assert parse_job(entry(nodes="n[1-2]", gres_detail=["gpu:1(IDX:0)"])).local_gpus == ()


def test_token_is_read_on_every_request_from_its_file_or_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JWT has a lifespan: whatever rotates it rewrites the file (or the variable), and
    the next request must carry the new one. Unset or empty is "unavailable", not a crash."""
    assert token_source(None, None) is None
    jwt = tmp_path / "slurm.jwt"
    jwt.write_text("first\n")
    read = token_source(None, jwt)
    assert read is not None and read() == "first"
    jwt.write_text("second")
    assert read() == "second"
    jwt.unlink()
    with pytest.raises(SchedulerUnavailable, match="cannot read"):
        read()
    from_env = token_source("RP_TEST_SLURM_JWT", None)
    assert from_env is not None
    monkeypatch.delenv("RP_TEST_SLURM_JWT", raising=False)
    with pytest.raises(SchedulerUnavailable, match="RP_TEST_SLURM_JWT is not set"):
        from_env()
    monkeypatch.setenv("RP_TEST_SLURM_JWT", "tok")
    assert from_env() == "tok"
