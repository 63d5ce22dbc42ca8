"""``rackpower shipped [NAME]``: where the installed package keeps the files it ships.

A controller host installed from a wheel (or pipx) has no git checkout, so the example
sites, device maps, scenarios, systemd units and Slurm hooks live inside the package.
Without NAME this lists them with their paths; with NAME (``sites/demo.yaml``) it prints
only that file's path, for the shell: ``rackpower validate "$(rackpower shipped
sites/demo.yaml)"`` or ``cp "$(rackpower shipped deploy/rackpower.service)" /etc/systemd/system/``.
Exit codes: 0 found, 2 no such shipped file.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from drivers.shipped import ShippedFileError, config_path, shipped_file, shipped_files

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def cmd_shipped(args: argparse.Namespace) -> int:
    if args.name is not None:
        try:
            print(shipped_file(args.name))
        except ShippedFileError as exc:
            print(f"rackpower shipped: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return EXIT_OK
    files = shipped_files()
    width = max(len(name) for name, _ in files)
    print(f"shipped with rackpower, in {config_path()}:")
    for name, path in files:
        print(f"  {name:{width}}  {path}")
    return EXIT_OK


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "shipped",
        help="list the example sites, device maps, scenarios and deploy files the package ships",
        description=(
            "List the files installed with rackpower (example sites, device maps, scenarios,"
            " agent example, systemd units, Slurm hooks) and their paths; with NAME, print"
            " only that file's path. A site's own device maps go in a directory named by"
            " RACKPOWER_DEVICE_MAPS, which is searched before the shipped ones."
        ),
    )
    p.add_argument("name", nargs="?", help="a shipped file, e.g. sites/demo.yaml")
    p.set_defaults(handler=cmd_shipped)
