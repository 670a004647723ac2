"""Every .nix file of the repository parses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from nix_harness import REPO, nix_env

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_tools")]


def nix_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.nix"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted({REPO / line for line in out.stdout.splitlines() if (REPO / line).exists()})


def parse(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--parse", str(path)],
        capture_output=True,
        text=True,
        env=nix_env(),
        timeout=60,
        check=False,
    )


def test_the_repository_has_nix_files() -> None:
    names = {p.relative_to(REPO).as_posix() for p in nix_files()}
    assert {"flake.nix", "pkgs/llmhop/package.nix", "modules/nixos/router.nix"} <= names


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_parses(path: Path) -> None:
    proc = parse(path)
    assert proc.returncode == 0, proc.stderr


def test_a_syntax_error_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nix"
    broken.write_text("{ lib, ... }: { options.x = lib.mkOption { type = lib.types.str; ; }\n")
    proc = parse(broken)
    assert proc.returncode != 0
    assert "syntax error" in proc.stderr
