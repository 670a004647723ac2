"""pkgs/llmhop/package.nix: built from the source set Nix gives it, as its build sandbox runs
its phases; and its install, run here with the host's python3, starting from bytecode."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nix_harness import build_in_sandbox, llmhop_package, sandbox_unavailable

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


@pytest.fixture
def build_top() -> Iterator[Path]:
    """The build directory, as short as can be had: the router's tests bind unix sockets below
    TMPDIR, and a socket's path is limited to 107 bytes (the sandbox's is /build)."""
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="llmhop-build-"))
    yield path
    shutil.rmtree(path)


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's final summary line ("=== 3 passed, 1 skipped in 0.5s ===")."""
    lines = [line for line in output.splitlines() if re.match(r"=+ .* in [\d.]+s", line)]
    assert lines, f"no pytest summary in:\n{output[-3000:]}"
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", lines[-1])}


def run_installed(
    out: Path, program: str, *args: str, check: bool
) -> subprocess.CompletedProcess[str]:
    """One of the package's programs, run from its output as a user would."""
    return subprocess.run(
        [out / "bin" / program, *args], capture_output=True, text=True, timeout=30, check=check
    )


def test_the_package_checks_and_installs_in_its_build_sandbox(
    tmp_path: Path, build_top: Path
) -> None:
    """Only what the filtered source holds, only nativeCheckInputs and stdenv's tools on
    PATH, no HOME, no network but loopback: what breaks here breaks `nix build`."""
    build = build_in_sandbox(tmp_path, build_top)
    check = build.phases["checkPhase"]
    log = check.stdout[-6000:] + check.stderr[-2000:]
    assert check.returncode == 0, log
    counts = pytest_counts(check.stdout)
    assert counts.get("passed", 0) > 0, log
    assert counts.keys() <= {"passed", "skipped"}, log
    assert list(build.phases) == ["checkPhase", "installPhase", "installCheckPhase"]
    for phase in ("installPhase", "installCheckPhase"):
        done = build.phases[phase]
        assert done.returncode == 0, done.stdout + done.stderr

    version = run_installed(build.out, "llmhop", "--version", check=True)
    assert version.stdout == f"llmhop {build.derivation['version']}\n"
    usage = run_installed(build.out, "llmhop-notify", "-h", check=False)
    assert usage.stderr.startswith("usage: llmhop-notify"), usage.stderr


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
    usage = run_installed(package, "llmhop-notify", check=False)
    assert usage.returncode == 1
    assert "llmhop-notify: -url is required" in usage.stderr
