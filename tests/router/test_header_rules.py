"""The proxy header rules: a request head rewritten for the upstream, a response head for the
client. Pure functions over parsed heads, tested without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import llmhop

CLIENT_IP = "10.0.0.7"


def replica(url: str = "http://up:9/base?k=v", **entry: object) -> llmhop.Replica:
    text = json.dumps({"models": {"m": {"url": url, **entry}}})
    (only,) = llmhop.parse_config(text, llmhop.SecretResolver({})).models["m"].replicas
    return only


def request(*lines: str, method: str = "POST", target: str = "/v1/x?q=1") -> llmhop.Request:
    head = "\r\n".join([f"{method} {target} HTTP/1.1", *lines]).encode()
    return llmhop.parse_request_head(head)


def upstream_head(
    req: llmhop.Request,
    to: llmhop.Replica | None = None,
    length: int = 0,
    client_ip: str | None = CLIENT_IP,
) -> list[str]:
    raw = llmhop.upstream_request_head(
        req, to or replica(), req.target, length, client_ip, b"rid-1"
    )
    assert raw.endswith(b"\r\n\r\n")
    return raw[:-4].decode().split("\r\n")


FORWARDING = [
    "Forwarded: for=10.0.0.7;host=client.test;proto=http",
    "X-Forwarded-For: 10.0.0.7",
    "X-Forwarded-Host: client.test",
    "X-Forwarded-Proto: http",
    "X-Request-Id: rid-1",
]


@pytest.mark.parametrize(
    ("req", "length", "expected"),
    [
        # The request line gains the base path and the upstream's query before the client's;
        # Host is the upstream's own.
        (
            request("Host: client.test", "Accept: */*"),
            0,
            [
                "POST /base/v1/x?k=v&q=1 HTTP/1.1",
                "Host: up:9",
                "Accept: */*",
                *FORWARDING,
                "Content-Length: 0",
            ],
        ),
        # Hop-by-hop fields go, and those Connection names; what the client claims in the
        # forwarding fields and its request id are replaced.
        (
            request(
                "Host: client.test",
                "Connection: keep-alive, X-Hop",
                "X-Hop: 1",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Proxy-Authorization: Basic x",
                "Forwarded: for=6.6.6.6;proto=https",
                "X-Forwarded-For: 6.6.6.6",
                "X-Request-Id: client-id",
                "Content-Length: 5",
            ),
            5,
            ["POST /base/v1/x?k=v&q=1 HTTP/1.1", "Host: up:9", *FORWARDING, "Content-Length: 5"],
        ),
        # Chunked stays chunked; a GET without a body declares none.
        (
            request("Host: client.test", "Transfer-Encoding: chunked"),
            llmhop.CHUNKED,
            [
                "POST /base/v1/x?k=v&q=1 HTTP/1.1",
                "Host: up:9",
                *FORWARDING,
                "Transfer-Encoding: chunked",
            ],
        ),
        (
            request("Host: client.test", method="GET"),
            0,
            ["GET /base/v1/x?k=v&q=1 HTTP/1.1", "Host: up:9", *FORWARDING],
        ),
        # An upgrade asked for is passed on with its own Connection.
        (
            request("Host: client.test", "Connection: Upgrade", "Upgrade: websocket", method="GET"),
            0,
            [
                "GET /base/v1/x?k=v&q=1 HTTP/1.1",
                "Host: up:9",
                *FORWARDING,
                "Connection: Upgrade",
                "Upgrade: websocket",
            ],
        ),
    ],
)
def test_upstream_request_head(req: llmhop.Request, length: int, expected: list[str]) -> None:
    assert upstream_head(req, length=length) == expected


def test_model_headers_replace_the_clients_and_a_configured_host_wins() -> None:
    provider = replica(
        "https://api.example/v1",
        headers={"Authorization": "Bearer k", "Host": "vhost.example", "X-Org": "o"},
    )
    lines = upstream_head(
        request("Host: client.test", "authorization: Bearer client", "x-org: client"), provider
    )
    assert lines[:2] == ["POST /v1/v1/x?q=1 HTTP/1.1", "Host: vhost.example"]
    assert "Authorization: Bearer k" in lines and "X-Org: o" in lines
    assert "authorization: Bearer client" not in lines and "x-org: client" not in lines


def test_a_unix_socket_client_has_no_address_to_forward() -> None:
    lines = upstream_head(request("Host: client.test"), client_ip=llmhop.client_ip(""))
    assert "Forwarded: host=client.test;proto=http" in lines
    assert not any(line.startswith("X-Forwarded-For") for line in lines)


_CLIENTS = [llmhop.client_ip(("10.0.0.7", 1)), llmhop.client_ip(("::1", 2)), llmhop.client_ip("")]
_HOSTS = ["client.test", "other.test:8080", None]


@given(st.lists(st.tuples(st.sampled_from(_CLIENTS), st.sampled_from(_HOSTS)), max_size=12))
def test_the_forwarding_fields_are_each_requests_own(
    requests: list[tuple[str | None, str | None]],
) -> None:
    """They are built once per client and Host, and kept: whatever came before, a request's
    lines name its own client and Host."""
    for client, host in requests:
        # Without a Host, an HTTP/1.0 request: HTTP/1.1 requires one.
        req = request(f"Host: {host}") if host else llmhop.parse_request_head(b"GET / HTTP/1.0")
        forwarded = llmhop.forwarded_value(client, host.encode() if host else None)
        expected = [
            f"Forwarded: {forwarded.decode()}",
            *([f"X-Forwarded-For: {client}"] if client else []),
            *([f"X-Forwarded-Host: {host}"] if host else []),
            "X-Forwarded-Proto: http",
        ]
        lines = upstream_head(req, client_ip=client)
        start = lines.index(expected[0])
        assert lines[start : start + len(expected)] == expected


def response(*lines: str, status: str = "200 OK", method: bytes = b"GET") -> llmhop.Response:
    head = "\r\n".join([f"HTTP/1.1 {status}", *lines]).encode()
    return llmhop.parse_response_head(head, method)


@pytest.mark.parametrize(
    ("resp", "keep_alive", "dechunk", "expected"),
    [
        (
            response("Content-Type: text/plain", "Content-Length: 2"),
            True,
            False,
            [
                "HTTP/1.1 200 OK",
                "Content-Type: text/plain",
                "X-Request-Id: rid-1",
                "Content-Length: 2",
            ],
        ),
        # The upstream's own request id is kept; hop-by-hop fields and those its Connection
        # names go; the router says whether the connection closes.
        (
            response(
                "Connection: X-Up",
                "X-Up: 1",
                "Keep-Alive: timeout=5",
                "X-Request-Id: theirs",
                "Transfer-Encoding: chunked",
            ),
            False,
            False,
            [
                "HTTP/1.1 200 OK",
                "X-Request-Id: theirs",
                "Transfer-Encoding: chunked",
                "Connection: close",
            ],
        ),
        # For an HTTP/1.0 client the content goes out bare, ended by the close.
        (
            response("Transfer-Encoding: chunked"),
            False,
            True,
            ["HTTP/1.1 200 OK", "X-Request-Id: rid-1", "Connection: close"],
        ),
        # HEAD and 304 answers keep the length of the body they would have had.
        (
            response("Content-Length: 42", method=b"HEAD"),
            True,
            False,
            ["HTTP/1.1 200 OK", "X-Request-Id: rid-1", "Content-Length: 42"],
        ),
        (
            response("Content-Length: 42, 42", status="304 Not Modified"),
            True,
            False,
            ["HTTP/1.1 304 Not Modified", "X-Request-Id: rid-1", "Content-Length: 42"],
        ),
    ],
)
def test_client_response_head(
    resp: llmhop.Response, keep_alive: bool, dechunk: bool, expected: list[str]
) -> None:
    raw = llmhop.client_response_head(resp, b"rid-1", keep_alive, dechunk)
    assert raw.endswith(b"\r\n\r\n")
    assert raw[:-4].decode().split("\r\n") == expected


def test_switching_protocols_head_is_the_upstreams() -> None:
    resp = response(
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Accept: x",
        status="101 Switching Protocols",
    )
    assert llmhop.switching_protocols_head(resp) == (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: x\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("client_ip", "host", "value"),
    [
        ("10.0.0.7", b"router", b"for=10.0.0.7;host=router;proto=http"),
        ("::1", b"[::1]:8080", b'for="[::1]";host="[::1]:8080";proto=http'),
        (None, b'odd"host\\', b'host="odd\\"host\\\\";proto=http'),
        (None, None, b"proto=http"),
    ],
)
def test_forwarded_value(client_ip: str | None, host: bytes | None, value: bytes) -> None:
    assert llmhop.forwarded_value(client_ip, host) == value
