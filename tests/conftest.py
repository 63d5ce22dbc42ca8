"""What every test shares, in one place.

- Markers by folder: a test under ``tests/integration`` is marked ``integration`` and one under
  ``tests/e2e`` is marked ``e2e``, here, so a new file cannot forget its marker
  (``pytest -m "not integration and not e2e"`` is the fast, server-free run).
- Helpers (plain modules, import them): ``tests.helpers.ports`` (free loopback ports),
  ``tests.helpers.waiting`` (``eventually``/``until``), ``tests.helpers.clock`` (a clock
  moved by hand), ``tests.helpers.mqtt`` (a user's TLS client and a recorder),
  ``tests.helpers.policy_support`` (trees and a toy plant for the policy tests), and
  ``tests.sites``, the home of the toy site configs (``tiny_site``, ``with_rack_agents``...).
- Server fixtures (real Mosquitto, VictoriaMetrics, snmpd, Slurm on loopback): ``tests.fixtures``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_MARK_BY_FOLDER = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the folder it lives in (see the module docstring)."""
    for item in items:
        try:
            folder = item.path.resolve().relative_to(_TESTS).parts[0]
        except ValueError:  # collected from outside tests/
            continue
        mark = _MARK_BY_FOLDER.get(folder)
        if mark is not None:
            item.add_marker(mark)
