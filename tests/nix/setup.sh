#!/usr/bin/env bash
# Prepare this machine for the Nix harness (tests/nix): Nix 2.8 from Debian, the systemd tools,
# the flake inputs pinned in flake.lock, added to /nix/store from local git snapshots, and
# Podman's Quadlet generator, built from its snapshot (setup-quadlet.sh).
# Idempotent: does nothing that is already done. Usage:
#
#   LLMHOP_MIRROR=/path/to/snapshots bash tests/nix/setup.sh
#
# Environment:
#   LLMHOP_SHARED  folder holding tools/nix-offline-inputs.sh and nix-pins.json
#                  (default: ../shared beside the repository)
#   LLMHOP_MIRROR  folder of the git snapshots OWNER+NAME/repo (no default)
#
# Without snapshots the inputs cannot be had offline; the script then says what to set and
# exits 0, and the tests that need them skip, naming this script.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
export NIX_CONFIG=$'experimental-features = nix-command flakes\nsubstituters ='

# --- Debian packages -------------------------------------------------------------------------
need=()
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v journalctl >/dev/null || need+=(systemd)
command -v unshare >/dev/null || need+=(util-linux)
command -v nsenter >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- flake inputs ---------------------------------------------------------------------------
inputs_present() {
  python3 - "$repo/flake.lock" <<'PY'
import json, os, subprocess, sys
lock = json.load(open(sys.argv[1]))
for name, node in lock["nodes"].items():
    locked = node.get("locked")
    if not locked or locked.get("repo") == "nixpkgs":  # full nixpkgs cannot be had offline
        continue
    path = subprocess.run(
        ["nix-store", "--print-fixed-path", "--recursive", "sha256", locked["narHash"], "source"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not os.path.isdir(path):
        sys.exit(1)
PY
}

prepare_inputs() {
  if inputs_present && [ -d "$HOME/.cache/llmhop/nixpkgs-lib/lib" ]; then
    echo "setup: flake inputs already in /nix/store"
    return
  fi
  local shared=${LLMHOP_SHARED:-}
  if [ -z "$shared" ] && [ -f "$repo/../shared/tools/nix-offline-inputs.sh" ]; then
    shared=$(cd "$repo/../shared" && pwd)
  fi
  if [ -z "$shared" ] || [ ! -f "$shared/tools/nix-offline-inputs.sh" ]; then
    echo "setup: WARNING no shared/tools/nix-offline-inputs.sh (set LLMHOP_SHARED); the Nix tests will skip"
    return
  fi
  if [ -z "${LLMHOP_MIRROR:-}" ] || [ ! -d "$LLMHOP_MIRROR" ]; then
    echo "setup: WARNING no snapshots (set LLMHOP_MIRROR to the folder of OWNER+NAME/repo git" \
      "snapshots); the Nix tests will skip"
    return
  fi
  # The tool reads nix-pins.json beside its own folder; it may be read-only, which is fine.
  bash "$shared/tools/nix-offline-inputs.sh" "$LLMHOP_MIRROR"
}

prepare_inputs
bash "$repo/tests/nix/setup-quadlet.sh"
