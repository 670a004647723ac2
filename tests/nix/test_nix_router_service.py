"""The router's units under a real systemd (PID 1 in namespaces): socket activation, sd_notify and
reload with a stand-in router, then the real router."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nix_harness import REPO, evaluate, llmhop_package, make_package, mk_force
from systemd_ns import SystemdNamespace

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.systemd, pytest.mark.usefixtures("real_systemd", "nix_inputs")]


def bpf_framework() -> bool:
    """SocketBindDeny= needs systemd built with the BPF framework (Debian 12's is not)."""
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True)
    return "+BPF_FRAMEWORK" in out.stdout


# --- the module's units under systemd -------------------------------------------------------


def fake_router_package(root: Path) -> Path:
    """A package whose bin/llmhop is fake_router.py, copied out of the checkout (which may sit
    below /tmp, hidden from units by PrivateTmp=)."""
    installed = root / "fake-router.py"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fake_router.py", installed)
    return make_package(
        root, "llmhop", {"llmhop": f'#!/bin/sh\nexec /usr/bin/python3 -I {installed} "$@"\n'}
    )


def module_units(scratch: Path, package: Path, **extra: Any) -> dict[str, Any]:
    pkgs = {"llmhop": str(package), "coreutils": "/usr"}
    config: dict[str, Any] = {
        "services": {
            "llmhop": {
                "enable": True,
                "host": "127.0.0.1",
                "port": 8080,
                "settings": {"models": {"m": {"url": "http://127.0.0.1:18001"}}},
            }
        },
        # Started by the first connection rather than at boot, as in the VM test.
        "systemd": {"services": {"llmhop": {"wantedBy": mk_force([])}}},
    }
    config["services"]["llmhop"].update(extra)
    return evaluate(config, pkgs=pkgs)


def boot(result: dict[str, Any]) -> SystemdNamespace:
    return SystemdNamespace(
        result["units"]["system"],
        users=result["users"],
        groups=result["groups"],
        etc={name: e["source"] for name, e in result["etc"].items() if e["source"]},
    )


def test_socket_activation_notify_and_reload(scratch: Path) -> None:
    result = module_units(scratch, fake_router_package(scratch / "pkgs"))
    with boot(result) as ns:
        assert ns.show("llmhop-default.socket", "ActiveState")["ActiveState"] == "active"
        assert ns.show("llmhop.service", "ActiveState")["ActiveState"] == "inactive"

        status, body = ns.http("http://127.0.0.1:8080/health")
        assert status == 200, body
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["listen_pid_ok"] is True
        assert health["config"]["models"] == {"m": {"url": "http://127.0.0.1:18001"}}
        assert health["uid"] != 0
        if bpf_framework():
            assert health["bind"] == "denied"

        service = ns.show("llmhop.service", "ActiveState", "Type", "User", "MainPID")
        assert service["ActiveState"] == "active"
        assert service["Type"] == "notify"
        assert service["User"] == "llmhop"

        assert ns.systemctl("reload", "llmhop.service").returncode == 0
        ns.wait_for_journal("llmhop.service", "reloaded (1)")
        assert json.loads(ns.http("http://127.0.0.1:8080/health")[1])["reloads"] == 1

        assert ns.systemctl("stop", "llmhop.service").returncode == 0
        assert ns.show("llmhop.service", "ActiveState")["ActiveState"] == "inactive"
        assert ns.systemctl("is-system-running").stdout.strip() == "running"


def test_the_real_router_under_systemd(scratch: Path) -> None:
    router = REPO / "pkgs" / "llmhop" / "llmhop.py"
    source = router.read_text() if router.exists() else ""
    if "LISTEN_FDS" not in source or "NOTIFY_SOCKET" not in source:
        pytest.skip("the router does not implement socket activation and sd_notify yet")
    result = module_units(scratch, llmhop_package(scratch / "pkgs"))
    with boot(result) as ns:
        status, body = ns.http("http://127.0.0.1:8080/health")
        assert status == 200, body + ns.journal("llmhop.service")
        assert ns.show("llmhop.service", "ActiveState")["ActiveState"] == "active"
        assert ns.systemctl("reload", "llmhop.service").returncode == 0
        assert ns.http("http://127.0.0.1:8080/health")[0] == 200
        assert ns.systemctl("stop", "llmhop.service").returncode == 0
