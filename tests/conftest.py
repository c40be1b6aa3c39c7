"""Shared pytest setup: import the flat top-level modules, and the `slow` marker.

`python -m pytest` runs the fast tests; `python -m pytest -m slow` the slow ones (over ~10 s);
`python -m pytest -m "slow or not slow"` everything.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(script, *args, ok=True, env=None):
    """Run one of the top-level scripts as a user would; on failure, show its output."""
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    if ok and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def sample_text(stdout):
    """sample.py's samples as printed: its output before the statistics ("N new tokens ..."), without the config
    echo ("Overriding: ...", which names --stream): --stream's and --stream=False's must be the same."""
    lines = [line for line in stdout.splitlines() if not line.startswith("Overriding")]
    return "\n".join(lines[:next(i for i, line in enumerate(lines) if re.match(r"\d+ new tokens", line))])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Shakespeare prepared once for the whole session."""
    import data
    d = str(tmp_path_factory.mktemp("data"))
    data.prepare("shakespeare", "char", d)
    return d


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
