"""The module's router and llama.cpp units under a real systemd (like the reference's VM test).

The router is the real pkgs/llmhop/llmhop.py; `llama-server` is the fake engine
(tests/support/fake_engine.py), which answers 503 while "loading" and needs the API key the
module passes as `%d/api-keys`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from nix_harness import chat, llama_cpp_scenario
from systemd_ns import SystemdNamespace

from tests.support.processes import wait_until

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

CLIENT_TOKEN = "client-secret"
WORKER_KEY = "worker-secret"
MODEL = "fake-model"
WORKER = f"llama-cpp-{MODEL}.service"
DYING = "llama-cpp-dying-model.service"
SOCKET_DIR = "/run/llmhop/llama-cpp-fake-model"


def scenario(scratch: Path) -> dict[str, Any]:
    secrets = scratch / "secrets"
    secrets.mkdir()
    (secrets / "client-token").write_text(CLIENT_TOKEN + "\n")
    (secrets / "worker-key").write_text(WORKER_KEY + "\n")
    for secret in secrets.iterdir():
        secret.chmod(0o600)
    worker_credentials = {"api-keys": str(secrets / "worker-key")}
    router = {
        "listen": {"local": {}},
        "credentials": {
            "llmhop.client-token": str(secrets / "client-token"),
            "llmhop.worker-key": str(secrets / "worker-key"),
        },
        "settings": {
            "authTokens": ["${cred:llmhop.client-token}"],
            # Added to the route the worker registers.
            "models": {MODEL: {"headers": {"Authorization": "Bearer ${cred:llmhop.worker-key}"}}},
        },
    }
    models = {
        MODEL: {
            "credentials": worker_credentials,
            "settings": {
                "api-key-file": "${cred:api-keys}",
                "fake-ready-file": str(scratch / "ready"),
            },
        },
        "dying-model": {
            "credentials": worker_credentials,
            "settings": {"api-key-file": "${cred:api-keys}", "fake-die-while-loading": True},
        },
    }
    # The workers are started by hand, as in the VM test.
    return llama_cpp_scenario(scratch, models, router=router, started_by_hand=(WORKER, DYING))


def test_router_and_llama_cpp_worker(ns: SystemdNamespace, scratch: Path) -> None:
    # Type=notify: once the router is started, /health answers; both listeners serve.
    status, body = ns.http("http://127.0.0.1:8080/health")
    assert (status, json.loads(body)) == (200, {"status": "ok", "models": 2}), body
    assert ns.state("llmhop.service") == "active"
    status, body = ns.http("http://localhost/health", unix_socket="/run/llmhop/local.sock")
    assert status == 200, body
    sockets = ns.show("llmhop.service", "Triggers", "TriggeredBy")["TriggeredBy"].split()
    assert sorted(sockets) == ["llmhop-default.socket", "llmhop-local.socket"]

    # Auth is checked before routing; the worker is not up yet.
    assert chat(ns, MODEL)[0] == 401
    assert chat(ns, MODEL, token="wrong")[0] == 401
    status, body = chat(ns, MODEL, token=CLIENT_TOKEN)
    assert status == 502, body

    # Readiness: the unit stays activating while /health answers 503.
    assert ns.systemctl("start", "--no-block", WORKER).returncode == 0
    ns.wait_for_journal(WORKER, "health probe 2")
    assert ns.state(WORKER) == "activating"
    listing = ns.run("stat", "-c", "%a %G %n", SOCKET_DIR, f"{SOCKET_DIR}/http.sock").stdout
    assert listing.splitlines() == [
        f"710 llama-cpp {SOCKET_DIR}",
        f"770 llama-cpp {SOCKET_DIR}/http.sock",
    ], listing
    (scratch / "ready").write_text("")
    # A second start waits for the pending job: it returns once READY=1 arrived.
    assert ns.systemctl("start", WORKER, timeout=30).returncode == 0
    assert ns.state(WORKER) == "active"
    worker = ns.show(WORKER, "DynamicUser", "User", "Group", "StatusText")
    assert worker["Group"] == "llama-cpp"
    assert worker["DynamicUser"] == "yes"
    assert "healthy at unix:///run/llmhop/llama-cpp-fake-model/http.sock" in worker["StatusText"]

    # The router reaches the worker through its socket, with the injected key, on both
    # listeners; the client's token does not travel on.
    status, body = chat(ns, MODEL, token=CLIENT_TOKEN)
    assert status == 200, body + ns.journal(WORKER)
    reply = json.loads(body)
    assert reply["model"] == "fake-model"
    assert reply["via"] == "socket"
    status, body = chat(ns, MODEL, token=CLIENT_TOKEN, unix_socket="/run/llmhop/local.sock")
    assert status == 200, body

    # The module turned the worker's metrics on and told the router where they are: the
    # router's own /metrics carries them, labelled with the model, fetched with its key.
    client = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    status, body = ns.http("http://127.0.0.1:8080/metrics", headers=client)
    assert status == 200, body
    assert 'llamacpp:requests_processing{model="fake-model"} 0' in body.splitlines(), body

    # A SIGKILLed worker restarts although its last socket was never unlinked.
    pid = ns.show(WORKER, "MainPID")["MainPID"]
    assert ns.systemctl("kill", "--signal=SIGKILL", WORKER).returncode == 0
    wait_until(lambda: ns.state(WORKER) != "active", 30, "the worker is dead", interval=0.2)
    assert ns.systemctl("restart", WORKER, timeout=30).returncode == 0
    assert ns.state(WORKER) == "active"
    assert ns.show(WORKER, "MainPID")["MainPID"] != pid
    assert chat(ns, MODEL, token=CLIENT_TOKEN)[0] == 200
    assert "Address already in use" not in ns.journal(WORKER)

    # A clean stop removes the socket directory.
    assert ns.systemctl("stop", WORKER).returncode == 0
    assert ns.state(WORKER) == "inactive"
    assert ns.run("test", "-e", SOCKET_DIR).returncode != 0


def test_a_worker_dying_while_loading_fails_at_once(ns: SystemdNamespace) -> None:
    started = time.monotonic()
    start = ns.systemctl("start", DYING, timeout=30)
    elapsed = time.monotonic() - started
    assert start.returncode != 0
    # Failed at once: far from TimeoutStartSec (an hour).
    assert elapsed < 20, elapsed
    result = ns.show(DYING, "Result", "ExecMainStatus", "TimeoutStartUSec")
    assert result["Result"] == "exit-code"
    assert result["ExecMainStatus"] == "3"
    assert result["TimeoutStartUSec"] == "1h"
    assert "exited before it was ready" in ns.journal(DYING)
