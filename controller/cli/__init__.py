"""The ``rackpower`` command line: :func:`main` and one module per sub-command.

``main`` is re-exported here so the console script (``controller.cli:main``) and
``from controller.cli import main`` name the package, not the module that holds it.
"""

from controller.cli.main import main

__all__ = ["main"]
