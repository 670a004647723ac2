"""What exactly reaches the upstream, and what exactly comes back."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import WAIT, FakeUpstream, Received, RunningRouter, chat, exchange, respond_with

from tests.support.wire import SocketReader, chunk, http_response, read_reply, request_bytes

Factory = Callable[..., Any]


def test_request_reaches_upstream_byte_for_byte(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url + "/base?backend=1"}}})
    body = b'{"model":"m",  "messages":[],"x":"\\u00e9\xc3\xa9"}'
    with router.connect() as sock:
        sock.sendall(
            b"POST /v1/chat/completions?valid=1&semi=one;two HTTP/1.1\r\n"
            b"Host: router.test:8080\r\n"
            b"User-Agent: OpenAI/Python 1.0\r\n"
            b"X-Custom:   padded  \r\n"
            b"x-lower: kept\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        assert read_reply(SocketReader(sock)).status == 200
    received = upstream.next_request()
    port = upstream.url.rsplit(":", 1)[1]
    request_id = received.headers["x-request-id"]
    assert received.head == (
        b"POST /base/v1/chat/completions?backend=1&valid=1&semi=one;two HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + port.encode() + b"\r\n"
        b"User-Agent: OpenAI/Python 1.0\r\n"
        b"X-Custom: padded\r\n"
        b"x-lower: kept\r\n"
        b"Content-Type: application/json\r\n"
        b'Forwarded: for=127.0.0.1;host="router.test:8080";proto=http\r\n'
        b"X-Forwarded-For: 127.0.0.1\r\n"
        b"X-Forwarded-Host: router.test:8080\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Request-Id: " + request_id.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert received.body == body


def test_hop_by_hop_and_forwarded_headers_are_replaced(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "dropped",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic x",
        "Proxy-Connection": "keep-alive",
        "Forwarded": "for=6.6.6.6;proto=https;host=bank.example",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil",
        "X-Forwarded-Proto": "https",
        "Authorization": "Bearer client-token",
    }
    assert exchange(router, "POST", "/v1/x", chat("m"), headers).status == 200
    received = upstream.next_request().headers
    for name in (
        "connection",
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert name not in received
    assert received["forwarded"] == "for=127.0.0.1;host=router.test;proto=http"
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-host"] == "router.test"
    assert received["x-forwarded-proto"] == "http"
    # Auth is off: the client's Authorization is the upstream's business.
    assert received["authorization"] == "Bearer client-token"


def test_model_headers_win_after_hop_by_hop_removal(
    router_factory: Factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    (tmp_path / "upstream-key").write_text("upstream-secret\n")
    router = router_factory(
        {
            "authTokens": ["${env:CLIENT_TOKEN}"],
            "models": {
                "m": {
                    "url": upstream.url,
                    "headers": {
                        "authorization": "Bearer ${cred:upstream-key}",
                        "X-Injected": "yes",
                        "Host": "vhost.example",
                    },
                }
            },
        },
        environ={"CLIENT_TOKEN": "client-secret", "CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    headers = {
        "Authorization": "Bearer client-secret",
        "X-INJECTED": "client value",
        "Connection": "x-injected",
    }
    assert exchange(router, "POST", "/v1/x", chat("m"), headers).status == 200
    received = upstream.next_request()
    assert received.headers["authorization"] == "Bearer upstream-secret"
    assert received.headers["x-injected"] == "yes"
    assert received.headers["host"] == "vhost.example"
    assert b"client-secret" not in received.head


def test_model_header_replaces_the_clients_whatever_the_case(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory(
        {"models": {"m": {"url": upstream.url, "headers": {"Authorization": "Bearer k"}}}}
    )
    headers = {"authorization": "Bearer client", "Content-Type": "application/json"}
    assert exchange(router, "POST", "/v1/x", chat("m"), headers).status == 200
    lines = upstream.next_request().header_lines
    assert [line for line in lines if line.lower().startswith(b"authorization")] == [
        b"Authorization: Bearer k"
    ]


def test_client_authorization_is_stripped_when_auth_is_on(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"authTokens": ["t"], "models": {"m": {"url": upstream.url}}})
    assert exchange(router, "POST", "/v1/x", chat("m"), {"Authorization": "Bearer t"}).status == 200
    assert "authorization" not in upstream.next_request().headers


def test_request_id_is_passed_through_or_generated(
    router: RunningRouter, upstream: FakeUpstream
) -> None:
    reply = exchange(router, "POST", "/v1/x", chat("m"), {"X-Request-Id": "client-id-1"})
    assert reply.headers["x-request-id"] == "client-id-1"
    assert upstream.next_request().headers["x-request-id"] == "client-id-1"
    reply = exchange(router, "POST", "/v1/x", chat("m"), {"X-Request-Id": "bad id with spaces"})
    generated = upstream.next_request().headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", generated)
    assert reply.headers["x-request-id"] == generated


def test_chunked_request_body_and_trailers_pass_through(
    router: RunningRouter, upstream: FakeUpstream
) -> None:
    body = chat("m")
    wire = chunk(body[:7]) + chunk(body[7:]) + b"0\r\nX-Checksum: abc\r\n\r\n"
    reply = exchange(
        router, "POST", "/v1/x", wire, {"Transfer-Encoding": "chunked", "Content-Length": None}
    )
    assert reply.status == 200
    received = upstream.next_request()
    assert received.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in received.headers
    assert received.body == wire


def test_chunked_path_routed_body_streams_before_it_ends(
    router: RunningRouter, upstream_factory: Factory
) -> None:
    """The upstream sees the first chunk while the client still holds back the rest."""
    first_chunk_seen = threading.Event()

    def handler(conn: socket.socket) -> None:
        reader = SocketReader(conn)
        reader.until(b"\r\n\r\n")
        assert reader.until(b"hello\r\n") is not None
        first_chunk_seen.set()
        reader.until(b"0\r\n\r\n")
        conn.sendall(http_response())

    streaming = RawUpstream(handler)
    router.call(_add_model(router, "s", streaming.url))
    with router.connect() as sock:
        sock.sendall(
            request_bytes("POST", "/route/s/upload", None, {"Transfer-Encoding": "chunked"})
        )
        sock.sendall(chunk(b"hello"))
        assert first_chunk_seen.wait(WAIT)
        sock.sendall(b"0\r\n\r\n")
        assert read_reply(SocketReader(sock)).status == 200


def test_expect_100_continue(router: RunningRouter, upstream: FakeUpstream) -> None:
    body = chat("m")
    with router.connect() as sock:
        sock.sendall(
            request_bytes(
                "POST", "/v1/x", None, {"Content-Length": str(len(body)), "Expect": "100-continue"}
            )
        )
        reader = SocketReader(sock)
        assert reader.until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_reply(reader).status == 200
    received = upstream.next_request()
    assert "expect" not in received.headers
    assert received.body == body


def test_keep_alive_and_pipelining_to_clients(
    router: RunningRouter, upstream: FakeUpstream
) -> None:
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("POST", "/v1/a", chat("m")))
        assert read_reply(reader).status == 200
        sock.sendall(request_bytes("POST", "/v1/b", chat("m")) + request_bytes("GET", "/health"))
        assert read_reply(reader).status == 200
        assert read_reply(reader).json()["status"] == "ok"
    paths = [upstream.next_request().request_line for _ in range(2)]
    assert paths == ["POST /v1/a HTTP/1.1", "POST /v1/b HTTP/1.1"]


def test_upstream_connections_are_reused(router: RunningRouter, upstream: FakeUpstream) -> None:
    for _ in range(20):
        assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert upstream.connections == 1
    assert {upstream.next_request().connection_number for _ in range(20)} == {1}


def test_connection_close_from_upstream_is_not_reused(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    upstream = upstream_factory(respond_with(http_response(headers={"Connection": "close"})))
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    for _ in range(3):
        assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert upstream.connections == 3


def test_unix_socket_upstream(
    router_factory: Factory, upstream_factory: Factory, tmp_path: Path
) -> None:
    upstream = upstream_factory(unix_path=str(tmp_path / "http.sock"))
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    for _ in range(3):
        assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    received = upstream.next_request()
    assert received.headers["host"] == "localhost"
    assert upstream.connections == 1


def test_upstream_errors_pass_through_untouched(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    body = b'{"error": {"message": "context too long"}}'
    response = http_response(400, body, {"X-Upstream": "1"}, reason="Bad Request")
    upstream = upstream_factory(respond_with(response))
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    reply = exchange(router, "POST", "/v1/x", chat("m"))
    assert (reply.status, reply.body, reply.headers["x-upstream"]) == (400, body, "1")
    assert reply.head.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_head_request_gets_upstream_length_without_body(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        return True

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("HEAD", "/route/m/file"))
        reply = read_reply(reader, "HEAD")
        assert reply.headers["content-length"] == "1234"
        sock.sendall(request_bytes("GET", "/health"))  # the connection stays in sync
        assert read_reply(reader).status == 200


def test_response_without_length_is_relayed_until_close(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        return False

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    reply = exchange(router, "GET", "/route/m/x")
    assert reply.body == b"until the end"
    assert reply.headers["connection"] == "close"


def test_http_1_0_client_gets_chunked_response_dechunked(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(chunk(b"one ") + chunk(b"two") + b"0\r\n\r\n")
        return True

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    with router.connect() as sock:
        sock.sendall(b"GET /route/m/x HTTP/1.0\r\n\r\n")
        raw = SocketReader(sock).rest()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"one two"


def test_upgrade_is_tunnelled(router: RunningRouter, upstream_factory: Factory) -> None:
    def handler(conn: socket.socket) -> None:
        reader = SocketReader(conn)
        head = reader.until(b"\r\n\r\n")
        assert head is not None and b"Upgrade: echo" in head and b"Connection: Upgrade" in head
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
        )
        while data := reader.buffer or conn.recv(1024):
            reader.buffer = b""
            conn.sendall(data.upper())

    echo = RawUpstream(handler)
    router.call(_add_model(router, "echo", echo.url))
    with router.connect() as sock:
        sock.sendall(
            request_bytes(
                "GET", "/route/echo/ws", None, {"Connection": "Upgrade", "Upgrade": "echo"}
            )
        )
        reader = SocketReader(sock)
        head = reader.until(b"\r\n\r\n")
        assert head is not None and head.startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"ping")
        assert reader.exactly(4) == b"PING"


class RawUpstream:
    """An upstream whose single connection a test drives by hand."""

    def __init__(self, handler: Callable[[socket.socket], None]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.error: BaseException | None = None

        def serve() -> None:
            conn, _ = self.listener.accept()
            with conn:
                try:
                    handler(conn)
                except BaseException as exc:  # surfaced by the test's own assertions
                    self.error = exc

        threading.Thread(target=serve, daemon=True).start()


async def _add_model(router: RunningRouter, name: str, url: str) -> None:
    """Swap in a table with one more model, as a reload does."""
    from support import llmhop

    table = router.router.table
    models = dict(table.config.models)
    models[name] = llmhop.parse_config(
        f'{{"models": {{"{name}": {{"url": "{url}"}}}}}}', llmhop.SecretResolver({})
    ).models[name]
    config = llmhop.Config(**{**_fields(table.config), "models": models})
    router.router.table = llmhop.RoutingTable(config)


def _fields(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__slots__}


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(router_factory: Factory, upstream_factory: Factory, status: int) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 %d X\r\n\r\n" % status)
        return True

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("GET", "/route/m/x"))
        assert read_reply(reader).status == status
        sock.sendall(request_bytes("GET", "/health"))
        assert read_reply(reader).status == 200


def test_http_1_0_client_gets_an_empty_chunked_response(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        return True

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    with router.connect() as sock:
        sock.sendall(b"GET /route/m/x HTTP/1.0\r\n\r\n")
        raw = SocketReader(sock).rest()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\n")
