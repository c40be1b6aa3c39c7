"""Shared pytest setup: import the flat top-level modules, and the `slow` marker.

`python -m pytest` runs the fast tests; `python -m pytest -m slow` the slow ones (over ~10 s);
`python -m pytest -m "slow or not slow"` everything.
"""
import pytest
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU then cannot stall them.
    A module opts in with: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (CI runs them too)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return   # an explicit marker expression decides
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
