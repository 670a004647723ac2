"""The benchmark's smoke tests import the harness from the repository's `bench` package (the
repository is on pytest's path, pyproject.toml)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bench: quick smoke test of the benchmark harness (bench/), not a benchmark"
    )
