"""offline_inputs.py: what it adds to the store is the locked tree, found by its NAR hash."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import offline_inputs
import pytest

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_tools")]


def pin(node: str) -> offline_inputs.Pin:
    (found,) = [p for p in offline_inputs.pins() if p.node == node]
    return found


def test_every_input_but_nixpkgs_is_required() -> None:
    nodes = {p.node: p.required for p in offline_inputs.pins()}
    assert nodes == {
        "flake-parts": True,
        "nixpkgs": False,
        "nixpkgs-lib": True,
        "quadlet-nix": True,
        "systems": True,
        "treefmt-nix": True,
    }


def test_snapshots_are_found_whatever_the_owners_case(mirror: Path) -> None:
    systems = pin("systems")
    upper = dataclasses.replace(systems, owner=systems.owner.upper())
    assert offline_inputs.snapshot(mirror, upper) == offline_inputs.snapshot(mirror, systems)
    assert offline_inputs.snapshot(mirror, systems) is not None
    unknown = dataclasses.replace(systems, name="no-such-repository")
    assert offline_inputs.snapshot(mirror, unknown) is None


def test_the_added_tree_is_the_locked_one(mirror: Path) -> None:
    systems = pin("systems")
    git_dir = offline_inputs.snapshot(mirror, systems)
    assert git_dir is not None
    assert offline_inputs.add(systems, git_dir) == offline_inputs.store_path(systems)


def test_a_tree_that_does_not_hash_to_the_lock_is_refused(mirror: Path) -> None:
    systems = pin("systems")
    git_dir = offline_inputs.snapshot(mirror, systems)
    assert git_dir is not None
    # The quadlet-nix pin's hash, claimed for another tree.
    wrong = dataclasses.replace(systems, nar_hash=pin("quadlet-nix").nar_hash)
    with pytest.raises(RuntimeError, match=r"hashes to sha256-.*, flake\.lock says"):
        offline_inputs.add(wrong, git_dir)


def test_a_revision_missing_from_the_snapshot_is_refused(mirror: Path) -> None:
    systems = pin("systems")
    git_dir = offline_inputs.snapshot(mirror, systems)
    assert git_dir is not None
    with pytest.raises(RuntimeError, match="git archive"):
        offline_inputs.add(dataclasses.replace(systems, rev="0" * 40), git_dir)
