"""Nix verification harness: module evaluation, unit rendering and systemd checks.

Used by the tests in this folder; see docs/nix.md. Nothing here needs full nixpkgs: the module
is evaluated with nixpkgs' lib, the real quadlet-nix module and stubs (evaluate.nix).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FLAKE_LOCK = REPO / "flake.lock"

PREPARE_COMMAND = f"bash {HERE.relative_to(REPO)}/setup.sh"
NIX_CONFIG = "experimental-features = nix-command flakes\nsubstituters =\n"
NIXPKGS_LIB_CACHE = Path.home() / ".cache" / "llmhop" / "nixpkgs-lib"

# The flake.lock nodes the harness evaluates with.
HARNESS_INPUTS = ("nixpkgs-lib", "quadlet-nix")


class NixEvalError(Exception):
    """nix-instantiate failed: a type error, a conflict, a throw, a missing option."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


class FailedAssertions(Exception):
    """The configuration evaluated, but NixOS would refuse it: some assertions failed."""

    def __init__(self, messages: list[str], result: dict[str, Any]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages
        self.result = result


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG + env.get("NIX_CONFIG", "")
    return env


def locked_store_path(node: str) -> Path:
    """The /nix/store path of a flake.lock node (exists only once the inputs are prepared)."""
    lock = json.loads(FLAKE_LOCK.read_text())
    nar_hash = lock["nodes"][node]["locked"]["narHash"]
    out = subprocess.run(
        ["nix-store", "--print-fixed-path", "--recursive", "sha256", nar_hash, "source"],
        capture_output=True,
        text=True,
        check=True,
        env=nix_env(),
        timeout=60,
    )
    return Path(out.stdout.strip())


def missing_nix() -> str | None:
    """Why the Nix tests cannot run here (with the command that fixes it), or None."""
    for tool in ("nix", "nix-instantiate", "nix-store"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; prepare with: {PREPARE_COMMAND}"
    return None


def missing_inputs() -> str | None:
    """Why the offline flake inputs are unusable (with the command that fixes it), or None."""
    reason = missing_nix()
    if reason:
        return reason
    for node in HARNESS_INPUTS:
        path = locked_store_path(node)
        if not path.is_dir():
            return f"flake input {node} is not in {path}; prepare with: {PREPARE_COMMAND}"
    if not (NIXPKGS_LIB_CACHE / "lib").is_dir():
        return f"{NIXPKGS_LIB_CACHE} is missing; prepare with: {PREPARE_COMMAND}"
    return None


def mk_force(value: Any) -> dict[str, Any]:
    """lib.mkForce written as JSON, for configurations passed to evaluate()."""
    return {"_type": "override", "priority": 50, "content": value}


def evaluate(
    config: dict[str, Any] | None = None,
    *,
    module: Path | None = None,
    pkgs: dict[str, str] | None = None,
    check_assertions: bool = True,
    timeout: float = 120,
) -> dict[str, Any]:
    """Evaluate llmhop's modules with `config` (a NixOS configuration as JSON) and/or
    `module` (a Nix file), returning rendered units, units, users, groups, tmpfiles, firewall,
    failed assertion messages and warnings (see evaluate.nix).

    `pkgs` maps stub package names to real directories (their outPath). Raises NixEvalError
    when evaluation fails and, unless check_assertions is false, FailedAssertions when an
    assertion fails.
    """
    args = [
        "nix-instantiate",
        "--eval",
        "--strict",
        "--json",
        # builtins.toFile must write text files (e.g. llmhop.json) to the store for real.
        "--read-write-mode",
        str(HERE / "cli.nix"),
        "--argstr",
        "nixpkgsLib",
        str(locked_store_path("nixpkgs-lib")),
        "--argstr",
        "quadletNix",
        str(locked_store_path("quadlet-nix")),
        "--argstr",
        "configJSON",
        json.dumps(config or {}),
        "--argstr",
        "pkgsJSON",
        json.dumps(pkgs or {}),
    ]
    if module is not None:
        args += ["--argstr", "configFile", str(Path(module).resolve())]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=nix_env(), timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout)
    if check_assertions and result["assertions"]:
        raise FailedAssertions(result["assertions"], result)
    return result


def write_units(rendered: dict[str, Any], directory: Path) -> Path:
    """Write one scope of rendered units ({files, links}) into `directory` as NixOS would
    lay out its unit directory: files, drop-in folders and .wants/.requires/alias symlinks."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in rendered["files"].items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for link, target in rendered["links"].items():
        path = directory / link
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(directory / target)
    return directory


# --- systemd-analyze --------------------------------------------------------------------


@dataclass
class Verified:
    returncode: int
    stderr: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and self.stderr.strip() == ""


def analyze_verify(unit_dir: Path, units: list[str], timeout: float = 120) -> Verified:
    """`systemd-analyze verify` the given unit files of `unit_dir` (plus the host's units for
    targets such as multi-user.target). Any stderr output counts as a failure."""
    env = dict(os.environ)
    env["SYSTEMD_UNIT_PATH"] = f"{unit_dir}:"  # the trailing colon appends the default path
    env["SYSTEMD_LOG_COLOR"] = "0"
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *[str(unit_dir / u) for u in units]],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    return Verified(proc.returncode, proc.stderr)


_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def analyze_security(unit_dir: Path, unit: str, timeout: float = 120) -> tuple[float, str]:
    """The `systemd-analyze security --offline=true` exposure score (0 best, 10 worst)."""
    env = dict(os.environ)
    env["SYSTEMD_UNIT_PATH"] = f"{unit_dir}:"
    env["SYSTEMD_LOG_COLOR"] = "0"
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_dir / unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    match = _EXPOSURE.search(proc.stdout)
    if match is None:
        raise RuntimeError(f"no exposure score in:\n{proc.stdout}\n{proc.stderr}")
    return float(match.group(1)), proc.stdout


# --- stand-ins for packages ----------------------------------------------------------------


def make_package(root: Path, name: str, programs: dict[str, str]) -> Path:
    """A directory that stands in for a package: bin/<program> scripts with the given text."""
    out = root / name
    (out / "bin").mkdir(parents=True, exist_ok=True)
    for program, text in programs.items():
        path = out / "bin" / program
        path.write_text(text)
        path.chmod(0o755)
    return out


def eval_expression(expression: str, *, timeout: float = 120) -> Any:
    """The strict value of a Nix expression, as JSON (the store is writable: builtins.toFile
    and paths may be copied in)."""
    command = ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode"]
    proc = subprocess.run(
        [*command, "--expr", expression],
        capture_output=True,
        text=True,
        env=nix_env(),
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr)
    return json.loads(proc.stdout)


@functools.cache
def package_phases(python: str) -> dict[str, str]:
    """package.nix's install and install-check scripts, with `python` as python3."""
    expression = f"""
      let
        package = import {REPO}/pkgs/llmhop/package.nix {{
          lib = import {locked_store_path("nixpkgs-lib")}/lib;
          stdenvNoCC.mkDerivation = attrs: attrs;
          python3 = {{ interpreter = "{python}"; pkgs.pytest = null; }};
          runtimeShell = "/bin/sh";
        }};
      in {{ inherit (package) installPhase installCheckPhase; }}"""
    return eval_expression(expression, timeout=60)


def llmhop_package(root: Path) -> Path:
    """pkgs.llmhop as package.nix's own install and install-check phases build it from
    pkgs/llmhop/llmhop.py, with the host's python3."""
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    # Built inside `root`: the checkout may sit below /tmp, which PrivateTmp= hides from units.
    source = root / "llmhop-source"
    (source / "pkgs" / "llmhop").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "pkgs" / "llmhop" / "llmhop.py", source / "pkgs/llmhop/llmhop.py")
    out = root / "llmhop"
    phases = package_phases(python)
    script = "runHook() { :; }\n" + phases["installPhase"] + phases["installCheckPhase"]
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=source,
        env={**os.environ, "out": str(out)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    return out


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
