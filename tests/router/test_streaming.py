"""Responses relayed as they arrive, and connections ended as soon as either side leaves."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import WAIT, RunningRouter, chat

from tests.support.wire import SocketReader, chunk, request_bytes

Factory = Callable[..., Any]


class ScriptedUpstream:
    """One upstream connection driven step by step by the test, with events both ways."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conn: socket.socket | None = None
        self.request_seen = threading.Event()
        self.closed_by_router = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        reader = SocketReader(conn)
        head = reader.until(b"\r\n\r\n")
        assert head is not None
        self.request_seen.set()
        # Wait for the router to hang up; anything else it sends is unexpected.
        conn.settimeout(WAIT * 4)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            return
        self.closed_by_router.set()

    def send(self, data: bytes) -> None:
        assert self.request_seen.wait(WAIT)
        assert self.conn is not None
        self.conn.sendall(data)

    def die(self) -> None:
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)  # close() alone would not wake the reading thread

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            self.conn.close()


@pytest.fixture
def scripted(router_factory: Factory) -> Any:
    upstream = ScriptedUpstream()
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    yield upstream, router
    upstream.close()


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def start_stream(router: RunningRouter) -> tuple[socket.socket, SocketReader]:
    sock = router.connect()
    sock.sendall(request_bytes("POST", "/v1/chat/completions", chat("m", stream=True)))
    return sock, SocketReader(sock)


def test_each_event_reaches_the_client_before_the_upstream_sends_the_next(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    with sock:
        upstream.send(SSE_HEAD)
        head = reader.until(b"\r\n\r\n")
        assert head is not None and b"text/event-stream" in head
        for index in range(5):
            event = b'data: {"token": %d}\n\n' % index
            upstream.send(chunk(event))
            # Blocks until the router passes this event on: buffering would hang here.
            assert reader.until(event) is not None
        upstream.send(b"0\r\n\r\n")
        assert reader.until(b"0\r\n\r\n") is not None


def test_fixed_length_body_is_relayed_in_pieces(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    with sock:
        upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        assert reader.until(b"first") is not None
        upstream.send(b"-last")
        assert reader.until(b"-last") is not None


def test_client_leaving_mid_stream_closes_the_upstream_at_once(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    upstream.send(SSE_HEAD + chunk(b"data: 1\n\n"))
    assert reader.until(b"data: 1\n\n") is not None
    sock.close()
    # The upstream stays silent (a model thinking): only the router's watch can notice.
    assert upstream.closed_by_router.wait(WAIT)
    assert router.router.in_flight == 0


def test_client_leaving_before_the_response_closes_the_upstream(scripted: Any) -> None:
    upstream, router = scripted
    sock, _ = start_stream(router)
    assert upstream.request_seen.wait(WAIT)
    sock.close()
    assert upstream.closed_by_router.wait(WAIT)


def test_upstream_dying_mid_chunked_response_closes_the_client(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    with sock:
        upstream.send(SSE_HEAD + chunk(b"data: partial\n\n"))
        assert reader.until(b"data: partial\n\n") is not None
        upstream.die()
        rest = reader.rest()  # returns only once the router closes the connection
        assert b"0\r\n\r\n" not in rest


def test_upstream_dying_mid_fixed_length_response_closes_the_client(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    with sock:
        upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        assert reader.until(b"only ten b") is not None
        upstream.die()
        assert reader.rest() == b""


def test_other_connections_are_undisturbed_while_a_stream_hangs(scripted: Any) -> None:
    upstream, router = scripted
    sock, reader = start_stream(router)
    with sock:
        upstream.send(SSE_HEAD + chunk(b"data: 1\n\n"))
        assert reader.until(b"data: 1\n\n") is not None
        with router.connect() as other:
            other.sendall(request_bytes("GET", "/health"))
            assert SocketReader(other).until(b'"status":"ok"') is not None
