"""The routing decision, from a request head and a routing table alone: no sockets."""

from __future__ import annotations

import json

import pytest
from support import llmhop

MODELS = {
    "m": {"url": "http://127.0.0.1:1/base"},
    "org/name": {"url": "http://127.0.0.1:2"},
    "hidden": {"url": "unix:///run/hidden.sock", "unlisted": True},
}


def table(**config: object) -> llmhop.RoutingTable:
    text = json.dumps({"models": MODELS, **config})
    return llmhop.RoutingTable(llmhop.parse_config(text, llmhop.SecretResolver({})), created=0)


OPEN = table()
GUARDED = table(authTokens=["secret"])
SCRAPED = table(authTokens=["secret"], metricsAuth=False)
SCOPED = table(authTokens=["secret", {"name": "ci", "token": "ci-token", "models": ["m", "h*"]}])
TOKEN = "Authorization: Bearer secret"
CI = "x-api-key: ci-token"


def decide(
    routing: llmhop.RoutingTable, method: str, target: str, *headers: str
) -> tuple[object, ...]:
    """The decision, as a tuple that reads well in a table."""
    head = "\r\n".join([f"{method} {target} HTTP/1.1", "Host: h", *headers]).encode()
    request = llmhop.parse_request_head(head)
    decision = llmhop.route(request, routing, routing.access_for(request))
    match decision:
        case llmhop.Answer(kind=kind, body=body):
            return ("answer", kind, json.loads(body))
        case llmhop.Scrape(models=shown, key=None):
            return ("metrics", None if shown is None else sorted(shown))
        case llmhop.Scrape(models=shown, key=key):
            return ("metrics", sorted(shown or ()), key)
        case llmhop.ByPath(model=model, target=forwarded):
            return ("path", model.name, forwarded)
        case llmhop.ByBody():
            return ("body",)
        case llmhop.Refusal(kind=kind, error=error, model=model):
            return ("refused", kind, error.status, error.code, model)
    raise AssertionError(decision)


HEALTH = {"status": "ok", "models": 2}
ALL_MODELS = ["m", "org/name"]

CASES = [
    # /health answers anyone, and only to reads.
    (OPEN, "GET", "/health", (), ("answer", "health", HEALTH)),
    (GUARDED, "HEAD", "/health", (), ("answer", "health", HEALTH)),
    (GUARDED, "POST", "/health", (), ("refused", "health", 405, "method_not_allowed", "-")),
    # /metrics: with auth on, a token is needed; without one it is opened only explicitly,
    # and then names only the listed models.
    (OPEN, "GET", "/metrics", (), ("metrics", ALL_MODELS)),
    (GUARDED, "GET", "/metrics", (), ("refused", "error", 401, "invalid_api_key", "-")),
    (GUARDED, "GET", "/metrics", (TOKEN,), ("metrics", None)),
    (SCRAPED, "GET", "/metrics", (), ("metrics", ALL_MODELS)),
    (SCRAPED, "GET", "/metrics", (TOKEN,), ("metrics", None)),
    # The token comes before any model lookup, so a stranger learns nothing of the models.
    (GUARDED, "GET", "/v1/models", (), ("refused", "error", 401, "invalid_api_key", "-")),
    (GUARDED, "POST", "/route/nope/x", (), ("refused", "error", 401, "invalid_api_key", "-")),
    (
        GUARDED,
        "POST",
        "/v1/chat",
        ("Authorization: Basic secret",),
        ("refused", "error", 401, "invalid_api_key", "-"),
    ),
    (GUARDED, "POST", "/v1/chat", ("Authorization: bearer secret",), ("body",)),
    # The models API: listed models only; ids with "/" encoded or not.
    (
        OPEN,
        "GET",
        "/v1/models/m",
        (),
        ("answer", "models", {"id": "m", "object": "model", "created": 0, "owned_by": "llmhop"}),
    ),
    (
        OPEN,
        "GET",
        "/v1/models/org%2Fname",
        (),
        (
            "answer",
            "models",
            {"id": "org/name", "object": "model", "created": 0, "owned_by": "llmhop"},
        ),
    ),
    (OPEN, "GET", "/v1/models/hidden", (), ("refused", "models", 404, "model_not_found", "-")),
    (OPEN, "POST", "/v1/models", (), ("body",)),
    # Path routing: the name percent-decoded, the rest and the query kept as sent.
    (OPEN, "POST", "/route/m/v1/chat?x=1", (), ("path", "m", b"/v1/chat?x=1")),
    (OPEN, "GET", "/route/org%2Fname/v1/a%2Fb", (), ("path", "org/name", b"/v1/a%2Fb")),
    (OPEN, "GET", "/route/m", (), ("path", "m", b"/")),
    (OPEN, "GET", "/route/hidden/x", (), ("path", "hidden", b"/x")),
    (OPEN, "GET", "/route//x", (), ("refused", "path", 400, "missing_model", "-")),
    (OPEN, "GET", "/route/nope/x", (), ("refused", "path", 404, "model_not_found", "nope")),
    (OPEN, "GET", "/route/nope/../x", (), ("refused", "path", 404, "model_not_found", "nope")),
    (OPEN, "GET", "/route/m/%2e%2e/x", (), ("refused", "path", 400, "invalid_path", "m")),
    # A scoped key: its models (unlisted ones by path too), and what an unknown model gets
    # for the others; its own metrics.
    (SCOPED, "POST", "/route/m/x", (CI,), ("path", "m", b"/x")),
    (SCOPED, "POST", "/route/hidden/x", (CI,), ("path", "hidden", b"/x")),
    (
        SCOPED,
        "POST",
        "/route/org%2Fname/x",
        (CI,),
        ("refused", "path", 404, "model_not_found", "org/name"),
    ),
    (
        SCOPED,
        "GET",
        "/v1/models/org%2Fname",
        (CI,),
        ("refused", "models", 404, "model_not_found", "-"),
    ),
    (
        SCOPED,
        "GET",
        "/v1/models",
        (CI,),
        (
            "answer",
            "models",
            {
                "object": "list",
                "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "llmhop"}],
            },
        ),
    ),
    (SCOPED, "GET", "/metrics", (CI,), ("metrics", ["hidden", "m"], "ci")),
    (SCOPED, "GET", "/metrics", (TOKEN,), ("metrics", None)),
    # Body routing for everything else, dot segments refused there too.
    (OPEN, "POST", "/v1/chat/completions", (), ("body",)),
    (OPEN, "POST", "http://h/v1/chat", (), ("body",)),
    (OPEN, "POST", "/v1/../admin", (), ("refused", "body", 400, "invalid_path", "-")),
]


@pytest.mark.parametrize(
    ("routing", "method", "target", "headers", "expected"),
    CASES,
    ids=[f"{i}-{method} {target}" for i, (_, method, target, _, _) in enumerate(CASES)],
)
def test_route(
    routing: llmhop.RoutingTable,
    method: str,
    target: str,
    headers: tuple[str, ...],
    expected: tuple[object, ...],
) -> None:
    assert decide(routing, method, target, *headers) == expected


def test_answers_are_prepared_with_the_table() -> None:
    """The router's own answers cost no work per request: the same object every time."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: h"
    request = llmhop.parse_request_head(head)
    access = OPEN.access_for(request)
    assert llmhop.route(request, OPEN, access) is OPEN.models_list


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        (b"/v1/chat/completions", False),
        (b"/v1/models/qwen2.5", False),
        (b"/a..b/.c/d.", False),
        (b"/%2e%2ex/x%2e", False),
        (b"/v1/..", True),
        (b"/./v1", True),
        (b"/v1/%2E%2e/x", True),
        (b"/v1/.%2e", True),
        (b"/v1/..%2F..", True),
        (b"/v1/a%5c..%5cb", True),
        (b"/v1/a\\..", True),
    ],
)
def test_dot_segments(path: bytes, dotted: bool) -> None:
    assert llmhop.has_dot_segment(path) is dotted


def test_a_table_is_freed_without_the_cycle_collector() -> None:
    """A reload drops the old table at once: nothing in a table refers back to itself, so a
    router reloaded often does not grow until the garbage collector runs."""
    import gc

    def keyed_table() -> llmhop.RoutingTable:
        return table(
            authTokens=["secret", {"name": "ci", "token": "t", "models": ["m"]}],
            models={"a": {"url": "http://127.0.0.1:1", "group": "g"}, **MODELS},
        )

    keyed_table()  # whatever is built once per process (compiled patterns) is built now
    gc.collect()
    gc.disable()
    try:
        built = keyed_table()
        del built
        assert gc.collect() == 0  # no cycle was left for the collector
    finally:
        gc.enable()
