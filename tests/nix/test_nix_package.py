"""pkgs/llmhop/package.nix's install: its own phases run here with the host's python3."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nix_harness import llmhop_package

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def test_the_router_starts_from_the_bytecode_built_with_it(tmp_path: Path) -> None:
    """A script would be compiled at every start, and a fifth of the idle router's memory is
    what compiling leaves behind."""
    package = llmhop_package(tmp_path)
    cached = next((package / "lib" / "llmhop" / "__pycache__").glob("llmhop.*.pyc"))
    # Flags 0b01: hash-based and never checked against the source (the store is immutable).
    assert int.from_bytes(cached.read_bytes()[4:8], "little") == 0b01
    started = subprocess.run(
        ["python3", "-v", package / "bin" / "llmhop", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert started.stdout.startswith("llmhop ")
    assert f"code object from '{cached}'" in started.stderr


def test_llmhop_notify_is_the_same_program_by_another_name(tmp_path: Path) -> None:
    package = llmhop_package(tmp_path)
    notify = package / "bin" / "llmhop-notify"
    assert notify.is_symlink() and notify.readlink() == Path("llmhop")
    usage = subprocess.run([notify], capture_output=True, text=True, timeout=30, check=False)
    assert usage.returncode == 1
    assert "llmhop-notify: -url is required" in usage.stderr
