"""Fetch a model's weights from the Hugging Face hub into a hub cache, for llmhop's fetch units.

Exits 0 when the files are there (without a request when a pinned commit was fetched whole
before), 2 when the hub refuses for good (no such repository or revision, a gated repository
without a valid token, no file matching), 1 otherwise (the network, the hub): systemd retries.
The hub client picks up a download whose connection broke within one run; a run that is
stopped starts the file again, and may leave its `.incomplete` file behind.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import sys
from pathlib import Path

COMMIT = re.compile(r"[0-9a-f]{40}")
REFUSED = 2


def log(message: str) -> None:
    print(message, flush=True)


def fail(message: str, status: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return status


def wanted(path: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(path, p) for p in patterns)


def snapshot_files(snapshot: Path, patterns: list[str] | None) -> list[str]:
    found = []
    for root, _, files in os.walk(snapshot):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), snapshot)
            if wanted(relative, patterns):
                found.append(relative)
    return sorted(found)


def complete(record: Path, snapshot: Path, patterns: list[str] | None) -> bool:
    """Whether a whole fetch of these patterns into this snapshot was recorded, and its files
    are all still there."""
    try:
        fetched = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return fetched.get("include") == patterns and all(
        (snapshot / f).exists() for f in fetched.get("files", [])
    )


def link(storage: Path, name: str, commit: str) -> None:
    """llmhop/<name> -> ../snapshots/<commit>: the path its worker gets for a branch or tag."""
    links = storage / "llmhop"
    links.mkdir(exist_ok=True)
    temporary = links / f".{name}.new"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(f"../snapshots/{commit}")
    temporary.replace(links / name)


def resolve(storage: Path, revision: str) -> str | None:
    """The commit of a revision, as the hub cache recorded it for a branch or tag."""
    if COMMIT.fullmatch(revision):
        return revision
    ref = storage / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def prune(storage: Path, keep: set[str]) -> None:
    """Remove the snapshots of revisions not kept, then the blobs no snapshot links to."""
    commits = {commit for revision in keep if (commit := resolve(storage, revision))}
    snapshots = storage / "snapshots"
    for snapshot in snapshots.iterdir():
        if snapshot.name not in commits:
            log(f"pruning revision {snapshot.name}")
            shutil.rmtree(snapshot)
    refs = [ref for ref in (storage / "refs").rglob("*") if ref.is_file()]
    for ref in refs:
        if ref.read_text().strip() not in commits:
            ref.unlink()
    used = {
        os.path.realpath(os.path.join(root, name))
        for root, _, files in os.walk(snapshots)
        for name in files
    }
    for blob in (storage / "blobs").iterdir():
        if os.path.realpath(blob) not in used:
            log(f"pruning blob {blob.name}")
            blob.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--name", required=True, help="the model, whose link a branch gets")
    parser.add_argument("--include", action="append", help="a glob of the files to fetch")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--prune", action="store_true")
    parser.add_argument("--keep", action="append", default=[], help="a revision not to prune")
    args = parser.parse_args()

    storage = args.cache_dir / ("models--" + args.repo.replace("/", "--"))
    what = f"{args.repo} at {args.revision}"
    pinned = COMMIT.fullmatch(args.revision) is not None
    record = storage / "llmhop" / f"{args.revision}.json" if pinned else None
    if record and complete(record, storage / "snapshots" / args.revision, args.include):
        log(f"{what}: already fetched, nothing to do")
        if args.prune:
            prune(storage, {args.revision, *args.keep})
        return 0

    token = None
    if args.token_file:
        token = args.token_file.read_text().strip()

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    log(f"{what}: fetching {', '.join(args.include or ['every file'])} into {args.cache_dir}")
    try:
        snapshot = Path(
            snapshot_download(
                args.repo,
                revision=args.revision,
                cache_dir=args.cache_dir,
                allow_patterns=args.include,
                token=token,
            )
        )
    except GatedRepoError:
        advice = "the token was refused" if token else "set weights.tokenCredential"
        return fail(
            f"{args.repo} is gated and needs an accepted licence and a token: {advice}", REFUSED
        )
    except RevisionNotFoundError:
        return fail(f"{args.repo} has no revision {args.revision}", REFUSED)
    except RepositoryNotFoundError:
        advice = (
            "is it private, and the token without access?"
            if token
            else "or it is private: set weights.tokenCredential"
        )
        return fail(f"{args.repo}: no such repository on the hub ({advice})", REFUSED)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403):
            return fail(
                f"{args.repo}: the hub refused access ({error}); check weights.tokenCredential",
                REFUSED,
            )
        return fail(f"{what}: the hub failed, retrying later: {error}", 1)
    except OSError as error:
        return fail(f"{what}: {error.__class__.__name__}: {error}; retrying later", 1)

    files = snapshot_files(snapshot, args.include)
    if not files:
        return fail(f"{what} has no file matching {' '.join(args.include or [])}", REFUSED)
    commit = snapshot.name
    log(f"{what}: {len(files)} files in {snapshot}")
    storage.joinpath("llmhop").mkdir(exist_ok=True)
    if pinned:
        record.write_text(json.dumps({"include": args.include, "files": files}))
    else:
        link(storage, args.name, commit)
    if args.prune:
        prune(storage, {commit, *args.keep})
    return 0


if __name__ == "__main__":
    sys.exit(main())
