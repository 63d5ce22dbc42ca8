"""What every long-running command does first: load its site, set up its log.

Kept out of ``controller.cli`` (which imports every command module) so the commands can
share it without an import cycle.
"""

from __future__ import annotations

import logging
import sys

from controller.config import ConfigError, Site, load_site

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def load_site_or_report(path: str) -> Site | None:
    """The validated site, or None after printing every problem on stderr (exit 2)."""
    try:
        return load_site(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
