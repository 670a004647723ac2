"""The sample files the README points to stay valid, and the project's files agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from support import ROOT, WAIT, llmhop

SYSTEMD_EXAMPLES = ROOT / "examples" / "systemd"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("LLMHOP_REQUIRE_E2E"),
    reason="systemd-analyze is missing: apt-get install systemd (tests/run does)",
)


def test_example_config_loads() -> None:
    config = llmhop.load_config(str(ROOT / "examples" / "config.json"), check_only=True)
    # Loopback: the example injects an OpenAI key, which nobody else may spend.
    assert config.listener == llmhop.Listener("127.0.0.1", 8080)
    assert sorted(config.models) == ["openai-gpt-4o", "qwen3-8b"]
    assert config.models["openai-gpt-4o"].upstream_model == b'"gpt-4o"'
    assert config.warnings == ()


def test_the_router_and_the_package_have_one_version() -> None:
    """The router is one file run from anywhere, so it carries its version; the Nix package
    takes its own from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == llmhop.VERSION


@needs_systemd_analyze
def test_sample_units_verify(tmp_path: Path) -> None:
    units = [shutil.copy(path, tmp_path) for path in sorted(SYSTEMD_EXAMPLES.glob("llmhop.*"))]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units],
        capture_output=True,
        text=True,
        timeout=WAIT * 4,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


@needs_systemd_analyze
def test_sample_service_exposure_is_low(tmp_path: Path) -> None:
    unit = shutil.copy(SYSTEMD_EXAMPLES / "llmhop.service", tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", unit],
        capture_output=True,
        text=True,
        timeout=WAIT * 4,
        check=False,
    )
    match = re.search(r"Overall exposure level for llmhop\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 1.5
