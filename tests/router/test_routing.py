"""Which answer each request gets: health, the models API, auth, body and path routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import FakeUpstream, RunningRouter, chat, exchange

Factory = Callable[..., Any]


@pytest.fixture
def models(upstream_factory: Factory) -> dict[str, FakeUpstream]:
    return {name: upstream_factory() for name in ("b-model", "a-model", "org/name", "hidden")}


def config_for(upstreams: dict[str, FakeUpstream], **extra: Any) -> dict[str, Any]:
    models = {name: {"url": upstream.url} for name, upstream in upstreams.items()}
    models["hidden"]["unlisted"] = True
    return {"models": models, **extra}


@pytest.fixture
def open_router(router_factory: Factory, models: dict[str, FakeUpstream]) -> RunningRouter:
    return router_factory(config_for(models))


@pytest.fixture
def auth_router(router_factory: Factory, models: dict[str, FakeUpstream]) -> RunningRouter:
    return router_factory(config_for(models, authTokens=["first", "second"]))


BEARER = {"Authorization": "Bearer second"}


def assert_error(reply: Any, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply.head
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_health_counts_listed_models_without_auth(auth_router: RunningRouter) -> None:
    reply = exchange(auth_router, "GET", "/health")
    assert reply.status == 200
    assert reply.json() == {"status": "ok", "models": 3}
    head = exchange(auth_router, "HEAD", "/health")
    assert (head.status, head.body, head.headers["content-length"]) == (
        200,
        b"",
        str(len(reply.body)),
    )


def test_health_rejects_other_methods(open_router: RunningRouter) -> None:
    reply = exchange(open_router, "POST", "/health", b"{}")
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD"


def test_models_list_sorted_without_unlisted(open_router: RunningRouter) -> None:
    body = exchange(open_router, "GET", "/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a-model", "b-model", "org/name"]
    assert {(m["object"], m["owned_by"]) for m in body["data"]} == {("model", "llmhop")}
    assert len({m["created"] for m in body["data"]}) == 1


@pytest.mark.parametrize(
    "path", ["/v1/models/org/name", "/v1/models/org%2Fname", "/v1/models/org%2fname"]
)
def test_retrieve_model_with_slash(open_router: RunningRouter, path: str) -> None:
    reply = exchange(open_router, "GET", path)
    assert reply.status == 200
    assert reply.json()["id"] == "org/name"


@pytest.mark.parametrize("name", ["nope", "hidden"])
def test_retrieve_unknown_or_unlisted_model(open_router: RunningRouter, name: str) -> None:
    error = assert_error(exchange(open_router, "GET", f"/v1/models/{name}"), 404, "model_not_found")
    assert error["message"] == f'unknown model "{name}"'


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/models/a-model", "/v1/chat/completions", "/route/a-model/x"]
)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong",
        "Bearer",
        "Basic second",
        "Bearer  second",
        "second",
        "Bearer secondx",
        "Bearer firs",
    ],
)
def test_auth_required_everywhere_but_health(
    auth_router: RunningRouter, path: str, authorization: str | None
) -> None:
    reply = exchange(
        auth_router,
        "POST" if "v1/models" not in path else "GET",
        path,
        chat("a-model"),
        {"Authorization": authorization},
    )
    assert_error(reply, 401, "invalid_api_key")
    assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(auth_router: RunningRouter, scheme: str) -> None:
    reply = exchange(auth_router, "GET", "/v1/models", headers={"Authorization": f"{scheme} first"})
    assert reply.status == 200


def test_auth_comes_before_model_lookup(auth_router: RunningRouter) -> None:
    assert exchange(auth_router, "POST", "/v1/chat/completions", chat("nope")).status == 401
    assert exchange(auth_router, "POST", "/route/nope/x", b"").status == 401
    assert exchange(auth_router, "POST", "/v1/chat/completions", chat("nope"), BEARER).status == 404


def test_body_routing_picks_the_model(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    for name in ("a-model", "org/name", "hidden"):
        body = chat(name)
        reply = exchange(open_router, "POST", "/v1/chat/completions", body)
        assert reply.status == 200
        received = models[name].next_request()
        assert received.request_line == "POST /v1/chat/completions HTTP/1.1"
        assert received.body == body


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json"),
        (b'{"model": "a-model"', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"{}", "missing_model"),
        (b'{"model": 123}', "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b'{"model": ""}', "missing_model"),
        (b'{"model": "a-model", "model": null}', "missing_model"),
        (b'{"options": {"model": "a-model"}}', "missing_model"),
        (b'["a-model"]', "missing_model"),
        (b"", "invalid_json"),
    ],
)
def test_body_routing_errors(open_router: RunningRouter, body: bytes, code: str) -> None:
    assert_error(exchange(open_router, "POST", "/v1/chat/completions", body), 400, code)


def test_last_duplicate_model_key_wins(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    body = b'{"model": null, "model": "b-model"}'
    assert exchange(open_router, "POST", "/v1/completions", body).status == 200
    assert models["b-model"].next_request().body == body


def test_unknown_model(open_router: RunningRouter) -> None:
    error = assert_error(
        exchange(open_router, "POST", "/v1/x", chat("nope")), 404, "model_not_found"
    )
    assert error["message"] == 'unknown model "nope"'
    assert error["type"] == "invalid_request_error"


def test_get_without_body_cannot_be_body_routed(open_router: RunningRouter) -> None:
    assert_error(exchange(open_router, "GET", "/v1/something"), 400, "invalid_json")


def test_path_routing_streams_any_body(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    reply = exchange(open_router, "POST", "/route/a-model/detect?x=1", b"\x00not json\xff")
    assert reply.status == 200
    received = models["a-model"].next_request()
    assert received.request_line == "POST /detect?x=1 HTTP/1.1"
    assert received.body == b"\x00not json\xff"


def test_path_routing_keeps_escapes_and_decodes_the_name(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    assert exchange(open_router, "GET", "/route/org%2Fname/v1/a%2Fb/c").status == 200
    assert models["org/name"].next_request().request_line == "GET /v1/a%2Fb/c HTTP/1.1"


def test_path_routing_without_rest_goes_to_the_root(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    assert exchange(open_router, "GET", "/route/a-model").status == 200
    assert models["a-model"].next_request().request_line == "GET / HTTP/1.1"


def test_path_routing_reaches_unlisted(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    assert exchange(open_router, "POST", "/route/hidden/detect", b"{}").status == 200
    assert models["hidden"].next_request().request_line == "POST /detect HTTP/1.1"


def test_path_routing_errors(open_router: RunningRouter) -> None:
    assert_error(exchange(open_router, "GET", "/route/nope/x"), 404, "model_not_found")
    assert_error(exchange(open_router, "GET", "/route//x"), 400, "missing_model")


def test_models_api_other_methods_are_body_routed(
    open_router: RunningRouter, models: dict[str, FakeUpstream]
) -> None:
    assert exchange(open_router, "POST", "/v1/models", chat("a-model")).status == 200
    assert models["a-model"].next_request().request_line == "POST /v1/models HTTP/1.1"


# Every spelling of a dot segment an upstream or a CDN might resolve: plain, percent-encoded in
# either case, half-encoded, and hidden behind encoded slashes or backslashes.
DOT_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    "%2e.",
    ".%2E",
    "%2e",
    "..%2f..",
    "..%2F%2e%2e",
    "..%5c..",
    "..\\..",
    "x\\..\\..",
]


@pytest.fixture
def tenant_router(router_factory: Factory, upstream: FakeUpstream) -> RunningRouter:
    """A model under a base path with the provider's key injected, as a hosted tenant is."""
    model = {"url": upstream.url + "/tenant-a/v1", "headers": {"Authorization": "Bearer key-a"}}
    return router_factory({"models": {"m": model}})


@pytest.mark.parametrize("dots", DOT_SEGMENTS)
@pytest.mark.parametrize("routing", ["path", "body"])
def test_dot_segments_never_reach_the_upstream(
    tenant_router: RunningRouter, upstream: FakeUpstream, dots: str, routing: str
) -> None:
    escape = f"/{dots}/{dots}/tenant-b/v1/chat/completions"
    path = "/route/m" + escape if routing == "path" else escape
    error = assert_error(exchange(tenant_router, "POST", path, chat("m")), 400, "invalid_path")
    assert '".."' in error["message"]
    # The next request is the first the upstream sees.
    assert exchange(tenant_router, "POST", "/route/m/chat/completions", chat("m")).status == 200
    assert upstream.next_request().request_line == ("POST /tenant-a/v1/chat/completions HTTP/1.1")


@pytest.mark.parametrize(
    "path",
    [
        "/models/qwen2.5-7b",
        "/files/.well-known",
        "/a..b/c...",
        "/x/%2e%2ex",
        "/v1/%2E...",
        "/v1/a%2Fb.c",
    ],
)
def test_dots_inside_segments_are_forwarded_as_sent(
    tenant_router: RunningRouter, upstream: FakeUpstream, path: str
) -> None:
    assert exchange(tenant_router, "POST", "/route/m" + path, chat("m")).status == 200
    assert upstream.next_request().request_line == f"POST /tenant-a/v1{path} HTTP/1.1"
    assert exchange(tenant_router, "POST", path, chat("m")).status == 200
    assert upstream.next_request().request_line == f"POST /tenant-a/v1{path} HTTP/1.1"
