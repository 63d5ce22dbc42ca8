"""The system programs tests drive (mosquitto, snmpd, mbpoll, promtool...): found, or why not.

On a developer's machine a missing program skips its tests with the Debian package to
install; under CI (``CI`` set) it fails them, because `make system-deps` should have
installed it and a suite that silently skips is a suite that cannot fail.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str | None = None) -> str:
    """The path of ``name`` (on PATH or in /usr/sbin); skip, or fail under CI, when missing."""
    sbin = f"/usr/sbin/{name}"
    path = shutil.which(name) or (sbin if os.access(sbin, os.X_OK) else None)
    if path is None:
        reason = f"{name} not installed (apt-get install {package or name})"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI is set: `make system-deps` should have installed it")
        pytest.skip(reason)
    return path
