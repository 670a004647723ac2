"""When bytes go to the sockets (WriteBatch): at once for a lone exchange, at the end of the
event loop's pass under load; either way every transport gets its bytes whole, once, in the
order they were written, and before it closes or ends its stream."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DeferredWrites, FakeUpstream, Received, RunningRouter, llmhop

from tests.support.wire import SocketReader, http_response, read_reply, request_bytes


class Recorded(asyncio.Transport):
    """A transport that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.received += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True


TRANSPORTS = 3
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"), st.integers(0, TRANSPORTS - 1), st.binary(min_size=1, max_size=8)
        ),
        st.tuples(st.just("defer"), st.booleans()),
        st.tuples(st.just("flush"), st.integers(0, TRANSPORTS - 1)),
        st.tuples(st.just("pass")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(OPERATIONS)
def test_every_transport_gets_its_bytes_once_and_in_order(operations: list[tuple]) -> None:
    transports = [Recorded() for _ in range(TRANSPORTS)]
    written = [b""] * TRANSPORTS

    async def run() -> None:
        batch = llmhop.WriteBatch()
        for operation in operations:
            if operation[0] == "write":
                _, index, data = operation
                waiting = transports[index].received != written[index]
                before = transports[index].received
                batch.write(transports[index], data)
                written[index] += data
                if not batch.defer and not waiting:
                    # A lone exchange's write, nothing of its own waiting: sent at once.
                    assert transports[index].received == before + data
            elif operation[0] == "defer":
                batch.defer = operation[1]
            elif operation[0] == "flush":
                batch.flush(transports[operation[1]])
                assert transports[operation[1]].received == written[operation[1]]
            else:
                await asyncio.sleep(0)  # the loop's next pass
            for transport, sent in zip(transports, written, strict=True):
                assert sent.startswith(transport.received)  # a prefix, never out of order
        await asyncio.sleep(0)

    asyncio.run(run())
    assert [t.received for t in transports] == written


def test_a_transport_that_closed_meanwhile_gets_nothing_and_the_others_theirs() -> None:
    gone, broken, fine = Recorded(), Recorded(), Recorded()

    def fails(data: object) -> None:
        raise RuntimeError("a bug")

    broken.write = fails  # type: ignore[method-assign]

    async def run() -> None:
        batch = llmhop.WriteBatch()
        batch.defer = True
        for transport in (gone, broken, fine):
            batch.write(transport, b"answer")
        gone.closing = True
        await asyncio.sleep(0)

    asyncio.run(run())
    assert gone.received == b""
    assert broken.closing  # a write that raised costs its own connection only
    assert fine.received == b"answer"


def test_the_end_of_a_tunnels_stream_comes_after_what_was_written_before_it() -> None:
    events: list[str] = []

    class Ending(Recorded):
        def can_write_eof(self) -> bool:
            return True

        def write(self, data: bytes | bytearray | memoryview) -> None:
            events.append(f"write {bytes(data).decode()}")

        def write_eof(self) -> None:
            events.append("eof")

    async def run() -> None:
        batch = llmhop.WriteBatch()
        batch.defer = True  # as under load: the client's bytes wait for the end of the pass
        upstream = llmhop.UpstreamConnection()
        upstream.transport = Ending()
        client = SimpleNamespace(writes=batch, tunnel_closed=lambda: None)
        tunnel = llmhop.Tunnel(client, upstream, admission=None)  # type: ignore[arg-type]
        tunnel.client_data(b"last words")
        tunnel.client_eof()  # the client's end of stream, passed on to the upstream
        await asyncio.sleep(0)

    asyncio.run(run())
    assert events == ["write last words", "eof"]


CLIENTS = 12
REQUESTS = 15


def counting_passes(batch: type[llmhop.WriteBatch]) -> type[llmhop.WriteBatch]:
    class Counted(batch):  # type: ignore[valid-type,misc]
        passes = 0

        def _end_of_pass(self) -> None:
            type(self).passes += 1
            super()._end_of_pass()

    return Counted


@pytest.mark.parametrize("batch", [llmhop.WriteBatch, DeferredWrites])
def test_concurrent_clients_each_get_their_own_answers_whole(
    batch: type[llmhop.WriteBatch],
) -> None:
    # A chunked answer of several pieces and a Content-Length one, to clients that keep
    # their connections and pipeline: with the real batch the load defers writes,
    # DeferredWrites defers every one.
    def answer(request: Received, conn: socket.socket) -> bool:
        tag = request.headers.get("x-tag", "")
        if request.request_line.split()[1].endswith("/chunked"):
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (tag.encode(), b"-", b"end"))
                + b"0\r\n\r\n"
            )
        else:
            conn.sendall(http_response(body=tag.encode()))
        return True

    writes = counting_passes(batch)
    upstream = FakeUpstream(answer)
    router = RunningRouter(
        {"maxConcurrentRequests": 0, "models": {"m": {"url": upstream.url}}}, writes=writes()
    )
    failures: list[str] = []

    def client(number: int) -> None:
        try:
            with router.connect() as sock:
                reader = SocketReader(sock)
                for index in range(REQUESTS):
                    tag = f"{number}.{index}"
                    path = "/route/m/chunked" if index % 2 else "/route/m/plain"
                    pipelined = index % 5 == 4
                    message = request_bytes("GET", path, headers={"X-Tag": tag})
                    sock.sendall(message * 2 if pipelined else message)
                    for _ in range(2 if pipelined else 1):
                        reply = read_reply(reader)
                        expected = f"{tag}-end" if index % 2 else tag
                        if reply.status != 200 or reply.body.decode() != expected:
                            failures.append(f"{tag}: {reply.status} {reply.body!r}")
        except Exception as exc:  # reported below, with the others
            failures.append(f"client {number}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        assert writes.passes > 0  # writes did wait for the end of a pass
        router.assert_idle()
    finally:
        router.close()
        upstream.close()
