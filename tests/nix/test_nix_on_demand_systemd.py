"""Models on demand under a real systemd: the module's socket, systemd-socket-proxyd and worker
units, the real router in front, fake engines (tests/support/fake_engine.py) that take seconds
to load. Every transition is read from systemd (`systemctl show`), not only from HTTP.

Two llama.cpp models of one group: `a` on a unix socket, `b` on a port, each started by its
first connection and stopped 2 s after its last (the router's pooled connections close after
1 s, which the module sets from the idle timeout).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from nix_harness import ROUTER, chat, llama_cpp_scenario
from systemd_ns import SystemdNamespace

from tests.support.processes import wait_until

pytestmark = [pytest.mark.nix, pytest.mark.systemd, pytest.mark.usefixtures("real_systemd")]

A, B = "llama-cpp-a.service", "llama-cpp-b.service"
PROXY_A, PROXY_B = "llama-cpp-a-proxy.service", "llama-cpp-b-proxy.service"
SOCKET_A, SOCKET_B = "llama-cpp-a-proxy.socket", "llama-cpp-b-proxy.socket"
# Where `a` itself listens, behind its proxy.
SERVER_A = "/run/llmhop/llama-cpp-a/worker/http.sock"
# Health probes answered 503 before the fake is loaded: llmhop-notify probes once a second.
LOADING_PROBES = 2
WAIT = 60


def scenario(scratch: Path) -> dict[str, Any]:
    both = {
        "onDemand": {"enable": True, "idleTimeout": "2s"},
        "group": "gpu",
        "settings": {"fake-loading-probes": LOADING_PROBES},
    }
    broken = {
        "onDemand": {"enable": True, "idleTimeout": "2s"},
        "settings": {"fake-die-while-loading": True},
    }
    models = {"a": both, "b": {"port": 18002, **both}, "broken": broken}
    return llama_cpp_scenario(scratch, models)


def states(ns: SystemdNamespace, *units: str) -> dict[str, str]:
    return {unit: ns.state(unit) for unit in units}


def timestamp(ns: SystemdNamespace, unit: str, what: str) -> int:
    """A unit's CLOCK_MONOTONIC timestamp in µs (`ActiveEnter`, `InactiveExit`, …)."""
    return int(ns.show(unit, f"{what}TimestampMonotonic")[f"{what}TimestampMonotonic"])


def now_us() -> int:
    # systemd's *TimestampMonotonic and ours share CLOCK_MONOTONIC (no time namespace).
    return time.monotonic_ns() // 1000


def wait_for_state(ns: SystemdNamespace, unit: str, state: str) -> None:
    wait_until(
        lambda: ns.state(unit) == state,
        WAIT,
        f"{unit} {state}\n{ns.journal()}",
        interval=0.1,
    )


def metric(ns: SystemdNamespace, sample: str) -> float | None:
    status, text = ns.http(f"{ROUTER}/metrics")
    assert status == 200, text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


def server_a(ns: SystemdNamespace, path: str, method: str = "GET") -> dict[str, Any]:
    """`a`'s fake engine, asked directly on its own socket (not through the router)."""
    body = b"{}" if method == "POST" else None
    status, text = ns.http(
        f"http://localhost{path}", method=method, body=body, unix_socket=SERVER_A
    )
    assert status == 200, text
    reply: dict[str, Any] = json.loads(text)
    return reply


def test_models_start_on_demand_stop_when_idle_and_swap_within_a_group(
    ns: SystemdNamespace,
) -> None:
    workers = (A, B, PROXY_A, PROXY_B)
    # At boot: the sockets listen, nothing is loaded.
    assert states(ns, *workers) == dict.fromkeys(workers, "inactive")
    for socket in (SOCKET_A, SOCKET_B):
        assert ns.show(socket, "ActiveState", "SubState") == {
            "ActiveState": "active",
            "SubState": "listening",
        }
    status, body = ns.http(f"{ROUTER}/v1/models")
    assert status == 200, body
    assert [m["id"] for m in json.loads(body)["data"]] == ["a", "b", "broken"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        # The first request starts `a` and waits, its connection in the socket's backlog, while
        # the server loads; then it succeeds.
        sent = now_us()
        first = pool.submit(chat, ns, "a", timeout=WAIT)
        wait_for_state(ns, A, "activating")
        assert states(ns, PROXY_A, B)[PROXY_A] in ("inactive", "activating")
        assert not first.done()
        status, body = first.result(timeout=WAIT)
        assert status == 200, body
        assert json.loads(body)["model"] == "a"
        assert states(ns, A, PROXY_A, B) == {A: "active", PROXY_A: "active", B: "inactive"}
        assert timestamp(ns, A, "InactiveExit") >= sent
        # Loaded only after its 503s: the unit became active once healthy, the request after.
        assert server_a(ns, "/fake/info")["probes"] > LOADING_PROBES

        # Idle: the router closes its pooled connection (upstreamIdleTimeout 1 s), the proxy
        # exits 2 s later, and the worker, no longer needed, stops; the socket listens on.
        idle_since = now_us()
        wait_for_state(ns, A, "inactive")
        assert states(ns, PROXY_A)[PROXY_A] == "inactive"
        assert timestamp(ns, A, "InactiveEnter") - idle_since >= 2_000_000
        assert ns.show(SOCKET_A, "SubState")["SubState"] == "listening"
        assert ns.show(PROXY_A, "Result")["Result"] == "success"
        assert ns.run("test", "-e", SERVER_A).returncode != 0

        # A stream held open on `a` (started again by it), then a request for `b` of the same
        # group: it waits in the router while `a` still streams, and nothing starts `b`.
        stream: Future[tuple[int, str]] = pool.submit(
            chat, ns, "a", fields={"stream": True, "fake_hold": True}, timeout=WAIT
        )
        wait_until(
            lambda: (
                ns.run("test", "-S", SERVER_A).returncode == 0
                and server_a(ns, "/fake/info")["holding"] == 1
            ),
            WAIT,
            "a holds a stream",
            interval=0.2,
        )
        queued = pool.submit(chat, ns, "b", timeout=WAIT)
        wait_until(
            lambda: metric(ns, 'llmhop_queue_depth{group="gpu",model="b"}') == 1,
            WAIT,
            "b waits for its group",
            interval=0.2,
        )
        assert states(ns, A, B, PROXY_B) == {A: "active", B: "inactive", PROXY_B: "inactive"}
        assert not stream.done() and not queued.done()

        # `a`'s last response ends: the router lets `b` in, whose start stops `a` (Conflicts=)
        # before `b` starts loading.
        released = now_us()
        assert server_a(ns, "/fake/release", method="POST") == {"released": 1}
        status, streamed = stream.result(timeout=WAIT)
        assert status == 200, streamed
        assert streamed.rstrip().endswith("data: [DONE]"), streamed
        status, body = queued.result(timeout=WAIT)
        assert status == 200, body
        assert json.loads(body)["model"] == "b"

    assert states(ns, A, PROXY_A, B, PROXY_B) == {
        A: "inactive",
        PROXY_A: "inactive",
        B: "active",
        PROXY_B: "active",
    }
    a_stopping = timestamp(ns, A, "ActiveExit")
    assert a_stopping >= released
    assert timestamp(ns, A, "InactiveEnter") <= timestamp(ns, B, "InactiveExit")
    switches = metric(ns, 'llmhop_group_switches_total{group="gpu"}')
    assert switches is not None and switches >= 1, switches
    # And `b`, idle in turn, stops too.
    wait_for_state(ns, B, "inactive")
    assert states(ns, PROXY_B)[PROXY_B] == "inactive"


def test_a_model_that_fails_or_dies_is_started_again_by_the_next_request(
    ns: SystemdNamespace,
) -> None:
    # `broken` dies while loading: the waiting request fails after that one attempt, the
    # socket listens on, and nothing loads it again until the next request does.
    worker, proxy, socket = (
        "llama-cpp-broken.service",
        "llama-cpp-broken-proxy.service",
        "llama-cpp-broken-proxy.socket",
    )
    for attempt in (1, 2):
        status, body = chat(ns, "broken", timeout=WAIT)
        assert status == 502, body
        assert json.loads(body)["error"]["type"] == "upstream_error"
        assert states(ns, worker, proxy) == {worker: "failed", proxy: "inactive"}
        assert ns.show(socket, "SubState")["SubState"] == "listening"
        assert ns.journal(worker).count("failed to load the model") == attempt

    # `a`, killed while loaded, takes its proxy down; each next request loads it again, more
    # often than an always-on worker may start in an hour (three times).
    for start in range(4):
        status, body = chat(ns, "a", timeout=WAIT)
        assert status == 200, f"start {start + 1}: {body}"
        assert states(ns, A, PROXY_A) == {A: "active", PROXY_A: "active"}
        assert ns.systemctl("kill", "--signal=SIGKILL", A).returncode == 0
        wait_for_state(ns, PROXY_A, "inactive")
        assert ns.state(A) == "failed"
        assert ns.show(SOCKET_A, "SubState")["SubState"] == "listening"
