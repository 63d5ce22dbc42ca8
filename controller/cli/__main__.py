"""``python -m controller.cli``: the same entry point as the ``rackpower`` script."""

import sys

from controller.cli.main import main

sys.exit(main())
