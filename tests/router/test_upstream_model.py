"""`upstreamModel`: a route's name is the client's, the provider gets its own. In a body-routed
JSON request the top-level `"model"` string is replaced, that string only, every other byte as
the client sent it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import FakeUpstream, chat, exchange, llmhop

from tests.support.wire import chunk, request_bytes

Factory = Callable[..., Any]

UPSTREAM = "gpt-4o"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "m", "x", "mödel"]), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A JSON object with a top-level string "model" somewhere among other keys (nested
    objects may have a "model" of their own), written with any spacing and escaping."""
    others = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k != "model"), json_values))
    entries = list(others.items())
    entries.insert(draw(st.integers(0, len(entries))), ("model", draw(st.text(max_size=12))))
    document = dict(entries)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n ", " :\t")]))
    text = json.dumps(
        document,
        separators=separators,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 2])),
    )
    return text.encode(), document


@settings(max_examples=300, deadline=None)
@given(documents())
def test_exactly_the_top_level_model_string_is_replaced(
    written: tuple[bytes, dict[str, Any]],
) -> None:
    raw, document = written
    body = llmhop.BufferedBody(raw, raw, chunked=False)
    replaced = llmhop.with_upstream_model(body, json.dumps(UPSTREAM).encode())
    assert json.loads(replaced.payload) == {**document, "model": UPSTREAM}
    start, end = llmhop.top_level_string_span(raw, "model")
    assert replaced.payload == raw[:start] + b'"gpt-4o"' + raw[end:]
    assert replaced.raw == replaced.payload and not replaced.chunked


def test_the_last_of_repeated_model_keys_is_the_one_json_reads() -> None:
    raw = b'{"model": "a", "nested": {"model": "b"}, "model": "c"}'
    start, end = llmhop.top_level_string_span(raw, "model")
    assert raw[start:end] == b'"c"'


@pytest.fixture
def hosted(router_factory: Factory, upstream: FakeUpstream) -> tuple[Any, FakeUpstream]:
    model = {"url": upstream.url, "upstreamModel": UPSTREAM}
    return router_factory({"models": {"openai-gpt-4o": model}}), upstream


def test_a_body_routed_request_reaches_the_upstream_with_its_name(
    hosted: tuple[Any, FakeUpstream],
) -> None:
    router, upstream = hosted
    sent = chat("openai-gpt-4o", temperature=0.5)
    assert exchange(router, "POST", "/v1/chat/completions", sent).status == 200
    received = upstream.next_request()
    assert received.body == sent.replace(b'"openai-gpt-4o"', b'"gpt-4o"')
    assert received.headers["content-length"] == str(len(received.body))


def test_a_chunked_body_goes_on_with_a_length(hosted: tuple[Any, FakeUpstream]) -> None:
    router, upstream = hosted
    sent = chat("openai-gpt-4o")
    head = request_bytes("POST", "/v1/chat", None, {"Transfer-Encoding": "chunked"})
    with router.connect() as sock:
        sock.sendall(head + chunk(sent[:10]) + chunk(sent[10:]) + b"0\r\n\r\n")
        received = upstream.next_request()
    assert "transfer-encoding" not in received.headers
    assert json.loads(received.body)["model"] == UPSTREAM


def test_a_body_over_the_parsing_threshold_is_rewritten_too(
    hosted: tuple[Any, FakeUpstream],
) -> None:
    router, upstream = hosted
    long_text = "x" * (llmhop.LONG_BODY + 10)
    sent = json.dumps({"messages": [{"content": long_text}], "model": "openai-gpt-4o"}).encode()
    assert exchange(router, "POST", "/v1/chat/completions", sent).status == 200
    assert upstream.next_request().body == sent.replace(b'"openai-gpt-4o"', b'"gpt-4o"')


def test_path_routed_requests_and_the_models_list_keep_the_route_name(
    hosted: tuple[Any, FakeUpstream],
) -> None:
    router, upstream = hosted
    sent = chat("openai-gpt-4o")
    assert exchange(router, "POST", "/route/openai-gpt-4o/v1/chat", sent).status == 200
    assert upstream.next_request().body == sent
    listed = exchange(router, "GET", "/v1/models").json()
    assert [entry["id"] for entry in listed["data"]] == ["openai-gpt-4o"]


def test_without_upstream_model_bodies_stay_verbatim(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    sent = chat("m")
    assert exchange(router, "POST", "/v1/chat", sent).status == 200
    assert upstream.next_request().body == sent
