"""A request body the router stops reading before its end is skipped by its own framing, or the
connection closes after the answer: body bytes are never taken for a request (RFC 9112 §6.3,
§11.2). Each test hides a request inside a body and checks it is never answered."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from support import WAIT, RunningRouter, chat

from tests.support.wire import Reply, SocketReader, read_reply, request_bytes

Factory = Callable[..., Any]

HIDDEN = b"GET /health HTTP/1.1\r\nHost: hidden\r\n\r\n"


def replies(sock: socket.socket) -> list[Reply]:
    """Every response the router sends until it closes the connection."""
    reader = SocketReader(sock)
    answers = []
    while True:
        try:
            answers.append(read_reply(reader))
        except EOFError:
            return answers


def answers_after(router: RunningRouter, first: bytes, rest: bytes) -> list[Reply]:
    """Send ``first``, let the router read it, send ``rest``, half-close: every response."""
    with router.connect() as sock:
        sock.sendall(first)
        router.read_up_to(len(first))
        sock.sendall(rest)
        sock.shutdown(socket.SHUT_WR)
        return replies(sock)


def statuses(answers: list[Reply]) -> list[int]:
    return [answer.status for answer in answers]


def test_a_chunked_body_over_the_cap_hides_no_request(router_factory: Factory) -> None:
    router = router_factory({"maxBodyBytes": 16, "models": {"m": {"url": "http://127.0.0.1:9"}}})
    head = request_bytes("POST", "/v1/chat", None, {"Transfer-Encoding": "chunked"})
    # One chunk of 0x40 bytes: the first read ends inside it, over the cap; the rest of the
    # chunk carries what would be the body's end and a request after it.
    inside = b"0\r\n\r\n" + HIDDEN
    chunk_data = b"y" * 20 + inside
    chunk_data += b"z" * (0x40 - len(chunk_data))
    first = head + b"40\r\n" + chunk_data[:20]
    rest = chunk_data[20:] + b"\r\n0\r\n\r\n" + request_bytes("GET", "/v1/models")
    answers = answers_after(router, first, rest)
    assert statuses(answers)[0] == 413
    assert not any(b'"status":"ok"' in answer.body for answer in answers)
    # The body was skipped to its end: the request after it may be served, nothing else.
    assert statuses(answers)[1:] in ([], [200])


class PartialUpstream:
    """An upstream that reads a request head and a few bytes of its body, then closes."""

    def __init__(self, body_bytes: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.received = b""
        self.body_bytes = body_bytes
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(WAIT)
            while (end := self.received.find(b"\r\n\r\n")) < 0 or len(
                self.received
            ) < end + 4 + self.body_bytes:
                self.received += conn.recv(65536)
        self.closed.set()

    def close(self) -> None:
        self.listener.close()


def test_an_upstream_that_stops_reading_a_body_leaves_no_request_in_it(
    router_factory: Factory,
) -> None:
    upstream = PartialUpstream(body_bytes=5)
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    body = b"0123456789" + HIDDEN + b"." * 40
    first = request_bytes("POST", "/route/m/v1/x", None, {"Content-Length": str(len(body))})
    first += body[:10]
    try:
        with router.connect() as sock:
            sock.sendall(first)
            assert upstream.closed.wait(WAIT)
            router.settle()
            sock.sendall(body[10:] + request_bytes("GET", "/v1/models"))
            sock.shutdown(socket.SHUT_WR)
            answers = replies(sock)
    finally:
        upstream.close()
    assert statuses(answers)[0] == 502
    assert not any(b'"status":"ok"' in answer.body for answer in answers)
    assert statuses(answers)[1:] in ([], [200])
    if answers[0].headers.get("connection") != "close":
        assert statuses(answers) == [502, 200]


def test_a_body_for_a_refused_request_is_skipped_whole(router_factory: Factory) -> None:
    """The declared length says where the next request starts, even when it comes late."""
    router = router_factory({"maxBodyBytes": 16, "models": {"m": {"url": "http://127.0.0.1:9"}}})
    body = chat("m") + HIDDEN
    head = request_bytes("POST", "/v1/chat", None, {"Content-Length": str(len(body))})
    answers = answers_after(router, head + body[:8], body[8:] + request_bytes("GET", "/v1/models"))
    assert statuses(answers) in ([413], [413, 200])
    assert not any(b'"status":"ok"' in answer.body for answer in answers)
