"""A small, fast SSE upstream for the benchmark: OpenAI-style stream chunks on a fixed clock.

Every request (any method and path; a Content-Length body is read and dropped) gets a
`text/event-stream` answer in chunked transfer coding, one event per chunk:

    data: {"object":"chat.completion.chunk",...,"t":<CLOCK_MONOTONIC ns when sent>,"i":<n>}

The first event goes out with the response head, then one every `interval_ms`, `chunks` in
all, then (one interval later) `data: [DONE]` and the last chunk; the connection stays open for
the next request. The query string may override both: `?chunks=10&interval_ms=1000`. Send
times are kept on an absolute schedule (`loop.call_at`), so slow rounds do not stretch the
stream.

Built on `asyncio.Protocol` with one timer per stream and no per-stream task, so that a
thousand streams cost little and twenty fast streams never make it the bottleneck.

Run: `python bench/sse_upstream.py [--host H] [--port P]`; prints `listening on H:P`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import time
from collections.abc import Callable
from urllib.parse import parse_qs

DEFAULT_CHUNKS = 200
DEFAULT_INTERVAL_MS = 5.0
MAX_HEAD_BYTES = 64 * 1024

RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
# A chat-completion chunk like the ones real servers send, with the send time and index last.
EVENT_TEMPLATE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
    b'"model":"sse","choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}],'
    b'"t":%d,"i":%d}\n\n'
)
DONE_EVENT = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def stream_settings(target: bytes, chunks: int, interval_ms: float) -> tuple[int, float]:
    """The stream's length and pace: the server's defaults, or the query's overrides."""
    _, _, query = target.partition(b"?")
    fields = parse_qs(query.decode("latin-1"))
    if "chunks" in fields:
        chunks = int(fields["chunks"][0])
    if "interval_ms" in fields:
        interval_ms = float(fields["interval_ms"][0])
    return max(chunks, 1), interval_ms / 1000


class StreamingProtocol(asyncio.Protocol):
    """One client connection: requests one after another, each answered with a stream."""

    def __init__(self, default_chunks: int, default_interval_ms: float) -> None:
        self.default_chunks = default_chunks
        self.default_interval_ms = default_interval_ms
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = 0  # request body bytes still to drop
        self.streaming = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()  # the client left mid-stream: stop sending
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _next_request(self) -> None:
        if self.streaming or self.transport is None:
            return  # a pipelined request waits until the stream before it ends
        if self.body_left:
            dropped = min(self.body_left, len(self.buffer))
            del self.buffer[:dropped]
            self.body_left -= dropped
            if self.body_left:
                return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self.transport.abort()
            return
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        request_line, *fields = head.split(b"\r\n")
        for field in fields:
            name, _, value = field.partition(b":")
            if name.strip().lower() == b"content-length":
                self.body_left = int(value)
        dropped = min(self.body_left, len(self.buffer))
        del self.buffer[:dropped]
        self.body_left -= dropped
        target = request_line.split(b" ")[1]
        chunks, interval = stream_settings(target, self.default_chunks, self.default_interval_ms)
        self.streaming = True
        self.transport.write(RESPONSE_HEAD)
        loop = asyncio.get_running_loop()
        self._send_event(loop, 0, chunks, loop.time(), interval)

    def _send_event(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        chunks: int,
        start: float,
        interval: float,
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        if index < chunks:
            transport.write(chunk(EVENT_TEMPLATE % (time.monotonic_ns(), index)))
            next_at = start + (index + 1) * interval
            self.timer = loop.call_at(
                next_at, self._send_event, loop, index + 1, chunks, start, interval
            )
            return
        # [DONE] one interval after the last chunk, as a generation ends: never coalesced.
        transport.write(chunk(DONE_EVENT) + LAST_CHUNK)
        self.timer = None
        self.streaming = False
        if self.buffer:
            self._next_request()


async def serve_until_stopped(
    protocol: Callable[[], asyncio.Protocol], host: str, port: int
) -> None:
    """Serve on ``host:port``, say where on stdout (the harness waits for that line), and stop
    at SIGTERM or SIGINT. The benchmark's other upstream scripts serve with it too."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host, port, backlog=4096)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS)
    parser.add_argument("--interval-ms", type=float, default=DEFAULT_INTERVAL_MS)
    args = parser.parse_args(argv)
    protocol = functools.partial(StreamingProtocol, args.chunks, args.interval_ms)
    asyncio.run(serve_until_stopped(protocol, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
