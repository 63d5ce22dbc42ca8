"""What every long-running command does first: load its site, set up its log.

Kept out of ``controller.cli.main`` (which imports every command module) so the commands can
share it without an import cycle.
"""

from __future__ import annotations

import logging
import sys

from controller.cli.config_warnings import render_warnings
from controller.model.config import ConfigError, Site
from controller.model.loader import load_site

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("controller.model.config")


def load_site_or_report(path: str) -> Site | None:
    """The validated site, or None after printing every problem on stderr (exit 2)."""
    try:
        return load_site(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None


def log_site_warnings(site: Site) -> None:
    """What ``validate`` warns about, logged once at start (legal, so the start goes on)."""
    for line in render_warnings(site):
        log.warning("%s", line)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
