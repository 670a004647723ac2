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
from typing import TYPE_CHECKING, Any

import offline_inputs
from offline_inputs import NIXPKGS_LIB_CACHE, nix_env

if TYPE_CHECKING:
    from systemd_ns import SystemdNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FLAKE_LOCK = REPO / "flake.lock"

PREPARE_COMMAND = f"LLMHOP_MIRROR=/path/to/snapshots bash {HERE.relative_to(REPO)}/setup.sh"


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
    lines = offline_inputs.missing()
    if lines:
        return f"{'; '.join(lines)}; prepare with: {PREPARE_COMMAND}"
    return None


def mk_force(value: Any) -> dict[str, Any]:
    """lib.mkForce written as JSON, for configurations passed to evaluate()."""
    return {"_type": "override", "priority": 50, "content": value}


def _instantiate(
    config: dict[str, Any] | None,
    module: Path | None,
    pkgs: dict[str, str] | None,
    what: str,
    timeout: float,
) -> Any:
    """cli.nix's JSON answer: the evaluated configuration or the documented options."""
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
        "--argstr",
        "what",
        what,
    ]
    if module is not None:
        args += ["--argstr", "configFile", str(Path(module).resolve())]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=nix_env(), timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise NixEvalError(proc.stderr)
    return json.loads(proc.stdout)


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
    result: dict[str, Any] = _instantiate(config, module, pkgs, "config", timeout)
    if check_assertions and result["assertions"]:
        raise FailedAssertions(result["assertions"], result)
    return result


def option_docs(timeout: float = 120) -> list[dict[str, Any]]:
    """The documented options of services.llmhop as nixpkgs' option docs list them
    (lib.optionAttrSetToDocList): name, type, default, example, description, readOnly."""
    docs: list[dict[str, Any]] = _instantiate(None, None, None, "options", timeout)
    return docs


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
    out = root / "llmhop"
    if out.exists():  # built for an earlier evaluation of the same scenario
        return out
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    # Built inside `root`: the checkout may sit below /tmp, which PrivateTmp= hides from units.
    source = root / "llmhop-source"
    (source / "pkgs" / "llmhop").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "pkgs" / "llmhop" / "llmhop.py", source / "pkgs/llmhop/llmhop.py")
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


def stand_in(root: Path, package: str, program: str) -> str:
    """The store path of a package whose only program, bin/<program>, is an empty script."""
    return str(make_package(root / "pkgs", package, {program: "#!/bin/sh\n"}))


def render_units(config: dict[str, Any], root: Path, *, module: Path | None = None) -> Path:
    """Evaluate with runnable stand-ins, so that every ExecStart= names a program that exists
    (the router as its package builds it, an empty script per engine, the host's coreutils
    and systemd), and write the system units into root/units."""
    pkgs = {
        "llmhop": str(llmhop_package(root / "pkgs")),
        "llama-cpp": stand_in(root, "llama-cpp", "llama-server"),
        "vllm": stand_in(root, "vllm", "vllm"),
        "coreutils": "/usr",
        "systemd": "/usr",
    }
    result = evaluate(config, module=module, pkgs=pkgs)
    return write_units(result["units"]["system"], root / "units")


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# --- pkgs.llmhop built as its build sandbox builds it --------------------------------------

# stdenv puts these on every build's PATH (nixpkgs' pkgs/stdenv/common-path.nix): coreutils,
# linked whole from the host's package, and the programs of the others.
STDENV_PROGRAMS = (
    *("find", "xargs", "diff", "cmp", "sed", "grep", "awk", "tar", "gzip", "gunzip"),
    *("bzip2", "make", "bash", "sh", "patch", "xz", "file"),
)

# What nixpkgs' python setup hook exports in every build that has python3 as an input.
PYTHON_HOOK_ENV = {"PYTHONHASHSEED": "0", "PYTHONNOUSERSITE": "1", "DETERMINISTIC_BUILD": "1"}

PHASES = ("checkPhase", "installPhase", "installCheckPhase")


def sandbox_unavailable() -> str | None:
    """Why a build cannot be run here as Nix's sandbox runs it (loopback-only network), or None."""
    for tool in ("unshare", "ip", "env", "bash", "dpkg-query"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; the sandboxed build needs it"
    probe = subprocess.run(
        [*_network_isolation(), "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    return None


def _network_isolation() -> list[str]:
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    return ["unshare", "--user", "--map-root-user", "--net"]


def flake_source(root: Path) -> Path:
    """The checkout as a flake sees it: only the files git tracks, as they are in the work
    tree. A checkout that is not a git repository is a `path:` flake: every file."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return REPO
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index: a flake skips it too
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return root


def package_derivation(package_nix: Path, python: Path) -> dict[str, Any]:
    """package.nix evaluated with the nixpkgs lib the flake checks use: its phases, its
    nativeCheckInputs by name, and its `src` realised in the store (a plain copy of the
    filtered source, as the builder gets it)."""
    expression = f"""
      let
        input = name: {{ inherit name; outPath = "/nonexistent/${{name}}"; }};
        package = import {package_nix} {{
          lib = import {NIXPKGS_LIB_CACHE}/lib;
          stdenvNoCC.mkDerivation = attrs: attrs;
          python3 = input "python3" // {{
            interpreter = "{python}";
            pkgs = {{
              pytest = input "pytest";
              hypothesis = input "hypothesis";
              h11 = input "h11";
            }};
          }};
          runtimeShell = "/bin/sh";
        }};
      in
      {{
        src = "${{package.src}}";
        nativeCheckInputs = map (input: input.name) package.nativeCheckInputs;
        inherit (package) version doCheck doInstallCheck {" ".join(PHASES)};
      }}"""
    return eval_expression(expression, timeout=120)


def _distribution_closure(name: str) -> list[Any]:
    """The installed distribution `name` and those it requires here, recursively."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: dict[str, Any] = {}
    pending = [name]
    while pending:
        distribution = metadata.distribution(pending.pop())
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def python_with(root: Path, distribution: str) -> Path:
    """A stand-in for `python3.withPackages (ps: [ ps.<distribution> ])` in root/<name>:
    bin/python3 runs the host's interpreter with `distribution` and what it requires, copied
    from this venv (a unit under PrivateTmp= would not see a venv below /tmp). Made once: a
    second call gives the same one."""
    site = root / f"python-{distribution}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for installed in _distribution_closure(distribution):
        for top in {Path(f).parts[0] for f in installed.files or []} - {"..", "__pycache__"}:
            source = Path(installed.locate_file(top)).resolve()
            if not (site / top).exists():
                copy = shutil.copytree if source.is_dir() else shutil.copyfile
                copy(source, site / top)
    python = f'#!/bin/sh\nPYTHONPATH={site} exec /usr/bin/python3 -s "$@"\n'
    return make_package(root, f"python-{distribution}", {"python3": python})


def _link_stdenv_programs(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True)
    coreutils = subprocess.run(
        ["dpkg-query", "-L", "coreutils"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    programs = {Path(p).name: Path(p) for p in coreutils if Path(p).parent.name == "bin"}
    for name in STDENV_PROGRAMS:
        found = shutil.which(name)
        if found:
            programs[name] = Path(found)
    for name, path in programs.items():
        if path.is_file() and os.access(path, os.X_OK):
            (bin_dir / name).symlink_to(path)


def _python3_input(directory: Path) -> dict[str, str]:
    # A venv without pip is the bare interpreter nixpkgs' python3 is: nothing installed, not
    # even the distribution's own site-packages (Debian's would be on a plain python3's path).
    import venv

    venv.EnvBuilder(symlinks=True, with_pip=False).create(directory)
    return dict(PYTHON_HOOK_ENV)


def _python_package_input(directory: Path, name: str) -> Path:
    """A Python input's site directory: the distribution `name` and what it requires, each
    linked from this venv into a site directory of its own that goes on PYTHONPATH, as the
    python setup hook adds a Python input's site-packages: nothing else of this venv (ruff,
    say) comes along."""
    site = directory / "site-packages"
    site.mkdir(parents=True)
    for distribution in _distribution_closure(name):
        for top in {Path(f).parts[0] for f in distribution.files or []} - {"..", "__pycache__"}:
            if not (site / top).exists():
                (site / top).symlink_to(Path(distribution.locate_file(top)).resolve())
    (directory / "bin").mkdir()
    return site


def _pytest_input(directory: Path, python: Path) -> Path:
    from importlib import metadata

    site = _python_package_input(directory, "pytest")
    (script,) = metadata.entry_points(group="console_scripts", name="pytest")
    module, _, function = script.value.partition(":")
    pytest_bin = directory / "bin" / "pytest"
    pytest_bin.write_text(
        f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
    )
    pytest_bin.chmod(0o755)
    return site


@dataclass
class SandboxBuild:
    derivation: dict[str, Any]
    out: Path
    # The phases that ran, in order; the last one failed when the build did.
    phases: dict[str, subprocess.CompletedProcess[str]]


def build_in_sandbox(root: Path, build_top: Path, *, timeout: float = 600) -> SandboxBuild:
    """pkgs.llmhop built from the flake's source as Nix's sandbox builds it: package.nix
    evaluated with the real nixpkgs lib, its `src` realised in the store and unpacked into
    `build_top`, then its check, install and install-check phases run by bash in an empty
    environment (HOME=/homeless-shelter, TMPDIR=$NIX_BUILD_TOP) whose PATH holds stdenv's
    tools and the host's counterparts of nativeCheckInputs, in a network namespace with only
    loopback. `build_top` should be short: unix socket paths under TMPDIR are limited."""
    inputs = root / "inputs"
    python = inputs / "python3" / "bin" / "python3"
    derivation = package_derivation(
        flake_source(root / "flake") / "pkgs" / "llmhop" / "package.nix", python
    )
    # Built whatever the inputs: the install phase names the interpreter, and Nix brings what a
    # phase names into the sandbox. Only nativeCheckInputs go on PATH.
    python_env = _python3_input(inputs / "python3")
    env: dict[str, str] = {}
    path = [inputs / "stdenv" / "bin"]
    sites: list[Path] = []
    for name in derivation["nativeCheckInputs"]:
        if name == "python3":
            env |= python_env
        elif name == "pytest":
            sites.append(_pytest_input(inputs / name, python))
        elif name in ("hypothesis", "h11"):
            sites.append(_python_package_input(inputs / name, name))
        else:
            raise ValueError(f"nativeCheckInputs: no counterpart here for {name}")
        path.insert(-1, inputs / name / "bin")
    if sites:
        env["PYTHONPATH"] = ":".join(map(str, sites))
    _link_stdenv_programs(inputs / "stdenv" / "bin")

    # unpackPhase: a writable copy named as the store path without its hash.
    store_path = Path(derivation["src"])
    source = build_top / store_path.name.split("-", 1)[1]
    shutil.copytree(store_path, source, symlinks=True)
    for directory, _, files in os.walk(source):
        for name in [directory, *(os.path.join(directory, f) for f in files)]:
            os.chmod(name, os.stat(name).st_mode | 0o200)

    out = root / "out"
    env |= {
        "PATH": ":".join(map(str, path)),
        "HOME": "/homeless-shelter",
        "NIX_BUILD_TOP": str(build_top),
        **{name: str(build_top) for name in ("TMPDIR", "TEMPDIR", "TMP", "TEMP")},
        "NIX_STORE": "/nix/store",
        "NIX_BUILD_CORES": "1",
        "SOURCE_DATE_EPOCH": "315532800",
        "out": str(out),
    }
    wanted = {
        "checkPhase": derivation["doCheck"],
        "installPhase": True,
        "installCheckPhase": derivation["doInstallCheck"],
    }
    ip = shutil.which("ip") or "ip"
    phases: dict[str, subprocess.CompletedProcess[str]] = {}
    for phase in PHASES:
        if not wanted[phase]:
            continue
        script = "runHook() { :; }\n" + derivation[phase]
        command = [
            *_network_isolation(),
            "sh",
            "-c",
            f'{ip} link set lo up && exec "$@"',
            "sh",
            shutil.which("env") or "env",
            "-i",
            *(f"{key}={value}" for key, value in env.items()),
            shutil.which("bash") or "bash",
            "-eu",
            "-o",
            "pipefail",
            "-c",
            script,
        ]
        phases[phase] = subprocess.run(
            command,
            cwd=source,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if phases[phase].returncode != 0:
            break
    return SandboxBuild(derivation, out, phases)


# Where llama_cpp_scenario's router listens, inside the namespace.
ROUTER = "http://127.0.0.1:8080"


def llama_cpp_scenario(
    scratch: Path,
    models: dict[str, Any],
    *,
    router: dict[str, Any] | None = None,
    started_by_hand: tuple[str, ...] = (),
    pkgs: dict[str, str] | None = None,
    services: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluated system a service test boots: the router on 127.0.0.1:8080, started by
    its first connection, in front of llama.cpp's `models` with the fake engine as
    `llama-server`. `router` adds options of services.llmhop; the units `started_by_hand`
    stay out of the boot too; `pkgs` adds stand-ins, `services` systemd.services entries.

    The fake engine is copied out of the checkout, which may sit below /tmp, where
    PrivateTmp= hides it; systemd-socket-proxyd is the host's, as systemd itself is."""
    from tests.support import FAKE_ENGINE

    fake = shutil.copy(FAKE_ENGINE, scratch)
    server = f'#!/bin/sh\nexec /usr/bin/python3 -I {fake} llama-server "$@"\n'
    pkgs = {
        "llmhop": str(llmhop_package(scratch / "pkgs")),
        "llama-cpp": str(make_package(scratch / "pkgs", "llama-cpp", {"llama-server": server})),
        "coreutils": "/usr",
        "systemd": "/usr",
        **(pkgs or {}),
    }
    not_at_boot = {"wantedBy": mk_force([])}
    config = {
        "services": {
            "llmhop": {
                "enable": True,
                "host": "127.0.0.1",
                "port": 8080,
                **(router or {}),
                "llama-cpp": {"models": models},
            }
        },
        "systemd": {
            "services": {
                **(services or {}),
                **{
                    unit.removesuffix(".service"): not_at_boot
                    for unit in ("llmhop", *started_by_hand)
                },
            }
        },
    }
    return evaluate(config, pkgs=pkgs)


def chat(
    ns: SystemdNamespace,
    model: str,
    *,
    token: str | None = None,
    fields: dict[str, Any] | None = None,
    **http: Any,
) -> tuple[int, str]:
    """One chat completion through the scenario's router: (status, body). `fields` join the
    request's JSON; `http` goes to SystemdNamespace.http (`unix_socket`, `timeout`)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **(fields or {})}
    return ns.http(
        f"{ROUTER}/v1/chat/completions",
        method="POST",
        body=json.dumps(body).encode(),
        headers=headers,
        **http,
    )
