"""The framing oracle: the router answers only the requests a client's byte stream contains, in
order, and never one hidden in a body (RFC 9112 §6.3, §11.2).

Hypothesis writes streams of requests — no body, `Content-Length` and chunked bodies with
extensions, bodies over the router's cap, routed by path and by body, requests and chunk ends
hidden in body bytes, bytes that break HTTP after them — and sends each in random pieces, each
read by the router before the next is sent. h11, an HTTP/1.1 parser independent of the
router's, says which requests the stream holds. Every request carries its index in `X-Id`; the
upstream echoes it in `X-Echo`, so each answer can be matched to the request it answers.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import WAIT, WRITE_PATHS, FakeUpstream, Received, RunningRouter, router_on

from tests.support.wire import Reply, SocketReader, http_response, read_reply

CAP = 48  # the router's maxBodyBytes: small, so that bodies go over it
HIDDEN_HEAD = b"GET /route/m/hidden HTTP/1.1\r\nHost: h\r\nX-Id: hidden\r\n\r\n"
HIDDEN = [
    HIDDEN_HEAD,
    b"0\r\n\r\n" + HIDDEN_HEAD,  # the end of a chunked body, then a request
    b"\r\n0\r\n\r\n" + HIDDEN_HEAD,
    b"POST /route/m/hidden HTTP/1.1\r\nHost: h\r\nX-Id: hidden\r\nContent-Length: 2\r\n\r\n{}",
]
LAST = b"GET /health HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


def echo(request: Received, conn: socket.socket) -> bool:
    conn.sendall(http_response(headers={"X-Echo": request.headers.get("x-id", "")}))
    return True


@pytest.fixture(scope="module", params=list(WRITE_PATHS.values()), ids=list(WRITE_PATHS))
def oracle_router(request: pytest.FixtureRequest) -> Iterator[tuple[RunningRouter, FakeUpstream]]:
    upstream = FakeUpstream(echo)
    router = router_on(request.param)(
        {"maxBodyBytes": CAP, "maxConcurrentRequests": 0, "models": {"m": {"url": upstream.url}}}
    )
    yield router, upstream
    router.close()
    upstream.close()


@st.composite
def bodies(draw: st.DrawFn, index: int) -> bytes:
    kind = draw(st.sampled_from(["chat", "hidden", "bytes"]))
    if kind == "chat":
        pad = "x" * draw(st.integers(0, 2 * CAP))
        return json.dumps({"model": "m", "messages": [], "pad": pad}).encode()
    if kind == "hidden":
        filler = draw(st.binary(max_size=2 * CAP)).replace(b"\n", b".")
        return filler + draw(st.sampled_from(HIDDEN)) + draw(st.binary(max_size=24))
    return draw(st.binary(min_size=1, max_size=2 * CAP))


def chunked(body: bytes, cuts: list[int], extension: bytes) -> bytes:
    pieces, start = [], 0
    for cut in [*sorted(set(cuts)), len(body)]:
        if cut > start:
            pieces.append(b"%x%s\r\n%s\r\n" % (cut - start, extension, body[start:cut]))
            start = cut
    return b"".join(pieces) + b"0\r\n\r\n"


@st.composite
def messages(draw: st.DrawFn, index: int) -> bytes:
    target = draw(st.sampled_from(["/v1/chat/completions", "/route/m/v1/x", "/v1/models"]))
    headers = [b"Host: router.test", b"X-Id: %d" % index]
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "none":
        method = draw(st.sampled_from([b"GET", b"POST"]))
        body = b""
    else:
        method = b"POST"
        content = draw(bodies(index))
        if framing == "length":
            headers.append(b"Content-Length: %d" % len(content))
            body = content
        else:
            headers.append(b"Transfer-Encoding: chunked")
            cuts = draw(st.lists(st.integers(0, len(content)), max_size=3))
            extension = draw(st.sampled_from([b"", b";x=1", b';name="v"']))
            body = chunked(content, cuts, extension)
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n%s" % (
        method,
        target.encode(),
        b"\r\n".join(headers),
        body,
    )


@dataclass
class Stream:
    data: bytes
    cuts: list[int]  # where it is split into pieces, each read by the router on its own


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    count = draw(st.integers(1, 4))
    data = b"".join(draw(messages(index)) for index in range(count))
    if draw(st.booleans()):
        data += draw(st.sampled_from([b"\x00garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"]))
    data += LAST
    # Anywhere, and where an attacker would cut: right before a hidden piece, so that the
    # read before it ends inside the body that hides it.
    anywhere = st.integers(1, len(data) - 1)
    hidden_at = [at for piece in HIDDEN for at in occurrences(data, piece)]
    cut = st.one_of(anywhere, st.sampled_from(hidden_at)) if hidden_at else anywhere
    cuts = draw(st.lists(cut, max_size=5))
    return Stream(data, sorted(set(cuts) - {0}))


def occurrences(data: bytes, piece: bytes) -> list[int]:
    found, at = [], data.find(piece)
    while at >= 0:
        found.append(at)
        at = data.find(piece, at + 1)
    return found


def requests_in(data: bytes) -> list[str]:
    """The `X-Id` of each request h11 finds in the stream, in order (`last` for the final
    one), up to the end or the first byte that breaks HTTP."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    connection.receive_data(b"")
    found: list[str] = []
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            return found
        if isinstance(event, h11.Request):
            fields = {name.decode(): value.decode() for name, value in event.headers}
            found.append(fields.get("x-id", "last"))
        elif isinstance(event, h11.EndOfMessage):
            connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            connection.send(h11.EndOfMessage())
            if connection.our_state is h11.MUST_CLOSE:
                return found
            connection.start_next_cycle()
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return found


def send_in_pieces(router: RunningRouter, stream: Stream) -> list[Reply]:
    """Send the stream piece by piece, each read before the next; every answer until the
    router closes the connection."""
    start, lost = router.bytes_read, router.connections_lost
    with router.connect() as sock:
        sent = 0
        for cut in [*stream.cuts, len(stream.data)]:
            try:
                sock.sendall(stream.data[sent:cut])
            except OSError:
                break  # the router closed the connection: the rest is not for it
            sent = cut
            router.read_up_to(start + sent, lost_before=lost)
        reader = SocketReader(sock)
        answers = []
        while True:
            try:
                answers.append(read_reply(reader))
            except (EOFError, ConnectionResetError):
                return answers


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams())
def test_the_router_answers_only_the_requests_the_stream_holds(
    oracle_router: tuple[RunningRouter, FakeUpstream], stream: Stream
) -> None:
    router, upstream = oracle_router
    expected = requests_in(stream.data)
    answers = send_in_pieces(router, stream)
    reached = []
    while not upstream.received.empty():
        reached.append(upstream.received.get_nowait().headers.get("x-id", "?"))
    # At most one answer per request, and one more for bytes that break HTTP.
    assert len(answers) <= len(expected) + 1
    # Nothing hidden in a body reached the upstream, and what did came in order.
    assert "hidden" not in reached
    it = iter(expected)
    assert all(name in it for name in reached), (reached, expected)
    # Each answer the upstream gave answers the request in its place.
    for place, answer in enumerate(answers):
        if "x-echo" in answer.headers:
            assert place < len(expected) and answer.headers["x-echo"] == expected[place]
        assert answer.status != 200 or "x-echo" in answer.headers or place < len(expected)
    router.assert_idle()


def test_the_oracle_sees_a_hidden_request_as_body_bytes() -> None:
    """The reference itself, on the stream that once fooled the router."""
    body = b"y" * 20 + b"0\r\n\r\n" + HIDDEN_HEAD
    data = (
        b"POST /v1/chat HTTP/1.1\r\nHost: h\r\nX-Id: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(body, [], b"")
        + LAST
    )
    assert requests_in(data) == ["0", "last"]
    assert WAIT > 0
