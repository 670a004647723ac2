"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

from support import FakeUpstream, Received, RunningRouter, chat, exchange

from tests.support.wire import http_response

Factory = Callable[..., Any]


def samples(text: str) -> dict[str, float]:
    """Every sample line as ``name{labels}`` -> value; also checks the format is parseable."""
    result = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) \w+ .+", line), line
            continue
        match = re.fullmatch(r'(\w+(?:\{(?:\w+="[^"]*",?)*\})?) (\S+)', line)
        assert match, line
        result[match[1]] = float(match[2])
    return result


def test_metrics_count_requests_by_model_route_and_status(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    upstream = upstream_factory(lambda r, c: c.sendall(http_response(body=b"x" * 10)))
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    for _ in range(3):
        exchange(router, "POST", "/v1/x", chat("m"))
    exchange(router, "POST", "/route/m/y", b"abc")
    exchange(router, "POST", "/v1/x", chat("random-name-1"))
    exchange(router, "GET", "/health")
    reply = exchange(router, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = samples(reply.body.decode())
    assert metrics['llmhop_requests_total{model="m",route="body",status="200"}'] == 3
    assert metrics['llmhop_requests_total{model="m",route="path",status="200"}'] == 1
    # Unknown names from clients never become label values.
    assert metrics['llmhop_requests_total{model="-",route="body",status="404"}'] == 1
    assert not any("random-name-1" in name for name in metrics)
    assert metrics['llmhop_requests_total{model="-",route="health",status="200"}'] == 1
    assert metrics['llmhop_requests_in_flight{model="m"}'] == 0
    assert metrics['llmhop_request_duration_seconds_count{model="m"}'] == 4
    assert metrics['llmhop_request_duration_seconds_bucket{model="m",le="+Inf"}'] == 4
    assert metrics['llmhop_time_to_first_byte_seconds_count{model="m"}'] == 4
    assert metrics['llmhop_request_body_bytes_total{model="m"}'] == 3 * len(chat("m")) + 3
    assert metrics['llmhop_response_body_bytes_total{model="m"}'] == 40
    assert metrics["llmhop_upstream_connections_opened_total"] == 1
    assert metrics["llmhop_models"] == 1


def test_metrics_count_upstream_errors(router_factory: Factory) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    router = router_factory({"models": {"m": {"url": url}}})
    exchange(router, "POST", "/v1/x", chat("m"))
    metrics = samples(exchange(router, "GET", "/metrics").body.decode())
    assert metrics['llmhop_upstream_errors_total{model="m",kind="connect"}'] == 1
    assert metrics['llmhop_requests_total{model="m",route="body",status="502"}'] == 1


def test_upstream_error_statuses_are_not_counted_as_upstream_failures(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(http_response(502, b"{}"))
        return True

    router = router_factory({"models": {"m": {"url": upstream_factory(handler).url}}})
    exchange(router, "POST", "/v1/x", chat("m"))
    assert "llmhop_upstream_errors_total{" not in exchange(router, "GET", "/metrics").body.decode()


def test_metrics_need_a_token_when_auth_is_on(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    models = {"m": {"url": upstream.url}}
    guarded: RunningRouter = router_factory({"authTokens": ["t"], "models": models})
    refused = exchange(guarded, "GET", "/metrics")
    assert refused.status == 401
    assert "llmhop_" not in refused.body.decode()
    authorized = exchange(guarded, "GET", "/metrics", headers={"Authorization": "Bearer t"})
    assert authorized.status == 200
    # Without tokens there is nobody to tell apart: /metrics is open, like every route.
    assert exchange(router_factory({"models": models}), "GET", "/metrics").status == 200


def test_metrics_auth_false_opens_metrics_to_anonymous_scrapers(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    models = {"m": {"url": upstream.url}}
    scraped = router_factory({"authTokens": ["t"], "metricsAuth": False, "models": models})
    assert exchange(scraped, "GET", "/metrics").status == 200
    assert exchange(scraped, "GET", "/v1/models").status == 401


def test_unlisted_models_are_named_only_to_a_caller_with_a_token(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    models = {
        "open": {"url": upstream.url},
        "secret-tenant": {"url": upstream.url, "unlisted": True},
    }
    anonymous_ok = router_factory({"authTokens": ["t"], "metricsAuth": False, "models": models})
    no_auth = router_factory({"models": models})
    for router in (anonymous_ok, no_auth):
        token = {"Authorization": "Bearer t"} if router is anonymous_ok else {}
        for model in ("open", "secret-tenant"):
            assert exchange(router, "POST", "/v1/x", chat(model), token).status == 200
        anonymous = exchange(router, "GET", "/metrics").body.decode()
        assert "secret-tenant" not in anonymous
        assert 'llmhop_requests_total{model="open",route="body",status="200"} 1' in anonymous
        # The count is what /health tells anyone.
        assert samples(anonymous)["llmhop_models"] == 1
    shown = exchange(anonymous_ok, "GET", "/metrics", headers={"Authorization": "Bearer t"})
    text = shown.body.decode()
    assert 'llmhop_requests_total{model="secret-tenant",route="body",status="200"} 1' in text
    assert samples(text)["llmhop_models"] == 2
