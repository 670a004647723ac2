"""Fixtures of the Nix harness; see docs/nix.md."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nix_harness as harness
import quadlet_generator
import systemd_ns


def skip_or_fail(reason: str) -> NoReturn:
    """Skip for want of a tool or input, except in CI (or when asked), where it fails: CI's
    machine is prepared by tests/nix/setup.sh, so anything missing there is a defect."""
    if os.environ.get("CI") == "true" or os.environ.get("LLMHOP_REQUIRE_E2E") == "1":
        pytest.fail(f"{reason} (CI=true or LLMHOP_REQUIRE_E2E=1: failing, not skipping)", False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ruff() -> Path:
    """The venv's ruff (the version tests/requirements.txt pins), else the one on PATH (a
    Nix devShell's)."""
    beside = Path(sys.executable).parent / "ruff"
    found = beside if beside.is_file() else shutil.which("ruff")
    if found is None:
        skip_or_fail(
            "ruff is not installed: pip install -r tests/requirements.txt (tests/run does)"
        )
    return Path(found)


@pytest.fixture(scope="session")
def openai_client() -> None:
    """The official client, which checks/vm/client.py imports, under this interpreter."""
    if importlib.util.find_spec("openai") is None:
        skip_or_fail(
            "the openai client is not installed: pip install -r tests/requirements-e2e.txt"
            " (tests/e2e/setup.sh does)"
        )


@pytest.fixture(scope="session")
def nix_inputs() -> None:
    """Skip unless Nix and the offline flake inputs are prepared."""
    reason = harness.missing_inputs()
    if reason:
        skip_or_fail(reason)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The folder of git snapshots that the flake inputs are prepared from."""
    path = os.environ.get("LLMHOP_MIRROR")
    if not path:
        skip_or_fail("LLMHOP_MIRROR is not set: no snapshots to prepare the flake inputs from")
    return Path(path)


@pytest.fixture(scope="session")
def nix_tools() -> None:
    """Skip unless nix-instantiate is installed (parsing needs no inputs)."""
    reason = harness.missing_nix()
    if reason:
        skip_or_fail(reason)


@pytest.fixture(scope="session")
def systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        skip_or_fail(f"systemd-analyze is not installed; prepare with: {harness.PREPARE_COMMAND}")


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


@pytest.fixture
def ns(
    request: pytest.FixtureRequest, scratch: Path, nix_inputs: None
) -> Iterator[systemd_ns.SystemdNamespace]:
    """The test module's `scenario(scratch)`, an evaluated system, booted under a real
    systemd."""
    with systemd_ns.booted(request.module.scenario(scratch)) as namespace:
        yield namespace


@pytest.fixture(scope="session")
def generator() -> Path:
    path = quadlet_generator.generator_path()
    if os.access(path, os.X_OK):
        return path
    reason = (
        f"Podman's Quadlet generator is not at {path}: build it with {quadlet_generator.SETUP},"
        " or point LLMHOP_QUADLET at a Podman's libexec/podman/quadlet"
    )
    skip_or_fail(reason)
