"""The files rackpower ships: device maps, example sites, scenarios, agent and deploy examples.

This folder is a package, and nothing more, so that the one copy of each file in the
repository is also the copy a wheel installs (``[tool.setuptools.package-data]``) and is
found the same way in both, through :mod:`importlib.resources` (see
:mod:`drivers.shipped`). Code does not belong here.
"""
