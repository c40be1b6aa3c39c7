"""Shared pytest setup: import the flat top-level modules, and the `slow` marker.

`python -m pytest` runs the fast tests; `python -m pytest -m slow` the slow ones (over ~10 s);
`python -m pytest -m "slow or not slow"` everything.
"""
import pytest
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (CI runs them too)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return   # an explicit marker expression decides
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
