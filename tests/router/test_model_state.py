"""Each model's state as the router sees it, where it shows (/status, the models API, the
metrics), who may see it, and the router's own time on every forwarded response."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import WAIT, FakeUpstream, HeldUpstream, Received, RunningRouter, chat, exchange

from tests.support.processes import refused_url, wait_until
from tests.support.wire import SocketReader, http_response, read_reply, request_bytes

Factory = Callable[..., Any]


def status(router: RunningRouter, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    reply = exchange(router, "GET", "/status", None, headers)
    assert reply.status == 200, reply.body
    return reply.json()


def states(router: RunningRouter) -> dict[str, str]:
    return {name: entry["status"] for name, entry in status(router)["models"].items()}


def loading_then_ready() -> Callable[[Received, socket.socket], bool]:
    """An upstream that answers 503 (loading its weights) once, then 200."""
    answered = []

    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(http_response(503 if not answered else 200))
        answered.append(True)
        return True

    return handler


def grouped(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> tuple[RunningRouter, HeldUpstream, HeldUpstream]:
    """Models a and b of one group, on upstreams that answer when the test lets them."""
    a, b = held_factory(), held_factory()
    group = {"group": "gpu0"}
    router = router_factory(
        {"models": {"a": {"url": a.url, **group}, "b": {"url": b.url, **group}}}
    )
    return router, a, b


@contextlib.contextmanager
def b_behind_a(router: RunningRouter, a: HeldUpstream) -> Iterator[tuple[Any, Any]]:
    """A request for a, held at its upstream, and one for b sent after it, which queues."""
    with router.connect() as holding, router.connect() as waiting:
        holding.sendall(request_bytes("POST", "/v1/chat", chat("a")))
        a.next_arrival()
        waiting.sendall(request_bytes("POST", "/v1/chat", chat("b")))
        yield holding, waiting


# --- transitions ------------------------------------------------------------------------------


def test_a_model_is_unknown_then_loading_then_ready(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    upstream = upstream_factory(loading_then_ready())
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    assert states(router) == {"m": "unknown"}
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 503
    assert states(router) == {"m": "loading"}
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 200
    assert states(router) == {"m": "ready"}


def test_a_model_whose_replicas_all_back_off_is_unavailable(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    router = router_factory({"models": {"down": {"urls": [refused_url(), refused_url()]}}})
    assert exchange(router, "POST", "/v1/chat", chat("down")).status == 502
    entry = status(router)["models"]["down"]
    assert entry["status"] == "unavailable"
    assert [r["status"] for r in entry["replicas"]] == ["unavailable", "unavailable"]


def test_one_replica_answering_makes_the_model_ready(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    up = upstream_factory()
    router = router_factory({"models": {"m": {"urls": [refused_url(), up.url]}}})
    for _ in range(2):  # replicas take turns: each is tried
        assert exchange(router, "POST", "/v1/chat", chat("m")).status == 200
    entry = status(router)["models"]["m"]
    assert entry["status"] == "ready"
    assert [r["status"] for r in entry["replicas"]] == ["unavailable", "ready"]


def test_a_group_switch_makes_the_model_left_idle_and_the_new_one_loading(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    router, a, b = grouped(router_factory, held_factory)
    assert states(router) == {"a": "unknown", "b": "unknown"}
    a.release_all()
    assert exchange(router, "POST", "/v1/chat", chat("a")).status == 200
    assert states(router) == {"a": "ready", "b": "idle"}
    with router.connect() as sock:
        sock.sendall(request_bytes("POST", "/v1/chat", chat("b")))
        b.next_arrival()  # the group switched to b, which has not answered yet
        assert states(router) == {"a": "idle", "b": "loading"}
        entry = status(router)["models"]["b"]
        assert (entry["in_flight"], entry["replicas"][0]["in_flight"]) == (1, 1)
        b.allow()
        assert read_reply(SocketReader(sock)).status == 200
    assert states(router) == {"a": "idle", "b": "ready"}


def test_status_counts_the_queue_apart(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    router, a, b = grouped(router_factory, held_factory)
    with b_behind_a(router, a) as (holding, waiting):
        for _ in range(int(WAIT / 0.01)):
            if status(router)["models"]["b"]["queued"] == 1:
                break
            threading.Event().wait(0.01)
        document = status(router)
        assert document["models"]["a"]["in_flight"] == 1
        assert document["models"]["b"] | {"replicas": None} == {
            "status": "idle",
            "in_flight": 0,
            "queued": 1,
            "group": "gpu0",
            "replicas": None,
        }
        assert document["groups"] == {"gpu0": {"active": "a", "queued": 1}}
        a.release_all()
        b.release_all()
        assert read_reply(SocketReader(holding)).status == 200
        assert read_reply(SocketReader(waiting)).status == 200


# --- where it shows, and to whom -------------------------------------------------------------


def test_the_models_api_carries_each_models_state(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}, "n": {"url": upstream.url}}})
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 200
    listed = exchange(router, "GET", "/v1/models").json()
    assert {entry["id"]: entry["llmhop"]["status"] for entry in listed["data"]} == {
        "m": "ready",
        "n": "unknown",
    }
    one = exchange(router, "GET", "/v1/models/m").json()
    assert (one["id"], one["object"], one["llmhop"]) == ("m", "model", {"status": "ready"})


def test_the_metrics_have_each_models_state(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    assert exchange(router, "POST", "/v1/chat", chat("m")).status == 200
    text = exchange(router, "GET", "/metrics").body.decode()
    found = dict(re.findall(r'^llmhop_model_status\{model="m",status="(\w+)"\} (\d)$', text, re.M))
    assert found == {"ready": "1", "loading": "0", "idle": "0", "unavailable": "0", "unknown": "0"}


ADMIN, SCOPED = "admin-token-0123456789", "scoped-token-0123456789"


@pytest.fixture
def keyed(router_factory: Factory, held_factory: Callable[[], HeldUpstream]) -> RunningRouter:
    secret, public = held_factory(), held_factory()
    secret.release_all()
    public.release_all()
    return router_factory(
        {
            "authTokens": [ADMIN, {"name": "scoped", "token": SCOPED, "models": ["public"]}],
            "models": {
                "secret": {"url": secret.url, "group": "gpu0"},
                "public": {"url": public.url, "group": "gpu0"},
                "hidden": {"url": public.url, "unlisted": True},
            },
        }
    )


def test_status_needs_a_key_when_keys_are_set(keyed: RunningRouter) -> None:
    assert exchange(keyed, "GET", "/status").status == 401
    assert exchange(keyed, "GET", "/status", None, {"Authorization": "Bearer x"}).status == 401


def test_a_full_key_sees_every_model_and_the_active_one(keyed: RunningRouter) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert exchange(keyed, "POST", "/v1/chat", chat("secret"), headers).status == 200
    document = status(keyed, ADMIN)
    assert sorted(document["models"]) == ["hidden", "public", "secret"]
    assert document["groups"] == {"gpu0": {"active": "secret", "queued": 0}}
    assert document["version"] and document["uptime_s"] >= 0


def test_a_scoped_key_sees_its_models_and_never_the_one_it_may_not(keyed: RunningRouter) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert exchange(keyed, "POST", "/v1/chat", chat("secret"), headers).status == 200
    document = status(keyed, SCOPED)
    assert sorted(document["models"]) == ["public"]
    assert document["models"]["public"]["status"] == "idle"
    assert document["groups"] == {"gpu0": {"active": None, "queued": 0}}
    assert (
        "secret"
        not in exchange(
            keyed, "GET", "/status", None, {"Authorization": f"Bearer {SCOPED}"}
        ).body.decode()
    )


def test_anonymous_status_with_metrics_opened_names_listed_models_only(
    router_factory: Factory, upstream: FakeUpstream
) -> None:
    router = router_factory(
        {
            "authTokens": [ADMIN],
            "metricsAuth": False,
            "models": {
                "m": {"url": upstream.url},
                "hidden": {"url": upstream.url, "unlisted": True},
            },
        }
    )
    assert sorted(status(router)["models"]) == ["m"]


def test_the_page_is_one_offline_document(router_factory: Factory, upstream: FakeUpstream) -> None:
    router = router_factory({"authTokens": [ADMIN], "models": {"m": {"url": upstream.url}}})
    reply = exchange(router, "GET", "/ui")  # no key: the page holds no data
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert "<script>" in page and "<style>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched elsewhere


# --- Server-Timing ----------------------------------------------------------------------------

TIMING = re.compile(r"^queue;dur=([\d.]+), connect;dur=([\d.]+), upstream;dur=([\d.]+)$")


def timings(reply: Any) -> tuple[float, float, float]:
    match = TIMING.match(reply.headers["server-timing"])
    assert match, reply.headers["server-timing"]
    queued, connect, upstream = map(float, match.groups())
    return queued, connect, upstream


def test_server_timing_tells_connect_and_upstream_time(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def slow(request: Received, conn: socket.socket) -> bool:
        threading.Event().wait(0.2)
        conn.sendall(http_response())
        return True

    upstream = upstream_factory(slow)
    router = router_factory({"models": {"m": {"url": upstream.url}}})
    with router.connect() as sock:
        reader = SocketReader(sock)
        sock.sendall(request_bytes("POST", "/v1/chat", chat("m")))
        queued, connect, waited = timings(read_reply(reader))
        assert queued == 0 and connect > 0 and waited >= 200
        sock.sendall(request_bytes("POST", "/v1/chat", chat("m")))
        queued, connect, waited = timings(read_reply(reader))
        assert connect == 0 and waited >= 200  # the pooled connection


def test_server_timing_tells_the_time_queued(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    router, a, b = grouped(router_factory, held_factory)
    with b_behind_a(router, a) as (holding, waiting):
        threading.Event().wait(0.15)  # the time b spends in the queue, which it must report
        a.release_all()
        b.release_all()
        assert read_reply(SocketReader(holding)).status == 200
        queued, _, _ = timings(read_reply(SocketReader(waiting)))
    assert queued >= 100  # at least most of the wait, however late b reached the queue


def test_server_timing_can_be_turned_off(router_factory: Factory, upstream: FakeUpstream) -> None:
    router = router_factory({"serverTiming": False, "models": {"m": {"url": upstream.url}}})
    reply = exchange(router, "POST", "/v1/chat", chat("m"))
    assert reply.status == 200 and "server-timing" not in reply.headers


# --- probes -----------------------------------------------------------------------------------


def test_a_probe_tells_the_state_before_any_request(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    upstream = upstream_factory(loading_then_ready())
    model = {"url": upstream.url, "healthPath": "/health", "healthInterval": 0.05}
    router = router_factory({"models": {"m": model}})
    wait_until(lambda: states(router) == {"m": "loading"}, WAIT, "the first probe (503)")
    wait_until(lambda: states(router) == {"m": "ready"}, WAIT, "the next probe (200)")
    probe = upstream.next_request()
    assert probe.request_line == "GET /health HTTP/1.0"  # never a completion
    assert probe.body == b""


def test_a_probe_that_cannot_connect_makes_the_model_unavailable(router_factory: Factory) -> None:
    model = {"url": refused_url(), "healthPath": "/health", "healthInterval": 0.05}
    router = router_factory({"models": {"m": model}})
    wait_until(lambda: states(router) == {"m": "unavailable"}, WAIT, "a refused probe")
    (replica,) = router.router.table.models["m"].replicas
    assert replica.state.connect_failures >= 1


# --- the upstreams' own metrics ---------------------------------------------------------------

UPSTREAM_METRICS = (
    "# HELP llamacpp:requests_processing Requests processing.\n"
    "# TYPE llamacpp:requests_processing gauge\n"
    "llamacpp:requests_processing 2\n"
    "# TYPE llamacpp:tokens_total counter\n"
    'llamacpp:tokens_total{kind="prompt"} 7\n'
)


def metrics_upstream(request: Received, conn: socket.socket) -> bool:
    body = UPSTREAM_METRICS.encode() if "/metrics" in request.request_line else b"{}"
    conn.sendall(http_response(body=body, headers={"Content-Type": "text/plain"}))
    return True


def test_a_scrape_merges_each_upstreams_metrics_with_its_model(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    one, two = upstream_factory(metrics_upstream), upstream_factory(metrics_upstream)
    models = {
        "a": {"url": one.url, "metricsPath": "/metrics"},
        "b": {"urls": [one.url, two.url], "metricsPath": "/metrics"},
    }
    router = router_factory({"models": models})
    for name in ("a", "b", "b"):
        assert exchange(router, "POST", "/v1/chat", chat(name)).status == 200
    text = exchange(router, "GET", "/metrics").body.decode()
    assert text.count("# TYPE llamacpp:requests_processing gauge") == 1  # one family
    assert 'llamacpp:requests_processing{model="a"} 2' in text
    assert 'llamacpp:requests_processing{model="b",replica="0"} 2' in text
    assert 'llamacpp:requests_processing{model="b",replica="1"} 2' in text
    assert 'llamacpp:tokens_total{model="a",kind="prompt"} 7' in text
    samples = [line for line in text.splitlines() if line.startswith("llamacpp:")]
    block = text[text.index("# HELP llamacpp:requests_processing") :]
    assert all(sample in block for sample in samples)  # a family's samples together


def test_an_idle_model_is_not_asked_and_a_slow_one_fails_no_scrape(
    router_factory: Factory, upstream_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    a, b = upstream_factory(metrics_upstream), upstream_factory(metrics_upstream)
    silent = held_factory()  # answers nothing in time
    group = {"group": "gpu0", "metricsPath": "/metrics"}
    models = {
        "a": {"url": a.url, **group},
        "b": {"url": b.url, **group},
        "slow": {"url": silent.url, "metricsPath": "/metrics"},
    }
    router = router_factory({"models": models})
    assert exchange(router, "POST", "/v1/chat", chat("a")).status == 200
    assert exchange(router, "POST", "/v1/chat", chat("b")).status == 200  # a is idle now
    router.router.table.models["slow"].replicas[0].state.seen = "ready"
    while not b.received.empty():
        b.received.get_nowait()
    a_seen = a.received.qsize()
    reply = exchange(router, "GET", "/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    assert 'llamacpp:requests_processing{model="b"} 2' in text
    assert 'llamacpp:requests_processing{model="a"' not in text
    assert 'llamacpp:requests_processing{model="slow"' not in text
    assert a.received.qsize() == a_seen  # the idle model was not woken
    assert "llmhop_requests_total" in text
