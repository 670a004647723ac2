"""Limits, hostile input and failing upstreams: clear answers, never a crash."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from support import (
    WAIT,
    FakeUpstream,
    HeldUpstream,
    Received,
    RunningRouter,
    chat,
    exchange,
    send_raw,
)

from tests.support.wire import SocketReader, chunk, read_reply, request_bytes

Factory = Callable[..., Any]


def error_code(reply: Any) -> str:
    return reply.json()["error"]["code"]


@pytest.fixture
def capped(router_factory: Factory, upstream: FakeUpstream) -> RunningRouter:
    return router_factory({"maxBodyBytes": 1000, "models": {"m": {"url": upstream.url}}})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/route/m/x"])
def test_declared_length_over_cap_is_refused_before_reading(
    capped: RunningRouter, upstream: FakeUpstream, path: str
) -> None:
    with capped.connect() as sock:
        # Only the head is sent: a router that waited for the body would never answer.
        sock.sendall(request_bytes("POST", path, None, {"Content-Length": "1001"}))
        reply = read_reply(SocketReader(sock))
    assert reply.status == 413
    assert error_code(reply) == "request_too_large"
    assert reply.headers["connection"] == "close"
    assert upstream.connections == 0


def test_declared_length_over_cap_with_expect_gets_no_100(capped: RunningRouter) -> None:
    headers = {"Content-Length": "5000", "Expect": "100-continue"}
    with capped.connect() as sock:
        sock.sendall(request_bytes("POST", "/v1/x", None, headers))
        head = SocketReader(sock).until(b"\r\n\r\n")
    assert head is not None and head.startswith(b"HTTP/1.1 413 ")


def test_chunked_body_over_cap(capped: RunningRouter, upstream: FakeUpstream) -> None:
    wire = chunk(b"x" * 600) + chunk(b"x" * 600) + b"0\r\n\r\n"
    headers = {"Transfer-Encoding": "chunked", "Content-Length": None}
    reply = exchange(capped, "POST", "/v1/x", wire, headers)
    assert reply.status == 413
    assert upstream.connections == 0


def test_chunked_path_routed_body_over_cap_closes_the_upstream(
    capped: RunningRouter, upstream: FakeUpstream
) -> None:
    with capped.connect() as sock:
        sock.sendall(
            request_bytes("POST", "/route/m/upload", None, {"Transfer-Encoding": "chunked"})
        )
        sock.sendall(chunk(b"x" * 600))
        sock.sendall(chunk(b"x" * 600))
        reply = read_reply(SocketReader(sock))
    assert reply.status == 413
    assert upstream.connection_closed.wait(WAIT)
    assert upstream.received.empty()  # the upstream never got a whole request


def test_zero_disables_the_body_cap(router_factory: Factory, upstream: FakeUpstream) -> None:
    router = router_factory({"maxBodyBytes": 0, "models": {"m": {"url": upstream.url}}})
    body = json.dumps({"model": "m", "pad": "x" * (2 * 1024 * 1024)}).encode()
    assert exchange(router, "POST", "/v1/x", body).status == 200
    assert upstream.next_request().body == body


def test_concurrency_limit_answers_503_at_once(router_factory: Factory, held: HeldUpstream) -> None:
    router = router_factory({"maxConcurrentRequests": 1, "models": {"m": {"url": held.url}}})
    with router.connect() as first:
        first.sendall(request_bytes("POST", "/v1/x", chat("m")))
        assert held.next_arrival()
        refused = exchange(router, "POST", "/v1/x", chat("m"))
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        assert error_code(refused) == "too_many_concurrent_requests"
        assert exchange(router, "GET", "/health").status == 200  # takes no slot
        held.release_all()
        assert read_reply(SocketReader(first)).status == 200
    assert exchange(router, "POST", "/v1/x", chat("m")).status == 200


def test_zero_disables_the_concurrency_limit(router_factory: Factory, held: HeldUpstream) -> None:
    router = router_factory({"maxConcurrentRequests": 0, "models": {"m": {"url": held.url}}})
    sockets = [router.connect() for _ in range(10)]
    try:
        for sock in sockets:
            sock.sendall(request_bytes("POST", "/v1/x", chat("m")))
        held.release_all()
        assert all(read_reply(SocketReader(sock)).status == 200 for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_oversized_header_block_gets_431(router: RunningRouter) -> None:
    reply = send_raw(router, request_bytes(headers={"X-Big": "x" * 70_000}))
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_too_many_header_fields_gets_431(router: RunningRouter) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 300 + b"\r\n"
    assert send_raw(router, head).startswith(b"HTTP/1.1 431 ")


def test_slow_header_block_is_cut_off(router_factory: Factory, upstream: FakeUpstream) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}}}, head_timeout=0.3)
    with router.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")
        assert sock.recv(100) == b""  # closed by the router, well before WAIT
    assert exchange(router, "GET", "/health").status == 200


@pytest.mark.parametrize("path", ["/route/m/v1/x", "/v1/x"])
def test_body_cut_short_by_the_clients_end_of_stream_ends_the_exchange(
    router: RunningRouter, path: str
) -> None:
    """The end of stream may come while the upstream connection is still being opened."""

    async def empty_pool() -> None:
        router.router.pool.close()  # so that each attempt opens a connection

    whole = request_bytes("POST", path, chat("m"))
    for _ in range(20):  # the end of stream must win the race at least once
        router.call(empty_pool())
        with router.connect() as sock:
            sock.sendall(whole[:-5])
            sock.shutdown(socket.SHUT_WR)
            assert SocketReader(sock).rest() == b""  # given up on, well before WAIT
    assert router.router.busy_connections == 0


def test_idle_keep_alive_connection_is_closed(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}}}, idle_timeout=0.3)
    with router.connect() as sock:
        sock.sendall(request_bytes("GET", "/health"))
        reader = SocketReader(sock)
        assert read_reply(reader).status == 200
        assert reader.rest() == b""


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: br, chunked\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\n"
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\n bad: fold\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: nothing\r\n\r\n", 417),
    ],
)
def test_malformed_requests_get_an_error_and_a_closed_connection(
    router: RunningRouter, data: bytes, status: int
) -> None:
    raw = send_raw(router, data)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), raw
    assert b"Connection: close" in head
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_small_unread_body_keeps_the_connection(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"authTokens": ["t"], "models": {"m": {"url": upstream.url}}})
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("POST", "/route/m/x", b"x" * 5000))
        reply = read_reply(reader)
        assert reply.status == 401
        assert "connection" not in reply.headers
        sock.sendall(request_bytes("GET", "/health"))
        assert read_reply(reader).status == 200


def test_refused_upstream_gives_502(router_factory: Factory) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    router = router_factory({"models": {"m": {"url": f"http://127.0.0.1:{port}"}}})
    reply = exchange(router, "POST", "/v1/x", chat("m"))
    assert reply.status == 502
    assert reply.json()["error"]["type"] == "upstream_error"
    assert error_code(reply) == "upstream_unavailable"


def test_slow_connect_gives_504(router_factory: Factory) -> None:
    # A listener that never accepts, its backlog full: further SYNs go unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        router = router_factory({"connectTimeout": 0.3, "models": {"m": {"url": url}}})
        reply = exchange(router, "POST", "/v1/x", chat("m"))
        assert reply.status == 504
        assert error_code(reply) == "upstream_timeout"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize(
    "response",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"",
    ],
)
def test_broken_upstream_gives_502(
    router_factory: Factory, upstream_factory: Factory, response: bytes
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(response)
        return False

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    reply = exchange(router, "POST", "/v1/x", chat("m"))
    assert reply.status == 502
    assert error_code(reply) == "upstream_error"


def test_nothing_is_served_after_a_request_that_closes(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    """RFC 9112 §9.6: after "Connection: close" the server reads no further request."""
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    closing = request_bytes("POST", "/v1/x", chat("m"), {"Connection": "close"})
    with router.connect() as sock:
        sock.sendall(closing + request_bytes("POST", "/v1/x", chat("m")))
        reader = SocketReader(sock)
        assert read_reply(reader).headers["connection"] == "close"
        assert reader.rest() == b""
    assert upstream.next_request().body == chat("m")
    assert upstream.received.empty()
