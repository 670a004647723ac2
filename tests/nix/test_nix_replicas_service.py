"""Two replicas of one model under a real systemd, behind the real router: the module's units
(llama-cpp-fake-model-0 on a unix socket, -1 on a port) run the fake engine
(tests/support/fake_engine.py) as `llama-server`; stopping one replica's unit leaves the
model served by the other."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nix_harness import evaluate, fake_llama_cpp_packages, mk_force
from systemd_ns import SystemdNamespace, booted

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

MODEL = "fake-model"
REPLICAS = [f"llama-cpp-{MODEL}-0.service", f"llama-cpp-{MODEL}-1.service"]
PORT = 18051
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


def scenario(scratch: Path) -> dict[str, Any]:
    pkgs = fake_llama_cpp_packages(scratch)
    not_at_boot = {"wantedBy": mk_force([])}
    config = {
        "services": {
            "llmhop": {
                "enable": True,
                "host": "127.0.0.1",
                "port": 8080,
                "llama-cpp": {
                    "models": {MODEL: {"replicas": [{}, {"port": PORT}]}},
                },
            }
        },
        # Started by hand (the router by its first connection).
        "systemd": {
            "services": {
                "llmhop": not_at_boot,
                **{unit.removesuffix(".service"): not_at_boot for unit in REPLICAS},
            }
        },
    }
    return evaluate(config, pkgs=pkgs)


@pytest.fixture
def ns(scratch: Path) -> Iterator[SystemdNamespace]:
    with booted(scenario(scratch)) as namespace:
        yield namespace


def chat(ns: SystemdNamespace) -> str:
    """One chat request through the router; how it reached the engine (`socket`: replica 0,
    `tcp`: replica 1)."""
    status, body = ns.http(
        "http://127.0.0.1:8080/v1/chat/completions",
        method="POST",
        body=CHAT.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, body
    reply = json.loads(body)
    assert reply["model"] == MODEL
    via: str = reply["via"]
    return via


def replica_metrics(ns: SystemdNamespace) -> dict[tuple[str, str], int]:
    """The router's per-replica counters: {(metric, replica): value}."""
    status, text = ns.http("http://127.0.0.1:8080/metrics")
    assert status == 200, text
    pattern = rf'^llmhop_replica_(\w+)\{{model="{MODEL}",replica="(\d)"\}} (\d+)$'
    return {(m[1], m[2]): int(m[3]) for m in re.finditer(pattern, text, re.M)}


def state(ns: SystemdNamespace, unit: str) -> str:
    return ns.show(unit, "ActiveState")["ActiveState"]


def test_one_replica_stopped_the_other_serves(ns: SystemdNamespace) -> None:
    for unit in REPLICAS:
        # Type=notify: returns once the replica's server answered its health probe.
        assert ns.systemctl("start", unit, timeout=30).returncode == 0, ns.journal(unit)
        assert state(ns, unit) == "active"
    first, second = (ns.show(unit, "StatusText")["StatusText"] for unit in REPLICAS)
    assert f"healthy at unix:///run/llmhop/llama-cpp-{MODEL}-0/http.sock" in first
    assert f"healthy at http://127.0.0.1:{PORT}" in second

    # Both replicas serve: sequential requests are ties, which take turns.
    assert {chat(ns) for _ in range(4)} == {"socket", "tcp"}
    before = replica_metrics(ns)
    assert before[("requests_total", "0")] >= 1
    assert before[("requests_total", "1")] >= 1

    assert ns.systemctl("stop", REPLICAS[0], timeout=30).returncode == 0
    assert state(ns, REPLICAS[0]) == "inactive"
    assert state(ns, REPLICAS[1]) == "active"
    # Its socket went with it: connecting fails, and the request goes to the other replica.
    assert ns.run("test", "-e", f"/run/llmhop/llama-cpp-{MODEL}-0").returncode != 0
    assert [chat(ns) for _ in range(4)] == ["tcp"] * 4
    after = replica_metrics(ns)
    assert after[("requests_total", "1")] == before[("requests_total", "1")] + 4
    assert after[("connect_failures_total", "0")] >= 1
    assert after[("connect_failures_total", "1")] == 0
    assert state(ns, "llmhop.service") == "active"
