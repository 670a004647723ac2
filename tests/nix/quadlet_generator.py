"""Podman's Quadlet generator as quadlet-nix runs it at build time: the binary that
tests/nix/setup-quadlet.sh builds, run over a configuration's container files (see
test_nix_containers_quadlet.py)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUADLET_VERSION = "5.8.2"
SETUP = "bash tests/nix/setup-quadlet.sh (with LLMHOP_PODMAN_SRC or LLMHOP_MIRROR set)"

C_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
# In -dryrun mode the generator logs at debug level; these lines say nothing about a file.
DEBUG_LINE = re.compile(r"quadlet-generator\[\d+\]: Loading source unit file \S+\n")


def generator_path() -> Path:
    override = os.environ.get("LLMHOP_QUADLET")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llmhop" / f"quadlet-v{QUADLET_VERSION}" / "bin" / "quadlet"


@dataclass
class Generated:
    """One generator run: its exit status, its stderr without debug lines, and the services it
    printed, by name (`vllm-m.service`), as {section: {key: [values]}} and as text."""

    returncode: int
    stderr: str
    texts: dict[str, str]

    def section(self, service: str, name: str) -> dict[str, list[str]]:
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] = {}
        for line in self.texts[service].splitlines():
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
            elif "=" in line:
                key, value = line.split("=", 1)
                current.setdefault(key, []).append(value)
        return sections.get(name, {})

    def exec_start(self, service: str) -> list[str]:
        """ExecStart= as words, with systemd's C escapes (`\\x20`) decoded; `%%` and `$$`
        stay as systemd reads them."""
        [line] = self.section(service, "Service")["ExecStart"]
        return [C_ESCAPE.sub(lambda m: chr(int(m[1], 16)), word) for word in shlex.split(line)]


def run_generator(
    generator: Path, files: dict[str, str], directory: Path, *, user: bool
) -> Generated:
    """`quadlet -dryrun` over `files` (name -> text) as the only unit directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QUADLET_UNIT_DIRS": str(directory)}
    proc = subprocess.run(
        [str(generator), "-dryrun", *(["-user"] if user else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    texts = dict(re.findall(r"^---(\S+)---\n(.*?)(?=^---\S+---\n|\Z)", proc.stdout, re.M | re.S))
    return Generated(proc.returncode, DEBUG_LINE.sub("", proc.stderr), texts)


def generate(generator: Path, result: dict[str, Any], workdir: Path) -> dict[str, Generated]:
    """Run the generator on an evaluation's container files as quadlet-nix does: the rootful
    ones in system mode, the rootless ones (user units) with -user. Fails on any rejection."""
    scopes = {
        "system": {n: t for n, t in result["quadlet"].items() if n in result["services"]},
        "user": {n: t for n, t in result["quadlet"].items() if n in result["userServices"]},
    }
    # quadlet-nix installs every container as a drop-in of a system or a user service.
    assert sorted(scopes["system"].keys() | scopes["user"].keys()) == sorted(result["quadlet"])
    runs = {}
    for scope, containers in scopes.items():
        if not containers:
            continue
        files = {f"{name}.container": text for name, text in containers.items()}
        run = run_generator(generator, files, workdir / scope, user=scope == "user")
        assert (run.returncode, run.stderr) == (0, ""), f"{scope} generator:\n{run.stderr}"
        assert sorted(run.texts) == sorted(f"{name}.service" for name in containers)
        runs[scope] = run
    return runs
