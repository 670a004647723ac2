"""Put the flake inputs that flake.lock pins into /nix/store from local git snapshots, so that
the Nix harness and `nix flake check --offline` run with no network. Usage:

    python3 tests/nix/offline_inputs.py            # prepare what is missing
    python3 tests/nix/offline_inputs.py --check    # only say what is missing

Environment:
    LLMHOP_MIRROR  folder of git snapshots, one per GitHub repository at OWNER+NAME/repo
                   (a bare clone will do)
    CI             when "true", having no snapshots to prepare from is an error

Each input is the tree `git archive` exports at the locked revision. Nix names such a tree by
its NAR hash alone (a fixed-output path named "source"), so the path this adds is the very one
Nix looks up for the lock's github input, provided the tree hashes to the lock's narHash:
this checks that before adding it. Full nixpkgs is not needed (the harness evaluates with
nixpkgs' lib and overrides the nixpkgs input with nixpkgs.lib), so it is only added when its
snapshot is there. nixpkgs.lib is also copied to NIXPKGS_LIB_CACHE, the path: flake that
overrides nixpkgs.

Standard library only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLAKE_LOCK = REPO / "flake.lock"
NIXPKGS_LIB_CACHE = Path.home() / ".cache" / "llmhop" / "nixpkgs-lib"
NIX_CONFIG = "experimental-features = nix-command flakes\nsubstituters =\n"

# The nixpkgs node may be missing: everything is evaluated against nixpkgs-lib instead.
OPTIONAL_NODES = frozenset({"nixpkgs"})
NIXPKGS_LIB_NODE = "nixpkgs-lib"


@dataclass(frozen=True)
class Pin:
    node: str
    owner: str
    name: str
    rev: str
    nar_hash: str

    @property
    def github(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def required(self) -> bool:
        return self.node not in OPTIONAL_NODES


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG + env.get("NIX_CONFIG", "")
    return env


def nix(*args: str) -> str:
    out = subprocess.run(
        args, capture_output=True, text=True, env=nix_env(), timeout=600, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def pins(lock_file: Path = FLAKE_LOCK) -> list[Pin]:
    """Every github input that flake.lock locks."""
    nodes = json.loads(lock_file.read_text())["nodes"]
    found = []
    for node, entry in sorted(nodes.items()):
        locked = entry.get("locked")
        if not locked:
            continue
        if locked.get("type") != "github":
            raise SystemExit(f"offline_inputs: {node} is a {locked.get('type')} input")
        found.append(Pin(node, locked["owner"], locked["repo"], locked["rev"], locked["narHash"]))
    return found


def store_path(pin: Pin) -> Path:
    return Path(
        nix("nix-store", "--print-fixed-path", "--recursive", "sha256", pin.nar_hash, "source")
    )


def snapshot(mirror: Path, pin: Pin) -> Path | None:
    """The git directory of the pin's repository: GitHub's owner names are case-insensitive."""
    want = f"{pin.owner}+{pin.name}".lower()
    if not mirror.is_dir():
        return None
    for entry in mirror.iterdir():
        if entry.name.lower() == want and (entry / "repo").is_dir():
            return entry / "repo"
    return None


def export(git_dir: Path, rev: str, dest: Path) -> None:
    """The revision's tree, as GitHub's tarball holds it, unpacked at `dest`."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "--git-dir", str(git_dir), "archive", "--format=tar", rev],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    untar = subprocess.run(
        ["tar", "-x", "-C", str(dest)],
        stdin=archive.stdout,
        capture_output=True,
        timeout=600,
        check=False,
    )
    archive.stdout.close()
    _, err = archive.communicate(timeout=60)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev}: {err.decode().strip()}")
    if untar.returncode != 0:
        raise RuntimeError(f"tar: {untar.stderr.decode().strip()}")


def nar_hash(path: Path) -> str:
    return nix("nix", "hash", "path", str(path))


def add(pin: Pin, git_dir: Path) -> Path:
    """Export the pin, check its NAR hash and add it to the store; the store path."""
    with tempfile.TemporaryDirectory(prefix="llmhop-input-") as tmp:
        tree = Path(tmp) / "source"
        export(git_dir, pin.rev, tree)
        got = nar_hash(tree)
        if got != pin.nar_hash:
            raise RuntimeError(
                f"{pin.github}@{pin.rev} hashes to {got}, flake.lock says {pin.nar_hash}"
            )
        added = Path(nix("nix-store", "--add-fixed", "--recursive", "sha256", str(tree)))
    if added != store_path(pin):
        raise RuntimeError(f"{pin.github} was added as {added}, not {store_path(pin)}")
    return added


def nixpkgs_lib_ready(pin: Pin) -> bool:
    return (NIXPKGS_LIB_CACHE / "lib").is_dir() and nar_hash(NIXPKGS_LIB_CACHE) == pin.nar_hash


def unpack_nixpkgs_lib(pin: Pin) -> None:
    """A copy of the store path, with the executable bits that its NAR hash covers; its
    folders writable, so that the next copy can replace it."""
    staging = NIXPKGS_LIB_CACHE.with_name(NIXPKGS_LIB_CACHE.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(store_path(pin), staging, symlinks=True, copy_function=shutil.copy)
    for path in [staging, *staging.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(NIXPKGS_LIB_CACHE, ignore_errors=True)
    staging.rename(NIXPKGS_LIB_CACHE)


def missing() -> list[str]:
    """What the harness lacks, briefly; empty when everything is prepared."""
    absent = [pin.node for pin in pins() if pin.required and not store_path(pin).is_dir()]
    lines = [f"flake inputs not in /nix/store: {', '.join(absent)}"] if absent else []
    if not (NIXPKGS_LIB_CACHE / "lib").is_dir():
        lines.append(f"nixpkgs.lib is not copied to {NIXPKGS_LIB_CACHE}")
    return lines


def prepare(mirror: Path | None) -> list[str]:
    """Add what is missing from the snapshots; the problems left, one line each."""
    problems = []
    for pin in pins():
        try:
            path = store_path(pin)
            if path.is_dir():
                print(f"ok       {pin.node}: {path}")
            else:
                git_dir = snapshot(mirror, pin) if mirror else None
                if git_dir is None:
                    where = f"under {mirror}" if mirror else "(LLMHOP_MIRROR is not set)"
                    line = f"{pin.node}: no snapshot of {pin.github} {where}"
                    if pin.required:
                        problems.append(line)
                        print(f"MISSING  {line}")
                    else:
                        print(f"not needed  {line}")
                    continue
                print(f"added    {pin.node}: {add(pin, git_dir)}")
            if pin.node == NIXPKGS_LIB_NODE and not nixpkgs_lib_ready(pin):
                unpack_nixpkgs_lib(pin)
                print(f"unpacked {pin.node}: {NIXPKGS_LIB_CACHE}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            problems.append(f"{pin.node}: {err}")
            print(f"FAILED   {pin.node}: {err}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is missing")
    args = parser.parse_args()
    if shutil.which("nix-store") is None:
        print("offline_inputs: Nix is not installed (tests/nix/setup.sh installs it)")
        return 1
    if args.check:
        lines = missing()
        for line in lines:
            print(line)
        return 1 if lines else 0

    mirror_env = os.environ.get("LLMHOP_MIRROR")
    mirror = Path(mirror_env) if mirror_env else None
    problems = prepare(mirror)
    if not problems:
        return 0
    in_ci = os.environ.get("CI") == "true"
    if mirror is None and not in_ci:
        # A developer without snapshots still runs everything else; the Nix tests skip,
        # each naming what is missing.
        print("offline_inputs: WARNING set LLMHOP_MIRROR to prepare the flake inputs")
        return 0
    print(f"offline_inputs: {len(problems)} flake input(s) could not be prepared", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
