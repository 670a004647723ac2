"""Several upstreams per model: the least busy first, failover before the first byte."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import FakeUpstream, HeldUpstream, Received, RunningRouter, chat, exchange, llmhop

from tests.support.processes import refused_url
from tests.support.router import RouterProcess
from tests.support.wire import SocketReader, http_response, read_reply, request_bytes

Factory = Callable[..., Any]


def served(upstream: FakeUpstream) -> int:
    """How many requests an upstream has received so far (and forget them)."""
    count = 0
    while not upstream.received.empty():
        upstream.received.get_nowait()
        count += 1
    return count


def samples(router: RunningRouter) -> dict[str, float]:
    text = exchange(router, "GET", "/metrics").body.decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(llmhop_replica_\w+\{[^}]*\}) (\S+)$", text, re.M)
    }


# --- the choice, without sockets --------------------------------------------------------------


def replicas(count: int) -> tuple[llmhop.Replica, ...]:
    urls = [f"http://127.0.0.1:{1000 + i}" for i in range(count)]
    text = json.dumps({"models": {"m": {"urls": urls}}})
    return llmhop.parse_config(text, llmhop.SecretResolver({})).models["m"].replicas


def state(
    replica: llmhop.Replica, in_flight: int = 0, retry_at: float = 0.0, failed_at: float = 0.0
) -> None:
    replica.state.in_flight = in_flight
    replica.state.retry_at = retry_at
    replica.state.failed_at = failed_at


def test_the_least_busy_replica_is_chosen_and_ties_rotate() -> None:
    a, b, c = all_three = replicas(3)
    state(a, in_flight=2)
    state(b, in_flight=1)
    state(c, in_flight=1)
    chosen = [llmhop.choose_replica(all_three, (), 10.0, None, turn) for turn in range(6)]
    assert {r.index for r in chosen} == {b.index, c.index}  # never the busier one
    assert llmhop.choose_replica(all_three, {b.index}, 10.0, None, 0) is c
    assert llmhop.choose_replica(all_three, {0, 1, 2}, 10.0, None, 0) is None


def test_backing_off_replicas_wait_unless_all_do() -> None:
    a, b, c = all_three = replicas(3)
    state(a, retry_at=20.0, failed_at=9.0)
    state(b, in_flight=5)
    state(c, retry_at=20.0, failed_at=8.0)
    assert llmhop.choose_replica(all_three, (), 10.0, None, 0) is b  # busy, but up
    assert llmhop.choose_replica(all_three, (), 10.0, a, 0) is b  # affinity yields too
    # All backing off: the one that failed longest ago is tried rather than none.
    assert llmhop.choose_replica(all_three, {b.index}, 10.0, None, 0) is c
    # Once its back-off is over, a replica is chosen again.
    assert llmhop.choose_replica(all_three, {b.index}, 20.0, None, 0) in (a, c)


def test_back_off_doubles_up_to_its_cap() -> None:
    (only,) = replicas(1)
    waits = []
    for now in range(8):
        llmhop.replica_failed(only.state, float(now))
        waits.append(only.state.retry_at - now)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert only.state.connect_failures == 8


def test_a_reload_keeps_what_is_known_of_each_kept_replica() -> None:
    def table(urls: list[str]) -> llmhop.RoutingTable:
        text = json.dumps({"models": {"m": {"urls": urls}}})
        return llmhop.RoutingTable(llmhop.parse_config(text, llmhop.SecretResolver({})))

    old = table(["http://a:1", "http://b:1"])
    old.models["m"].replicas[1].state.in_flight = 3
    new = table(["http://b:1", "http://c:1"])
    llmhop.carry_replica_states(old, new)
    kept, added = new.models["m"].replicas
    assert kept.state is old.models["m"].replicas[1].state and kept.state.in_flight == 3
    assert added.state.in_flight == 0


# --- through the router -----------------------------------------------------------------------


def test_requests_in_flight_spread_to_the_least_busy(
    router_factory: Factory, held_factory: Callable[[], HeldUpstream]
) -> None:
    held_pair = first, second = held_factory(), held_factory()
    router = router_factory({"models": {"m": {"urls": [first.url, second.url]}}})
    sockets = [router.connect() for _ in range(4)]
    try:
        for sock in sockets:
            sock.sendall(request_bytes("POST", "/v1/x", chat("m")))
        # Four requests, none answered yet: two at each replica.
        for upstream in held_pair:
            upstream.next_arrival()
            upstream.next_arrival()
        assert samples(router)['llmhop_replica_requests_in_flight{model="m",replica="0"}'] == 2
        for upstream in held_pair:
            upstream.release_all()
        assert all(read_reply(SocketReader(sock)).status == 200 for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    assert served(first) == served(second) == 2


def test_idle_replicas_take_turns(router_factory: Factory, upstream_factory: Factory) -> None:
    a, b = upstream_factory(), upstream_factory()
    router = router_factory({"models": {"m": {"urls": [a.url, b.url]}}})
    for _ in range(6):
        assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert served(a) == served(b) == 3


def test_a_refused_replica_is_skipped_then_left_out(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    up = upstream_factory()
    router = router_factory({"models": {"m": {"urls": [refused_url(), up.url]}}})
    for _ in range(4):
        assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    assert served(up) == 4
    figures = samples(router)
    # Tried once, then backing off: the other requests did not try it at all.
    assert figures['llmhop_replica_connect_failures_total{model="m",replica="0"}'] == 1
    assert figures['llmhop_replica_requests_total{model="m",replica="1"}'] == 4


def test_a_refused_replica_is_tried_again_after_its_back_off(
    router_factory: Factory, upstream_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llmhop, "BACKOFF_FIRST", 0.05)
    down = refused_url()
    up = upstream_factory()
    router = router_factory({"models": {"m": {"urls": [down, up.url]}}})
    assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
    port = int(down.rsplit(":", 1)[1])
    recovered = Responder(port)
    try:
        for _ in range(200):  # bounded: the back-off is 50 ms, each request a few
            assert exchange(router, "POST", "/v1/x", chat("m")).status == 200
            if recovered.answered.is_set():
                break
        else:
            raise AssertionError("the recovered replica never got a request")
    finally:
        recovered.close()


class Responder:
    """An upstream on a given port (the refused one, come back): answers 200 and counts."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.answered = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                reader = SocketReader(conn)
                if reader.until(b"\r\n\r\n") is not None:
                    reader.exactly(len(chat("m")))
                    conn.sendall(http_response())
                    self.answered.set()

    def close(self) -> None:
        self.listener.close()


def test_no_failover_once_the_request_went_out(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    def hang_up(request: Received, conn: socket.socket) -> bool:
        return False  # reads the request, then closes without an answer

    rude, polite = upstream_factory(hang_up), upstream_factory()
    model = {"urls": [rude.url, polite.url], "affinity": "header:x-conv"}
    router = router_factory({"models": {"m": model}})
    # Pinned to the rude replica by affinity: a value that maps there.
    value = next(v for v in (f"c{i}" for i in range(100)) if _replica_of(v, 2) == 0)
    reply = exchange(router, "POST", "/v1/x", chat("m"), {"X-Conv": value})
    assert (reply.status, reply.json()["error"]["code"]) == (502, "upstream_error")
    assert served(rude) == 1 and served(polite) == 0


def _replica_of(value: str, count: int) -> int:
    import zlib

    return zlib.crc32(value.encode()) % count


def test_all_replicas_down(tmp_path: Path) -> None:
    router = RouterProcess({"models": {"m": {"urls": [refused_url(), refused_url()]}}}, tmp_path)
    with router.connect() as sock:
        sock.sendall(request_bytes("POST", "/v1/x", chat("m")))
        reply = read_reply(SocketReader(sock))
    assert reply.status == 502
    error = reply.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "tried all 2 replicas" in error["message"]
    log = router.stop()
    assert re.search(r"access: .* status=502 .* tries=2$", log, re.M), log


def test_per_replica_headers_add_to_and_override_the_models(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    local, hosted = upstream_factory(), upstream_factory()
    router = router_factory(
        {
            "models": {
                "m": {
                    "headers": {"Authorization": "Bearer local-key", "X-Team": "lab"},
                    "affinity": "header:X-Conv",
                    "urls": [
                        local.url,
                        {"url": hosted.url + "/v1", "headers": {"authorization": "Bearer hosted"}},
                    ],
                }
            }
        }
    )
    for value in (f"c{i}" for i in range(20)):
        assert exchange(router, "POST", "/chat", chat("m"), {"X-Conv": value}).status == 200
    seen = []
    for upstream, key, path in (
        (local, "Bearer local-key", "/chat"),
        (hosted, "Bearer hosted", "/v1/chat"),
    ):
        while not upstream.received.empty():
            request = upstream.received.get_nowait()
            seen.append(upstream)
            assert request.headers["authorization"] == key
            assert request.headers["x-team"] == "lab"
            assert request.request_line == f"POST {path} HTTP/1.1"
    assert local in seen and hosted in seen


def test_affinity_keeps_a_conversation_on_one_replica(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    ups = [upstream_factory() for _ in range(3)]
    router = router_factory(
        {"models": {"m": {"urls": [u.url for u in ups], "affinity": "header:X-Conversation"}}}
    )
    for conversation in ("alpha", "beta", "gamma", "delta"):
        for _ in range(3):
            headers = {"X-Conversation": conversation}
            assert exchange(router, "POST", "/v1/x", chat("m"), headers).status == 200
        counts = [served(u) for u in ups]
        assert sorted(counts) == [0, 0, 3], (conversation, counts)
        assert counts.index(3) == _replica_of(conversation, 3)


def test_metrics_name_replicas_by_index_never_by_url(
    router_factory: Factory, upstream_factory: Factory
) -> None:
    secret_url = upstream_factory().url + "/tenant?key=secret-in-url"
    router = router_factory(
        {
            "models": {
                "m": {"urls": [secret_url, upstream_factory().url]},
                "one": {"url": secret_url},
            }
        }
    )
    exchange(router, "POST", "/v1/x", chat("m"))
    text = exchange(router, "GET", "/metrics").body.decode()
    assert 'llmhop_replica_requests_total{model="m",replica="1"}' in text
    assert 'model="one",replica' not in text  # a single upstream has no replica series
    assert "secret-in-url" not in text and "tenant" not in text


@pytest.mark.parametrize(
    ("model", "path", "message"),
    [
        ({"url": "http://a", "urls": ["http://b"]}, "models.m", "exactly one of url and urls"),
        ({"urls": []}, "models.m.urls", "at least one"),
        ({"urls": ["http://a", "ftp://b"]}, "models.m.urls[1]", "http"),
        ({"urls": ["http://a", 3]}, "models.m.urls[1]", "a URL or an object"),
        ({"urls": [{"headers": {}}]}, "models.m.urls[0].url", "is required"),
        ({"urls": [{"url": "http://a", "port": 1}]}, "models.m.urls[0].port", "unknown key"),
        (
            {"urls": [{"url": "http://a", "headers": {"Content-Length": "1"}}]},
            "models.m.urls[0].headers.Content-Length",
            "managed by the proxy",
        ),
        ({"url": "http://a", "affinity": "cookie:x"}, "models.m.affinity", "header:<header name>"),
    ],
)
def test_bad_replicas_are_refused_with_their_key_path(
    model: dict[str, Any], path: str, message: str
) -> None:
    text = json.dumps({"models": {"m": model}})
    with pytest.raises(llmhop.ConfigError) as caught:
        llmhop.parse_config(text, llmhop.SecretResolver({}))
    assert any(p == path and message in m for p, m in caught.value.problems), caught.value
