"""Test doubles and clients for the router tests: a scripted upstream, the router in this
process, and the requests the tests send through it. Raw HTTP (tests.support.wire) and the
router as a process (tests.support.router) are imported from where they are defined.

The fake upstream is deliberately independent of the router's own HTTP code, so a bug there
cannot hide itself by being on both sides of a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support import REPO as ROOT
from tests.support import ROUTER_SCRIPT
from tests.support.wire import (
    Reply,
    SocketReader,
    header_map,
    http_response,
    read_reply,
    read_request,
    request_bytes,
)

sys.path.insert(0, str(ROUTER_SCRIPT.parent))

import llmhop

__all__ = [
    "ROOT",
    "WAIT",
    "FakeUpstream",
    "Handler",
    "HeldUpstream",
    "Received",
    "RunningRouter",
    "chat",
    "exchange",
    "llmhop",
    "respond_with",
    "send_raw",
]

WAIT = 5.0  # the bound on every wait in these tests


@dataclass
class Received:
    """One request exactly as the upstream saw it."""

    head: bytes  # request line and headers, ending with the blank line
    body: bytes  # raw, framing included
    connection_number: int

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        return header_map(self.head)

    @property
    def header_lines(self) -> list[bytes]:
        return [line for line in self.head.split(b"\r\n")[1:] if line]


Handler = Callable[["Received", socket.socket], bool | None]


def respond_with(response: bytes) -> Handler:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(response)
        return True

    return handler


class FakeUpstream:
    """A scripted HTTP/1.1 origin (TCP or unix socket) that records every request exactly."""

    def __init__(self, handler: Handler | None = None, *, unix_path: str | None = None):
        self.handler = handler or respond_with(http_response())
        self.received: queue.Queue[Received] = queue.Queue()
        self.connections = 0
        self.closed_connections = 0
        self.connection_closed = threading.Event()  # set each time a connection ends
        if unix_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
            self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(unix_path)
            self.listener.listen(128)
            self.url = f"unix://{unix_path}"
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = SocketReader(conn)
        try:
            while (request := read_request(reader)) is not None:
                received = Received(request[0], request[1], number)
                self.received.put(received)
                if self.handler(received, conn) is False:
                    break
        except (OSError, EOFError):
            pass
        finally:
            conn.close()
            self.closed_connections += 1
            self.connection_closed.set()

    def next_request(self) -> Received:
        return self.received.get(timeout=WAIT)

    def close(self) -> None:
        self._stopped = True
        self.listener.close()


class HeldUpstream(FakeUpstream):
    """An upstream that holds each request until the test lets it be answered: some
    (``allow``) or all from now on (``release_all``). What arrives is reported in order."""

    def __init__(self) -> None:
        self.arrived: queue.Queue[Received] = queue.Queue()
        self._may_answer = threading.Condition()
        self._credits = 0
        self._all = False

        def handler(request: Received, conn: socket.socket) -> bool:
            self.arrived.put(request)
            with self._may_answer:
                if not self._may_answer.wait_for(lambda: self._all or self._credits, WAIT):
                    return False
                if not self._all:
                    self._credits -= 1
            conn.sendall(http_response())
            return True

        super().__init__(handler)

    def next_arrival(self) -> Received:
        return self.arrived.get(timeout=WAIT)

    def nothing_arrived(self) -> bool:
        return self.arrived.empty()

    def allow(self, count: int = 1) -> None:
        with self._may_answer:
            self._credits += count
            self._may_answer.notify_all()

    def release_all(self) -> None:
        with self._may_answer:
            self._all = True
            self._may_answer.notify_all()

    def close(self) -> None:
        self.release_all()
        super().close()


class DeferredWrites(llmhop.WriteBatch):
    """Every write waits for the end of the event loop's pass, as it does under load, even
    for a lone exchange: a router given this runs its tests on the deferred path."""

    defer = property(lambda self: True, lambda self, value: None)  # type: ignore[assignment]


# Ids of the two write paths, for suites that run on both.
WRITE_PATHS = {"writes at once": False, "writes at the end of a pass": True}


def router_on(deferred: bool) -> Callable[..., RunningRouter]:
    """RunningRouter, its writes held to the end of the loop's pass when ``deferred``."""

    def make(config: dict[str, Any], **attributes: Any) -> RunningRouter:
        if deferred:
            attributes.setdefault("writes", DeferredWrites())
        return RunningRouter(config, **attributes)

    return make


class RunningRouter:
    """The router on an ephemeral loopback port, in a thread of its own with its own loop."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        environ: dict[str, str] | None = None,
        **router_attributes: Any,
    ):
        config = {"host": "127.0.0.1", "port": 0, **config}
        resolver = llmhop.SecretResolver(environ if environ is not None else dict(os.environ))
        parsed = llmhop.parse_config(json.dumps(config), resolver)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = llmhop.Server("<test>", parsed)
        self.server.router.access_log.enabled = router_attributes.pop("access_log", False)
        for name, value in router_attributes.items():
            setattr(self.server.router, name, value)
        self.bytes_read = 0  # read off client connections, for tests that split a stream
        self.connections_lost = 0
        self._count_reads()
        self.call(self.server.start())
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.address = ("127.0.0.1", self.port)

    def _count_reads(self) -> None:
        state = self.server.router
        make = state.new_connection

        def counted() -> llmhop.ClientConnection:
            connection = make()
            received, lost = connection.data_received, connection.connection_lost

            def data_received(data: bytes) -> None:
                self.bytes_read += len(data)
                received(data)

            def connection_lost(exc: Exception | None) -> None:
                self.connections_lost += 1
                lost(exc)

            connection.data_received = data_received  # type: ignore[method-assign]
            connection.connection_lost = connection_lost  # type: ignore[method-assign]
            return connection

        state.new_connection = counted  # type: ignore[method-assign]

    def read_up_to(self, total: int, *, lost_before: int | None = None) -> None:
        """Wait until the router has read ``total`` bytes off its client connections, so that
        what is sent next arrives in a read of its own; or, given the count of connections
        lost before, until one more is lost (the router closed it)."""
        for _ in range(int(WAIT / 0.002)):
            if self.bytes_read >= total or (
                lost_before is not None and self.connections_lost > lost_before
            ):
                self.settle()
                return
            threading.Event().wait(0.002)
        raise AssertionError(f"the router read {self.bytes_read} of {total} bytes")

    def assert_idle(self) -> None:
        """Every slot, gauge and turn that requests took has been given back."""
        self.settle()
        state = self.router
        assert state.in_flight == 0
        assert not +state.metrics.in_flight and not +state.metrics.key_in_flight
        assert all(not group.in_flight and not group.waiters for group in state.groups.values())
        for model in state.table.models.values():
            assert all(replica.state.in_flight == 0 for replica in model.replicas)

    def settle(self) -> None:
        """Let the router's loop run a few turns: what the kernel has delivered to its sockets
        by now (a peer's close, say) has been handled."""
        for _ in range(3):
            self.call(asyncio.sleep(0))

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT)

    @property
    def router(self) -> llmhop.RouterState:
        return self.server.router

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=WAIT)
        return sock

    def close(self) -> None:
        self.call(self.server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


def exchange(
    router: RunningRouter,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection."""
    with router.connect() as sock:
        sock.sendall(request_bytes(method, path, body, headers))
        return read_reply(SocketReader(sock), method)


def chat(model: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


def send_raw(router: RunningRouter, data: bytes) -> bytes:
    """Send bytes, half-close, and return everything the router answers until it closes."""
    with router.connect() as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return SocketReader(sock).rest()
