"""Two replicas of one model under a real systemd, behind the real router: the module's units
(llama-cpp-fake-model-0 on a unix socket, -1 on a port) run the fake engine
(tests/support/fake_engine.py) as `llama-server`; stopping one replica's unit leaves the
model served by the other."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from nix_harness import ROUTER, chat, llama_cpp_scenario
from systemd_ns import SystemdNamespace

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

MODEL = "fake-model"
REPLICAS = [f"llama-cpp-{MODEL}-0.service", f"llama-cpp-{MODEL}-1.service"]
PORT = 18051


def scenario(scratch: Path) -> dict[str, Any]:
    models = {MODEL: {"replicas": [{}, {"port": PORT}]}}
    return llama_cpp_scenario(scratch, models, started_by_hand=tuple(REPLICAS))


def via(ns: SystemdNamespace) -> str:
    """How one chat request through the router reached the engine (`socket`: replica 0,
    `tcp`: replica 1)."""
    status, body = chat(ns, MODEL)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["model"] == MODEL
    how: str = reply["via"]
    return how


def replica_metrics(ns: SystemdNamespace) -> dict[tuple[str, str], int]:
    """The router's per-replica counters: {(metric, replica): value}."""
    status, text = ns.http(f"{ROUTER}/metrics")
    assert status == 200, text
    pattern = rf'^llmhop_replica_(\w+)\{{model="{MODEL}",replica="(\d)"\}} (\d+)$'
    return {(m[1], m[2]): int(m[3]) for m in re.finditer(pattern, text, re.M)}


def test_one_replica_stopped_the_other_serves(ns: SystemdNamespace) -> None:
    for unit in REPLICAS:
        # Type=notify: returns once the replica's server answered its health probe.
        assert ns.systemctl("start", unit, timeout=30).returncode == 0, ns.journal(unit)
        assert ns.state(unit) == "active"
    first, second = (ns.show(unit, "StatusText")["StatusText"] for unit in REPLICAS)
    assert f"healthy at unix:///run/llmhop/llama-cpp-{MODEL}-0/http.sock" in first
    assert f"healthy at http://127.0.0.1:{PORT}" in second
    # One dynamic user for both, who owns the cache they share: a replica starting never takes
    # it away from the other.
    uids = {
        ns.run("stat", "-c", "%u", f"/proc/{ns.show(unit, 'MainPID')['MainPID']}").stdout.strip()
        for unit in REPLICAS
    }
    cache = ns.run("stat", "-L", "-c", "%u", f"/var/cache/llama-cpp/{MODEL}").stdout.strip()
    assert len(uids) == 1 and uids == {cache}, (uids, cache)

    # Both replicas serve: sequential requests are ties, which take turns.
    assert {via(ns) for _ in range(4)} == {"socket", "tcp"}
    before = replica_metrics(ns)
    assert before[("requests_total", "0")] >= 1
    assert before[("requests_total", "1")] >= 1

    assert ns.systemctl("stop", REPLICAS[0], timeout=30).returncode == 0
    assert ns.state(REPLICAS[0]) == "inactive"
    assert ns.state(REPLICAS[1]) == "active"
    # Its socket went with it: connecting fails, and the request goes to the other replica.
    assert ns.run("test", "-e", f"/run/llmhop/llama-cpp-{MODEL}-0").returncode != 0
    assert [via(ns) for _ in range(4)] == ["tcp"] * 4
    after = replica_metrics(ns)
    assert after[("requests_total", "1")] == before[("requests_total", "1")] + 4
    assert after[("connect_failures_total", "0")] >= 1
    assert after[("connect_failures_total", "1")] == 0
    assert ns.state("llmhop.service") == "active"
