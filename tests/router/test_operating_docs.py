"""docs/operating.md's metrics table names every metric the router exports, and nothing else,
with the type and the labels the router gives it."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from typing import Any

from support import WAIT, FakeUpstream, HeldUpstream, RunningRouter, chat, exchange

from tests.support import REPO
from tests.support.wire import Reply, SocketReader, read_reply, request_bytes

DOC = REPO / "docs" / "operating.md"
TOKEN = "operator-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

Factory = Callable[..., Any]


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The metrics table of docs/operating.md: family -> (type, label names)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not re.fullmatch(r"`llmhop_\w+`", cells[0]):
            continue
        name, kind, labels = cells[0].strip("`"), cells[1], cells[2]
        assert name not in rows, f"{name} is in the table twice"
        rows[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return rows


def exported(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Each family the scrape declares -> (type, the label names its samples carry)."""
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
    labels: dict[str, set[str]] = {name: set() for name in types}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"(\w+)(?:\{(.*)\})? ", line)
        assert match, line
        sample = match[1]
        family = sample
        if sample not in types:  # a histogram's _bucket, _sum or _count
            family = re.sub(r"_(bucket|sum|count)$", "", sample)
            assert types.get(family) == "histogram", f"{sample} belongs to no declared family"
        labels[family] |= set(re.findall(r'(\w+)="', match[2] or "")) - {"le"}
    return {name: (types[name], frozenset(labels[name])) for name in types}


class Request:
    """A chat request with the operator's token, sent now, its answer read later."""

    def __init__(self, router: RunningRouter, model: str) -> None:
        self.sock = router.connect()
        self.sock.sendall(request_bytes("POST", "/v1/chat/completions", chat(model), HEADERS))

    def answer(self) -> Reply:
        with self.sock:
            return read_reply(SocketReader(self.sock))


def test_the_metrics_table_is_what_the_router_exports(
    router_factory: Factory,
    upstream_factory: Factory,
    held_factory: Callable[[], HeldUpstream],
) -> None:
    fast: FakeUpstream = upstream_factory()
    a, b = held_factory(), held_factory()
    closed = socket.create_server(("127.0.0.1", 0))
    down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    router: RunningRouter = router_factory(
        {
            "authTokens": [{"name": "ops", "token": TOKEN}],
            "models": {
                "a": {"url": a.url, "group": "gpu0"},
                "b": {"url": b.url, "group": "gpu0"},
                "r": {"urls": [fast.url, fast.url]},
                "down": {"url": down},
            },
        }
    )
    for model in ("r", "down"):
        exchange(router, "POST", "/v1/chat/completions", chat(model), HEADERS)

    def scrape() -> str:
        reply = exchange(router, "GET", "/metrics", headers=HEADERS)
        assert reply.status == 200
        return reply.body.decode()

    # A request for a held at its upstream and one for b queued behind it: a switch to come.
    holding = Request(router, "a")
    a.next_arrival()
    waiting = Request(router, "b")
    while_queued = ""
    for _ in range(int(WAIT / 0.01)):
        while_queued = scrape()
        if 'llmhop_queue_depth{group="gpu0",model="b"} 1' in while_queued:
            break
        threading.Event().wait(0.01)
    else:
        raise AssertionError("the request for b never queued")
    a.release_all()
    b.release_all()
    assert holding.answer().status == waiting.answer().status == 200
    after = scrape()
    assert 'llmhop_group_switches_total{group="gpu0"} 1' in after

    table = documented()
    families = exported(after)
    assert set(table) == set(families), (
        f"documented but not exported: {sorted(set(table) - set(families))}; "
        f"exported but not documented: {sorted(set(families) - set(table))}"
    )
    # The queue is empty again by now: its labels are those it had while b waited.
    families["llmhop_queue_depth"] = exported(while_queued)["llmhop_queue_depth"]
    for name, (kind, labels) in families.items():
        assert table[name][0] == kind, f"{name} is a {kind}, the table says {table[name][0]}"
        assert table[name][1] == labels, (
            f"{name} has the labels {sorted(labels)}, the table says {sorted(table[name][1])}"
        )
