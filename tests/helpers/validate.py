"""Run ``rackpower validate`` on a site dict the way an engineer would: from a file.

The config table tests (tests/unit/test_config.py, tests/unit/test_config_semantics.py)
each check that one mistake is refused; writing the file, running the command and
capturing its report is the same for every row, so it lives here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cli.main import main


def refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg: dict[str, Any]
) -> tuple[Path, str]:
    """Write ``cfg`` to a file, validate it, assert exit 2 and no traceback.

    Returns the file and what went to stderr, for the caller to find its line in.
    """
    f = tmp_path / "site.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return f, err
