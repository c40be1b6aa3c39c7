"""Shared pytest setup: import the flat top-level modules, and the `slow` marker.

Fast tests run by default; `pytest -m slow` runs the slow ones, `pytest -m "slow or not slow"` all.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (CI runs them too)")
