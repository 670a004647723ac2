"""Ten thousand malformed requests against a running router, which must then still serve."""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import WAIT, FakeUpstream, chat

from tests.support.router import RouterProcess
from tests.support.wire import SocketReader, chunk, read_reply, request_bytes

REQUESTS = 10_000
SEED = 20261125

STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")
# Everything the router itself may answer, plus what the fake upstream answers.
ALLOWED_STATUSES = {100, 200, 400, 401, 404, 405, 413, 417, 431, 501, 502, 503, 505}

SEEDS = [
    request_bytes("GET", "/health"),
    request_bytes("GET", "/v1/models", None, {"Authorization": "Bearer t"}),
    request_bytes("GET", "/v1/models/m", None, {"Authorization": "Bearer t"}),
    request_bytes("POST", "/v1/chat/completions", chat("m"), {"Authorization": "Bearer t"}),
    request_bytes("POST", "/route/m/v1/x?a=b", b"raw body", {"Authorization": "Bearer t"}),
    request_bytes(
        "POST",
        "/v1/completions",
        None,
        {"Authorization": "Bearer t", "Transfer-Encoding": "chunked"},
    )
    + chunk(chat("m"))
    + b"0\r\n\r\n",
    request_bytes("POST", "/v1/x", b"{}", {"Expect": "100-continue", "Authorization": "Bearer t"}),
]
NASTY = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b":",
    b" ",
    b"\t",
    b"\x7f",
    b"\xff",
    b"%",
    b"/",
    b"\r\n\r\n",
]
HEADERS = [
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Host: second\r\n",
    b" folded\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close, Host\r\n",
    b"Upgrade: x\r\nConnection: upgrade\r\n",
    b"X: " + b"v" * 70_000 + b"\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random corruption of a request, at a random place."""
    position = rng.randrange(len(data) + 1)
    choice = rng.randrange(8)
    if choice == 0:  # flip one byte
        if not data:
            return b"\x00"
        index = rng.randrange(len(data))
        return data[:index] + bytes([rng.randrange(256)]) + data[index + 1 :]
    if choice == 1:  # insert a troublesome byte sequence
        return data[:position] + rng.choice(NASTY) + data[position:]
    if choice == 2:  # cut short
        return data[:position]
    if choice == 3:  # delete a span
        return data[:position] + data[position + rng.randrange(1, 40) :]
    if choice == 4:  # repeat a span
        span = data[position : position + rng.randrange(1, 40)]
        return data[:position] + span * rng.randrange(2, 50) + data[position:]
    if choice == 5:  # add a hostile header right after the request line
        line_end = data.find(b"\r\n") + 2
        return data[:line_end] + rng.choice(HEADERS) + data[line_end:]
    if choice == 6:  # random bytes
        return rng.randbytes(rng.randrange(1, 300))
    # several at once
    for _ in range(rng.randrange(2, 5)):
        data = mutate(rng, data)
    return data


def generate(count: int) -> list[bytes]:
    rng = random.Random(SEED)
    return [mutate(rng, rng.choice(SEEDS)) for _ in range(count)]


def throw(address: tuple[str, int], data: bytes) -> bytes:
    """Send, half-close, and collect the answer until the router closes the connection."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the router may close first, having seen enough to refuse
        received = b""
        try:
            while chunk_ := sock.recv(65536):
                received += chunk_
        except ConnectionResetError:
            pass
        return received


def answered_statuses(answer: bytes) -> list[int]:
    return [int(m[1]) for m in STATUS_LINE.finditer(answer)]


def test_malformed_requests_never_break_the_router(
    tmp_path: Path, upstream_factory: Callable[..., FakeUpstream]
) -> None:
    upstream = upstream_factory()
    router = RouterProcess(
        {"authTokens": ["t"], "maxBodyBytes": 4096, "models": {"m": {"url": upstream.url}}},
        tmp_path,
    )
    try:
        requests = generate(REQUESTS)
        assert len(set(requests)) > REQUESTS * 0.7  # the generator really varies its output
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda data: throw(router.address, data), requests))
        statuses: dict[int, int] = {}
        for data, answer in zip(requests, answers, strict=True):
            if answer:
                assert STATUS_LINE.match(answer), (data[:200], answer[:200])
            for status in answered_statuses(answer):
                assert status in ALLOWED_STATUSES, (data[:200], answer[:300])
                statuses[status] = statuses.get(status, 0) + 1
        # The mix covers both refusals and requests that made it through.
        assert statuses.get(400, 0) > REQUESTS // 10
        assert statuses.get(200, 0) > 100

        # Afterwards the router still serves a normal request end to end.
        with router.connect() as sock:
            reader = SocketReader(sock)
            sock.sendall(request_bytes("POST", "/v1/x", chat("m"), {"Authorization": "Bearer t"}))
            assert read_reply(reader).body == b'{"ok":true}'
            sock.sendall(request_bytes("GET", "/health"))
            assert read_reply(reader).json()["status"] == "ok"
    finally:
        log = router.stop()
    assert router.process.returncode == 0
    assert "internal error" not in log
    assert "Traceback" not in log
