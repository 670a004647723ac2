"""Groups: models of one group are served one at a time, queued fairly, within a timeout."""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, FakeUpstream, HeldUpstream, RunningRouter, chat, exchange, llmhop

from tests.support.router import RouterProcess
from tests.support.wire import SocketReader, read_reply, request_bytes

Factory = Callable[..., Any]


class Client:
    """One request on its own connection, sent now, its answer read later."""

    def __init__(self, router: Any, model: str) -> None:
        self.sock = router.connect()
        self.sock.sendall(request_bytes("POST", "/v1/chat", chat(model)))

    def answer(self) -> Any:
        with self.sock:
            return read_reply(SocketReader(self.sock))


def group_config(a: FakeUpstream, b: FakeUpstream, **model: Any) -> dict[str, Any]:
    return {
        "models": {
            "a": {"url": a.url, "group": "gpu0", **model},
            "b": {"url": b.url, "group": "gpu0", **model},
        }
    }


def queue_depth(router: RunningRouter | RouterProcess, model: str) -> float:
    text = exchange(router, "GET", "/metrics").body.decode()
    match = re.search(rf'^llmhop_queue_depth{{group="gpu0",model="{model}"}} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


def until(condition: Callable[[], bool]) -> None:
    """Poll a condition the router changes from its own thread, bounded by WAIT."""
    event = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached in time")


def hold_a(router: RunningRouter | RouterProcess, a: HeldUpstream) -> Client:
    """A request for model a, held at its upstream: a is its group's active model."""
    holding = Client(router, "a")
    a.next_arrival()
    return holding


def queue_for(router: RunningRouter | RouterProcess, model: str, count: int = 1) -> list[Client]:
    """Requests for a model, sent and seen waiting in its group's queue."""
    clients = [Client(router, model) for _ in range(count)]
    until(lambda: queue_depth(router, model) == count)
    return clients


def test_a_model_waits_while_another_of_its_group_has_requests(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory(group_config(a, b))
    first = hold_a(router, a)
    (waiting,) = queue_for(router, "b")
    assert b.nothing_arrived()  # not while a has one in flight
    # Another request for the active model, with nobody waiting, would go straight in; with
    # b waiting, it queues behind b.
    late_a = Client(router, "a")
    until(lambda: queue_depth(router, "a") == 1)
    a.allow()
    assert first.answer().status == 200
    b.next_arrival()  # b goes in the moment a's last response ended
    assert a.nothing_arrived()  # and late_a waits its turn, behind b
    b.allow()
    assert waiting.answer().status == 200
    a.next_arrival()
    a.allow()
    assert late_a.answer().status == 200
    text = exchange(router, "GET", "/metrics").body.decode()
    assert 'llmhop_group_switches_total{group="gpu0"} 2' in text
    assert 'llmhop_queue_wait_seconds_count{model="b"} 1' in text


def test_on_a_switch_every_request_waiting_for_the_model_goes_in(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory({**group_config(a, b), "maxConcurrentRequests": 0})
    holding = hold_a(router, a)
    waiting = queue_for(router, "b", 3)
    a.allow()
    assert holding.answer().status == 200
    for _ in waiting:
        b.next_arrival()
    b.allow(3)
    assert all(client.answer().status == 200 for client in waiting)


def test_models_without_a_group_are_not_held_up(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream], upstream: FakeUpstream
) -> None:
    a, b = held_factory(), held_factory()
    config = group_config(a, b)
    config["models"]["free"] = {"url": upstream.url}
    router = router_factory(config)
    holding = hold_a(router, a)
    assert exchange(router, "POST", "/v1/chat", chat("free")).status == 200
    a.allow()
    assert holding.answer().status == 200


def test_a_request_not_let_in_in_time_gets_503(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    config = group_config(a, b)
    config["models"]["b"]["queueTimeout"] = 0.2
    router = router_factory(config)
    holding = hold_a(router, a)
    refused = Client(router, "b").answer()
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "model_busy"
    assert '"gpu0"' in error["message"] and 'serving "a"' in error["message"]
    assert b.nothing_arrived()
    assert queue_depth(router, "b") == 0
    a.allow()
    assert holding.answer().status == 200
    until(lambda: router.router.in_flight == 0)


def test_a_client_that_leaves_the_queue_costs_nothing_upstream(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory(group_config(a, b))
    holding = hold_a(router, a)
    (leaving,) = queue_for(router, "b")
    leaving.sock.close()
    until(lambda: queue_depth(router, "b") == 0)
    a.allow()
    assert holding.answer().status == 200
    # The group carries on: a has nobody waiting behind it, and b's turn comes when asked.
    assert b.nothing_arrived()
    second = Client(router, "b")
    b.next_arrival()
    b.allow()
    assert second.answer().status == 200
    until(lambda: router.router.in_flight == 0)


def test_idle_upstream_connections_close_after_the_timeout(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    upstream = upstream_factory()
    kept = upstream_factory()
    router = router_factory(
        {
            "upstreamIdleTimeout": 0.2,
            "models": {
                "m": {"url": upstream.url},
                "kept": {"url": kept.url, "upstreamIdleTimeout": 3600},
            },
        }
    )
    assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert exchange(router, "POST", "/v1/x", chat("kept")).status == 200
    assert upstream.connection_closed.wait(WAIT)  # closed by the router, idle
    assert upstream.closed_connections == 1
    assert kept.closed_connections == 0
    # The next request opens a new connection and is served as ever.
    assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert upstream.connections == 2


def test_a_switch_closes_the_pooled_connections_to_the_model_left(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    a, b = upstream_factory(), upstream_factory()
    router = router_factory(group_config(a, b))
    assert exchange(router, "POST", "/v1/x", chat("a")).status == 200
    assert a.closed_connections == 0  # pooled
    assert exchange(router, "POST", "/v1/x", chat("b")).status == 200
    assert a.connection_closed.wait(WAIT)


def reload_with(router: RunningRouter, tmp_path: Path, config: dict[str, Any]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}))
    router.server.config_path = str(path)

    async def reload() -> None:
        router.server.reload()

    router.call(reload())


def test_a_reload_keeps_the_queue(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream], tmp_path: Path
) -> None:
    a, b = held_factory(), held_factory()
    config = group_config(a, b)
    router = router_factory(config)
    holding = hold_a(router, a)
    (waiting,) = queue_for(router, "b")
    reload_with(router, tmp_path, config)
    assert queue_depth(router, "b") == 1
    a.allow()
    assert holding.answer().status == 200
    b.next_arrival()
    b.allow()
    assert waiting.answer().status == 200


def test_a_group_gone_by_reload_lets_its_waiters_go(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream], tmp_path: Path
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory(group_config(a, b))
    holding = hold_a(router, a)
    (waiting,) = queue_for(router, "b")
    reload_with(router, tmp_path, {"models": {"a": {"url": a.url}, "b": {"url": b.url}}})
    b.next_arrival()  # while a's request is still in flight
    b.allow()
    assert waiting.answer().status == 200
    a.allow()
    assert holding.answer().status == 200
    until(lambda: router.router.in_flight == 0)


def test_drain_keeps_the_promise_to_waiting_requests(
    tmp_path: Path, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = RouterProcess(group_config(a, b), tmp_path)
    holding = hold_a(router, a)
    (waiting,) = queue_for(router, "b")
    router.process.send_signal(signal.SIGTERM)
    a.allow()
    assert holding.answer().status == 200
    b.next_arrival()
    b.allow()
    assert waiting.answer().status == 200
    assert router.process.wait(WAIT) == 0
    log = router.stop()
    assert re.search(r'"POST /v1/chat" model=b .*status=200 .* queued_ms=[\d.]+$', log, re.M), log


@pytest.mark.parametrize(
    ("config", "path", "message"),
    [
        ({"queueTimeout": 0}, "queueTimeout", "positive"),
        ({"upstreamIdleTimeout": -1}, "upstreamIdleTimeout", "positive"),
        ({"models": {"m": {"url": "http://a", "group": ""}}}, "models.m.group", "not be empty"),
        (
            {"models": {"m": {"url": "http://a", "queueTimeout": "5"}}},
            "models.m.queueTimeout",
            "number",
        ),
        (
            {"models": {"m": {"url": "http://a", "upstreamIdleTimeout": 0}}},
            "models.m.upstreamIdleTimeout",
            "positive",
        ),
    ],
)
def test_bad_group_settings_are_refused_with_their_key_path(
    config: dict[str, Any], path: str, message: str
) -> None:
    text = json.dumps({"models": {"m": {"url": "http://a"}}, **config})
    with pytest.raises(llmhop.ConfigError) as caught:
        llmhop.parse_config(text, llmhop.SecretResolver({}))
    assert any(p == path and message in m for p, m in caught.value.problems), caught.value


def test_when_the_waiter_for_another_model_leaves_the_active_models_requests_go_in(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    config = group_config(a, b)
    config["models"]["b"]["queueTimeout"] = 0.3
    router = router_factory(config)
    holding = hold_a(router, a)
    (waiting_b,) = queue_for(router, "b")
    (late_a,) = queue_for(router, "a")  # behind b, though a is active
    assert waiting_b.answer().status == 503
    a.next_arrival()  # b gave up: a's request goes in while a still has one in flight
    a.allow(2)
    assert holding.answer().status == 200 and late_a.answer().status == 200
    until(lambda: router.router.in_flight == 0)


def test_a_queued_client_that_closes_with_its_body_unsent_leaves_the_queue(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory(group_config(a, b))
    holding = hold_a(router, a)
    sock = router.connect()
    head = request_bytes("POST", "/route/b/v1/x", None, {"Content-Length": "100"})
    sock.sendall(head + b"0123456789")  # a body still to come, as the request queues
    until(lambda: queue_depth(router, "b") == 1)
    sock.close()
    until(lambda: queue_depth(router, "b") == 0)
    a.allow()
    assert holding.answer().status == 200
    until(lambda: router.router.in_flight == 0)
    router.settle()
    assert b.nothing_arrived()


def test_queued_requests_are_not_counted_in_flight(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = held_factory(), held_factory()
    router = router_factory(group_config(a, b))
    holding = hold_a(router, a)
    waiting = queue_for(router, "b", 2)
    text = exchange(router, "GET", "/metrics").body.decode()
    assert 'llmhop_requests_in_flight{model="a"} 1' in text
    assert 'llmhop_requests_in_flight{model="b"} 0' in text
    assert router.server.status().endswith("1 request(s) in flight, 2 queued")
    a.allow()
    b.allow(2)
    assert holding.answer().status == 200
    assert all(client.answer().status == 200 for client in waiting)
