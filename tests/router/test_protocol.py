"""The HTTP/1.1 rules on bytes, without any I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import llmhop

ProtocolError = llmhop.ProtocolError


def parse(head: bytes) -> llmhop.Request:
    return llmhop.parse_request_head(head)


def status_of(head: bytes) -> int:
    with pytest.raises(ProtocolError) as caught:
        parse(head)
    return caught.value.status


def test_simple_request() -> None:
    request = parse(b"POST /v1/x?y=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-A:  v v \t")
    assert (request.method, request.target, request.http_minor) == (b"POST", b"/v1/x?y=1", 1)
    assert request.headers == [(b"Host", b"h"), (b"Content-Length", b"5"), (b"X-A", b"v v")]
    assert request.length == 5
    assert request.keep_alive
    assert not request.expect_continue


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET / HTTP/2.0\r\nHost: a", 505),
        (b"GET / HTTP/1.2\r\nHost: a", 505),
        (b"GET / FTP/1.1\r\nHost: a", 400),
        (b"GET /\r\nHost: a", 400),
        (b"GET  / HTTP/1.1\r\nHost: a", 400),
        (b"G(T / HTTP/1.1\r\nHost: a", 400),
        (b"GET /a\x00b HTTP/1.1\r\nHost: a", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded", 400),
        (b"GET / HTTP/1.1\r\nHost : a", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked", 501),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic", 417),
        (b"GET / HTTP/1.1\r\nHost: a" + b"\r\nX: y" * 256, 431),
    ],
)
def test_rejections(head: bytes, status: int) -> None:
    assert status_of(head) == status


def test_identical_repeated_content_lengths_are_one_length() -> None:
    assert (
        parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 7").length == 7
    )
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7").length == 7


def test_connection_semantics() -> None:
    assert not parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close").keep_alive
    assert not parse(b"GET / HTTP/1.0").keep_alive
    upgrade = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: ws")
    assert upgrade.upgrade == b"ws"
    assert parse(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: ws").upgrade is None


def test_expect_continue_only_for_http_1_1() -> None:
    assert parse(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue").expect_continue
    assert not parse(b"POST / HTTP/1.0\r\nExpect: 100-continue").expect_continue


def test_absolute_form_target() -> None:
    assert llmhop.split_target(b"http://h:1/v1/x?q") == (b"/v1/x", b"?q")
    assert llmhop.split_target(b"https://h") == (b"/", b"")
    with pytest.raises(ProtocolError):
        llmhop.split_target(b"*")


@pytest.mark.parametrize(
    ("upstream", "client", "expected"),
    [
        ("", b"", b""),
        ("", b"?a=1", b"?a=1"),
        ("k=1", b"", b"?k=1"),
        ("k=1", b"?", b"?k=1"),
        ("backend=1", b"?valid=1&semi=one;two", b"?backend=1&valid=1&semi=one;two"),
    ],
)
def test_join_query(upstream: str, client: bytes, expected: bytes) -> None:
    assert llmhop.join_query(upstream, client) == expected


@pytest.mark.parametrize(
    ("head", "method", "length", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"GET", 3, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"GET", llmhop.CHUNKED, True),
        (b"HTTP/1.1 200 OK", b"GET", llmhop.UNTIL_CLOSE, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"HEAD", 0, True),
        (b"HTTP/1.1 204 No Content", b"GET", 0, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", b"GET", 0, True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3", b"GET", 3, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close", b"GET", 3, False),
    ],
)
def test_response_framing(head: bytes, method: bytes, length: int, keep_alive: bool) -> None:
    response = llmhop.parse_response_head(head, method)
    assert (response.length, response.keep_alive) == (length, keep_alive)


def test_response_reason_may_be_empty() -> None:
    assert llmhop.parse_response_head(b"HTTP/1.1 200 \r\nContent-Length: 0", b"GET").reason == b""
    assert llmhop.parse_response_head(b"HTTP/1.1 200\r\nContent-Length: 0", b"GET").reason == b""


def feed_all(decoder: llmhop.ChunkedDecoder, data: bytes, step: int) -> tuple[int, bytes]:
    payload: list[bytes] = []
    consumed = 0
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        end = decoder.feed(piece, payload)
        consumed += end
        if decoder.done:
            break
    return consumed, b"".join(payload)


CHUNKED_BODY = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer-A: 1\r\n\r\n"


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(CHUNKED_BODY)])
def test_chunked_decoder_any_split(step: int) -> None:
    decoder = llmhop.ChunkedDecoder()
    consumed, payload = feed_all(decoder, CHUNKED_BODY + b"NEXT", step)
    assert decoder.done
    assert consumed == len(CHUNKED_BODY)
    assert payload == b"hello world"
    assert decoder.size == 11
    assert decoder.trailer_fields == 1


@pytest.mark.parametrize(
    "body",
    [
        b"z\r\n",
        b"\r\n",
        b"5\nhello\r\n",
        b"2\r\nabc\r\n",
        b"1;\x01\r\na\r\n",
        b"11111111111111111\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"1" * 9000,
    ],
)
def test_chunked_decoder_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        llmhop.ChunkedDecoder().feed(body)


def test_error_body_is_openai_shaped() -> None:
    import json

    body = json.loads(llmhop.error_body(404, 'unknown model "x"', "model_not_found"))
    assert body == {
        "error": {
            "message": 'unknown model "x"',
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


_OWS = st.sampled_from([b"", b" ", b"\t", b"  "])
_ELEMENT = st.sampled_from([b"", b"close", b"Keep-Alive", b"UPGRADE", b"te", b"x-custom"])


@given(
    st.lists(
        st.lists(st.tuples(_OWS, _ELEMENT, _OWS), min_size=1, max_size=3),
        min_size=1,
        max_size=3,
    )
)
def test_header_tokens_are_every_fields_comma_separated_elements(
    fields: list[list[tuple[bytes, bytes, bytes]]],
) -> None:
    # Whatever shortcut header_tokens takes for one field of one element, it answers what
    # splitting every field's value on commas answers (RFC 9110 §5.6.1).
    values = [b",".join(b"".join(element) for element in field) for field in fields]
    block = b"".join(b"Connection: %s\r\n" % value for value in values)
    headers = llmhop.parse_fields(block)
    elements = [
        element.strip(b" \t").lower()
        for value in headers.values(b"connection")
        for element in value.split(b",")
    ]
    assert llmhop.header_tokens(headers, b"connection") == [e for e in elements if e]
