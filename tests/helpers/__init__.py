"""Shared test helpers: plain modules, importable from any test (``tests/conftest.py`` lists them).

Fixtures that start servers live in ``tests/fixtures``; what is here starts nothing.
"""
