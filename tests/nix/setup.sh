#!/usr/bin/env bash
# Prepare this machine for the Nix harness (tests/nix): Nix 2.8 from Debian, the systemd tools,
# the flake inputs pinned in flake.lock, added to /nix/store from local git snapshots, and
# Podman's Quadlet generator, built from its snapshot (setup-quadlet.sh).
# Idempotent: does nothing that is already done. Usage:
#
#   LLMHOP_MIRROR=/path/to/snapshots bash tests/nix/setup.sh
#
# Environment:
#   LLMHOP_MIRROR  folder of the git snapshots OWNER+NAME/repo (no default)
#   CI             when "true", a flake input that cannot be prepared fails the setup
#
# Without snapshots the inputs cannot be had offline; the script then says what to set and
# exits 0 (but 1 under CI=true), and the tests that need them skip, naming this script (and
# fail under CI=true).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)

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
# offline_inputs.py exports each input pinned in flake.lock from its snapshot, checks it against
# the lock's narHash and adds it to /nix/store. Without snapshots it warns and the tests skip;
# with CI=true, or with snapshots that lack a pin, it fails.
python3 "$repo/tests/nix/offline_inputs.py"
bash "$repo/tests/nix/setup-quadlet.sh"
