"""Fixtures of the Nix harness; see docs/nix.md."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nix_harness as harness
import systemd_ns


@pytest.fixture(scope="session")
def nix_inputs() -> None:
    """Skip unless Nix and the offline flake inputs are prepared."""
    reason = harness.missing_inputs()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def nix_tools() -> None:
    """Skip unless nix-instantiate is installed (parsing needs no inputs)."""
    reason = harness.missing_nix()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip(f"systemd-analyze is not installed; prepare with: {harness.PREPARE_COMMAND}")


@pytest.fixture(scope="session")
def real_systemd() -> None:
    reason = systemd_ns.unavailable()
    if reason:
        pytest.skip(f"cannot boot systemd in namespaces: {reason}")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory that units in the systemd namespace can see (not under /tmp)."""
    path = systemd_ns.scratch_dir("pkgs-")
    yield path
    systemd_ns.remove_scratch(path)
