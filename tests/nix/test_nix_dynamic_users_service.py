"""Model names that systemd refuses as user names, under a real systemd: a llama.cpp model
with a dot in its name and one with a 40-character name start natively with `DynamicUser=`
(the module derives a user name systemd accepts), and the replicas of the long one share
one user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from nix_harness import chat, llama_cpp_scenario
from systemd_ns import SystemdNamespace

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

DOTTED = "qwen3-0.6b"
LONG = "qwen3-coder-30b-a3b-instruct-q4-k-m-gguf"
DOTTED_UNIT = f"llama-cpp-{DOTTED}.service"
REPLICAS = [f"llama-cpp-{LONG}-0.service", f"llama-cpp-{LONG}-1.service"]

# systemd's rule for a DynamicUser= name.
SYSTEMD_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")


def scenario(scratch: Path) -> dict[str, Any]:
    assert len(LONG) == 40
    models = {DOTTED: {}, LONG: {"replicas": [{}, {}]}}
    return llama_cpp_scenario(scratch, models, started_by_hand=(DOTTED_UNIT, *REPLICAS))


def main_pid_owner(ns: SystemdNamespace, unit: str) -> str:
    pid = ns.show(unit, "MainPID")["MainPID"]
    return ns.run("stat", "-c", "%U %u", f"/proc/{pid}").stdout.strip()


def test_models_whose_names_systemd_refuses_start(ns: SystemdNamespace) -> None:
    for unit in (DOTTED_UNIT, *REPLICAS):
        # Type=notify: returns once the server answered its health probe.
        start = ns.systemctl("start", unit, timeout=30)
        assert start.returncode == 0, start.stderr + ns.journal(unit)
        assert ns.state(unit) == "active"
        user = ns.show(unit, "User")["User"]
        assert SYSTEMD_USER_NAME.fullmatch(user), (unit, user)

    assert ns.show(DOTTED_UNIT, "User")["User"].startswith("llama-cpp-qwen3-0-6b-")
    # One dynamic user for both replicas, who owns the cache they share.
    owners = {main_pid_owner(ns, unit) for unit in REPLICAS}
    cache = ns.run("stat", "-L", "-c", "%U %u", f"/var/cache/llama-cpp/{LONG}").stdout.strip()
    assert len(owners) == 1 and owners == {cache}, (owners, cache)
    assert main_pid_owner(ns, DOTTED_UNIT) not in owners

    for model in (DOTTED, LONG):
        status, body = chat(ns, model)
        assert status == 200, body
