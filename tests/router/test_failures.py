"""When an upstream fails: every request is answered (never a hang, never a held slot), a
request that may have been processed is never sent again (RFC 9110 §9.2.2), and the client
learns nothing of the upstream's address."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import FakeUpstream, Received, RunningRouter, chat, exchange, llmhop

from tests.support.processes import refused_url
from tests.support.wire import SocketReader, http_response, read_reply, request_bytes

Factory = Callable[..., Any]


# --- back-off ---------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**7))
def test_back_off_stays_between_its_bounds_after_any_number_of_failures(failures: int) -> None:
    state = llmhop.ReplicaState()
    state.failures = failures
    llmhop.replica_failed(state, 100.0)
    assert 100.0 + llmhop.BACKOFF_FIRST <= state.retry_at <= 100.0 + llmhop.BACKOFF_MAX


def test_a_replica_down_for_an_afternoon_still_gets_an_answer(router_factory: Factory) -> None:
    router = router_factory({"models": {"m": {"url": refused_url()}}})
    (replica,) = router.router.table.models["m"].replicas
    replica.state.failures = 5000  # a host that has been off for a long while
    reply = exchange(router, "POST", "/v1/chat", chat("m"))
    assert (reply.status, reply.json()["error"]["code"]) == (502, "upstream_unavailable")
    router.assert_idle()


def test_only_the_replica_that_failed_longest_ago_is_tried_when_all_back_off(
    router_factory: Factory,
) -> None:
    router = router_factory({"models": {"m": {"urls": [refused_url() for _ in range(3)]}}})
    replicas = router.router.table.models["m"].replicas
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 502
    assert [r.state.connect_failures for r in replicas] == [1, 1, 1]  # each tried once
    oldest = min(replicas, key=lambda r: r.state.failed_at)
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 502
    assert sum(r.state.connect_failures for r in replicas) == 4
    assert oldest.state.connect_failures == 2
    router.assert_idle()


# --- errors while connecting ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["a..example", "x" * 64 + ".example", ".example"])
def test_a_host_that_cannot_be_looked_up_is_a_config_error(host: str) -> None:
    text = json.dumps({"models": {"m": {"url": f"http://{host}:8000"}}})
    with pytest.raises(llmhop.ConfigError) as raised:
        llmhop.parse_config(text, llmhop.SecretResolver({}))
    ((path, message),) = raised.value.problems
    assert path == "models.m.url" and "host" in message


def test_any_error_while_connecting_is_a_502(
    router_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = router_factory({"models": {"m": {"url": "http://127.0.0.1:9"}}})

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeError("label empty or too long")

    monkeypatch.setattr(router.loop, "create_connection", broken)
    reply = exchange(router, "POST", "/v1/chat", chat("m"))
    assert (reply.status, reply.json()["error"]["code"]) == (502, "upstream_unavailable")
    router.assert_idle()


def test_a_502_names_no_upstream_address(router_factory: Factory) -> None:
    url = refused_url()
    router = router_factory({"models": {"m": {"url": url}}})
    reply = exchange(router, "POST", "/v1/chat", chat("m"))
    assert reply.status == 502
    port = url.rsplit(":", 1)[1]
    assert "127.0.0.1" not in reply.body.decode() and port not in reply.body.decode()


# --- nothing sent twice -----------------------------------------------------------------------


class HangUpOnReuse(FakeUpstream):
    """Answers the first request on each connection; reads the next whole, then closes."""

    def __init__(self) -> None:
        self.answered: set[int] = set()

        def handler(request: Received, conn: socket.socket) -> bool:
            if request.connection_number in self.answered:
                return False
            self.answered.add(request.connection_number)
            conn.sendall(http_response())
            return True

        super().__init__(handler)

    def count(self) -> int:
        return self.received.qsize()


def keep_alive_pair(router: RunningRouter, method: str, headers: dict[str, str]) -> int:
    """Two requests on one client connection (the second reuses the pooled upstream
    connection): the second one's status."""
    # A POST is routed by its body, which the router holds whole and so could send again.
    body, path = (chat("m"), "/v1/chat") if method == "POST" else (None, "/route/m/v1/x")
    with router.connect() as sock:
        reader = SocketReader(sock)
        for _ in range(2):
            sock.sendall(request_bytes(method, path, body, headers))
            status = read_reply(reader, method).status
        return status


def test_a_post_is_never_sent_twice(router_factory: Factory) -> None:
    upstream = HangUpOnReuse()
    try:
        router = router_factory({"models": {"m": {"url": upstream.url}}})
        assert keep_alive_pair(router, "POST", {}) == 502
        assert upstream.count() == 2  # the first, and the second once: never replayed
        router.assert_idle()
    finally:
        upstream.close()


@pytest.mark.parametrize(("method", "headers"), [("GET", {}), ("POST", {"Idempotency-Key": "k-1"})])
def test_an_idempotent_request_is_replayed_once(
    router_factory: Factory, method: str, headers: dict[str, str]
) -> None:
    upstream = HangUpOnReuse()
    try:
        router = router_factory({"models": {"m": {"url": upstream.url}}})
        assert keep_alive_pair(router, method, headers) == 200
        assert upstream.count() == 3  # the second went again, on a fresh connection
        router.assert_idle()
    finally:
        upstream.close()


def test_a_pooled_connection_the_upstream_closed_is_not_used(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def answer_then_close(request: Received, conn: socket.socket) -> bool:
        conn.sendall(http_response(headers={"Connection": None}))
        return False  # closes while the router keeps the connection in its pool

    upstream = upstream_factory(answer_then_close)
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("POST", "/v1/chat", chat("m")))
        assert read_reply(reader).status == 200
        assert upstream.connection_closed.wait(5)
        sock.sendall(request_bytes("POST", "/v1/chat", chat("m")))
        assert read_reply(reader).status == 200
    assert upstream.connections == 2


# --- protocol switches ------------------------------------------------------------------------


def test_an_unsolicited_switch_of_protocols_is_a_502(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    upstream = upstream_factory(lambda request, conn: conn.sendall(switch + b"raw bytes"))
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    reply = exchange(router, "POST", "/v1/chat", chat("m"))
    assert (reply.status, reply.json()["error"]["code"]) == (502, "upstream_error")
    assert b"raw bytes" not in reply.body
    router.assert_idle()
