"""The flake: its lock matches the shared pins, and `nix flake check` evaluates offline."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from nix_harness import FLAKE_LOCK, HERE, NIXPKGS_LIB_CACHE, REPO, nix_env

pytestmark = pytest.mark.nix


def shared_pins() -> Path | None:
    for cand in (os.environ.get("LLMHOP_SHARED"), REPO.parent / "shared", "/work/shared"):
        if cand and (Path(cand) / "nix-pins.json").is_file():
            return Path(cand) / "nix-pins.json"
    return None


def test_lock_matches_the_pins() -> None:
    pins_file = shared_pins()
    if pins_file is None:
        pytest.skip("no shared/nix-pins.json beside the repository (set LLMHOP_SHARED)")
    pins = {
        (p["locked"]["owner"], p["locked"]["repo"]): p
        for key, p in json.loads(pins_file.read_text()).items()
        if not key.startswith("_")
    }
    nodes = json.loads(FLAKE_LOCK.read_text())["nodes"]
    locked = {
        (n["locked"]["owner"], n["locked"]["repo"]): n for n in nodes.values() if "locked" in n
    }
    assert locked.keys() == pins.keys()
    for key, pin in pins.items():
        node = locked[key]
        for field in ("rev", "narHash", "lastModified", "type"):
            assert node["locked"][field] == pin["locked"][field], (key, field)
        assert node["original"] == pin["original"], key
    # Everything follows our nixpkgs, and quadlet-nix our flake-parts.
    assert nodes["quadlet-nix"]["inputs"] == {
        "flake-parts": ["flake-parts"],
        "nixpkgs": ["nixpkgs"],
    }
    assert nodes["treefmt-nix"]["inputs"] == {"nixpkgs": ["nixpkgs"]}
    assert nodes["flake-parts"]["inputs"] == {"nixpkgs-lib": "nixpkgs-lib"}


def flake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nix",
            *args,
            "--offline",
            "--no-write-lock-file",
            "--override-input",
            "nixpkgs",
            f"path:{NIXPKGS_LIB_CACHE}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=nix_env(),
        timeout=300,
        check=False,
    )


@pytest.mark.usefixtures("nix_inputs")
def test_flake_check_offline() -> None:
    """Evaluates every output; the module-eval suite (checks/module-eval.nix) runs in it."""
    proc = flake("flake", "check", str(REPO))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.usefixtures("nix_inputs")
def test_flake_outputs() -> None:
    proc = flake(
        "eval",
        "--json",
        f"{REPO}#lib",
        "--apply",
        'l: l.listenStream { host = "::1"; port = 8080; }',
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "[::1]:8080"
    # nixosModules.default (quadlet-nix's flake output + ours) evaluated with the harness stubs.
    apply = f"""module:
      let
        lib = import {NIXPKGS_LIB_CACHE}/lib;
        eval = lib.evalModules {{
          modules = [
            module
            {HERE}/nixos-stubs.nix
            {{ _module.args.pkgs = import {HERE}/stub-pkgs.nix {{ inherit lib; }}; }}
            {{ services.llmhop.enable = true; }}
          ];
        }};
      in {{
        quadlet = eval.options.virtualisation.quadlet ? containers;
        socket = eval.config.systemd.sockets.llmhop-default.listenStreams;
      }}"""
    proc = flake("eval", "--impure", "--json", f"{REPO}#nixosModules.default", "--apply", apply)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"quadlet": True, "socket": ["8080"]}
