"""Fault injection at every step of a forward: an upstream that closes or resets before the
request's head, inside it, inside the body, after it, inside the response's head or body; on a
fresh or a reused connection; with one replica or with a healthy second one; for a request that
may be sent twice (GET) and one that may not (POST).

After each: the client has an answer or a closed connection, never a hang; every slot and gauge
is back to 0; and no request reached an upstream more often than its method allows
(RFC 9110 §9.2.2).
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import closed_after_the_test
from support import WAIT, WRITE_PATHS, FakeUpstream, Received, chat, router_on

from tests.support.processes import refused_url
from tests.support.wire import SocketReader, http_response, read_reply, read_request, request_bytes

Factory = Callable[..., Any]


@pytest.fixture(params=list(WRITE_PATHS.values()), ids=list(WRITE_PATHS))
def router_factory(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Every case on both write paths: at once, and held to the end of the loop's pass."""
    yield from closed_after_the_test(router_on(request.param))


STEPS = (
    "before_head",  # as the request arrives, nothing of it read
    "mid_head",
    "mid_body",
    "after_body",  # the whole request read, no answer
    "mid_response_head",
    "mid_response_body",
)
X_ID = re.compile(rb"\r\nX-Id: (\S+)\r\n", re.I)


class FaultyUpstream:
    """Serves the first request on each connection when ``reused`` (so the router pools it),
    then fails the next one at ``step``, by closing or by a reset. Counts the request heads it
    read whole, by `X-Id`."""

    def __init__(self, step: str, reset: bool, reused: bool) -> None:
        self.step, self.reset, self.reused = step, reset, reused
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        reader = SocketReader(conn)
        try:
            if self.reused:
                request = read_request(reader)
                if request is None:
                    return conn.close()
                self._count(request[0])
                conn.sendall(http_response())
            self._fail(conn, reader)
        except OSError:
            pass
        finally:
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def _fail(self, conn: socket.socket, reader: SocketReader) -> None:
        step = self.step
        if step == "before_head":
            conn.recv(1, socket.MSG_PEEK)
            return
        if step == "mid_head":
            while len(reader.buffer) < 10 and reader._more():
                pass
            return
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return
        self._count(head)
        length = int(re.search(rb"content-length: (\d+)", head, re.I)[1]) if b"th: " in head else 0
        if step == "mid_body":
            reader.exactly(min(3, length))
            return
        reader.exactly(length)
        if step == "mid_response_head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        elif step == "mid_response_body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    def _count(self, head: bytes) -> None:
        found = X_ID.search(head)
        self.heads.append(found[1] if found else b"?")

    def close(self) -> None:
        self.listener.close()


def pinned_to_first(replicas: int) -> str:
    """An affinity value that maps to replica 0."""
    return next(f"c{i}" for i in itertools.count() if zlib.crc32(f"c{i}".encode()) % replicas == 0)


def request(method: str, number: int, conversation: str) -> bytes:
    headers = {"X-Id": str(number), "X-Conv": conversation}
    if method == "POST":
        return request_bytes("POST", "/v1/chat", chat("m"), headers)
    return request_bytes("GET", "/route/m/v1/x", None, headers)


CASES = [
    (step, reset, reused, replicas, method)
    for step, reset, reused, replicas, method in itertools.product(
        STEPS, (False, True), (False, True), (1, 2), ("POST", "GET")
    )
    if not (step == "mid_body" and method == "GET")  # a GET has no body to stop inside
]


@pytest.mark.parametrize(("step", "reset", "reused", "replicas", "method"), CASES)
def test_a_failing_upstream_costs_one_answer_and_nothing_more(
    router_factory: Factory,
    upstream: FakeUpstream,
    step: str,
    reset: bool,
    reused: bool,
    replicas: int,
    method: str,
) -> None:
    faulty, healthy = FaultyUpstream(step, reset, reused), upstream
    try:
        urls = [faulty.url, healthy.url][:replicas]
        model = {"urls": urls, "affinity": "header:x-conv"}
        router = router_factory({"models": {"m": model}})
        conversation = pinned_to_first(replicas)
        with router.connect() as sock:
            reader = SocketReader(sock)
            if reused:
                sock.sendall(request(method, 0, conversation))
                assert read_reply(reader, method).status == 200
            sock.sendall(request(method, 1, conversation))
            try:
                reply = read_reply(reader, method)
            except (EOFError, ConnectionResetError):
                reply = None  # a response cut off: closing the connection is the answer
        if reply is not None:
            assert reply.status in (200, 502)
        else:
            assert step == "mid_response_body"
        router.assert_idle()
        sent = faulty.heads.count(b"1") + sum(
            1 for received in drain(healthy) if received.headers.get("x-id") == "1"
        )
        assert sent <= (1 if method == "POST" else 2)
    finally:
        faulty.close()


def drain(upstream: FakeUpstream) -> list[Received]:
    found = []
    while not upstream.received.empty():
        found.append(upstream.received.get_nowait())
    return found


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_refused_connection_fails_over_or_is_a_502(
    router_factory: Factory, upstream: FakeUpstream, method: str, replicas: int
) -> None:
    urls = [refused_url(), upstream.url][:replicas]
    router = router_factory({"models": {"m": {"urls": urls, "affinity": "header:x-conv"}}})
    with router.connect() as sock:
        sock.sendall(request(method, 1, pinned_to_first(replicas)))
        reply = read_reply(SocketReader(sock), method)
    assert reply.status == (200 if replicas == 2 else 502)
    router.assert_idle()
