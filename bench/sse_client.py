"""A measuring SSE client: opens streams, timestamps every byte and event as it arrives.

An `asyncio.Protocol` is used rather than streams so that the receive time is taken in
`data_received`, right after the kernel handed the bytes over, with no task switch in between.
The analysis (transit per event, coalescing, stalls, time to first token) is done afterwards on
the records, so the receive path does as little as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import statistics
import time
from dataclasses import dataclass, field

SEND_STAMP = re.compile(rb'"t":(\d+)')


@dataclass
class StreamRecord:
    """What one stream did, with times in CLOCK_MONOTONIC nanoseconds."""

    sent_ns: int = 0
    status: int = 0
    first_byte_ns: int | None = None
    # (receive time, event text without the "data: " prefix), one per event, in order.
    events: list[tuple[int, bytes]] = field(default_factory=list)
    # For each read that completed at least one event: how many it completed.
    events_per_read: list[int] = field(default_factory=list)
    complete: bool = False  # the last chunk arrived
    error: str | None = None


class ChunkedPayload:
    """Strips chunked transfer coding (enough of RFC 9112 §7.1 for well-behaved servers)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.remaining = 0  # payload bytes left in the current chunk, plus its CRLF
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        payload = bytearray()
        while self.buffer and not self.finished:
            if self.remaining > 0:
                take = min(self.remaining, len(self.buffer))
                payload += self.buffer[:take]
                del self.buffer[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.remaining = -2  # the CRLF after the chunk data
                continue
            if self.remaining < 0:
                if len(self.buffer) < 2:
                    break
                del self.buffer[:2]
                self.remaining = 0
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            del self.buffer[: line_end + 2]
            if size == 0:
                self.finished = True  # trailers, if any, are not needed
            else:
                self.remaining = size
        return bytes(payload)


class StreamProtocol(asyncio.Protocol):
    def __init__(self, record: StreamRecord, request: bytes, finished: asyncio.Future[None]):
        self.record = record
        self.request = request
        self.finished = finished
        self.head = bytearray()
        self.body: ChunkedPayload | None = None
        self.events = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.record.sent_ns = time.monotonic_ns()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        record = self.record
        if record.first_byte_ns is None:
            record.first_byte_ns = now
        if self.body is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            record.status = int(self.head[9:12])
            if b"transfer-encoding: chunked" not in self.head[:end].lower():
                self._finish(f"status {record.status}, not a chunked stream")
                return
            data = bytes(self.head[end + 4 :])
            self.body = ChunkedPayload()
        self.events += self.body.feed(data)
        completed = 0
        while (end := self.events.find(b"\n\n")) >= 0:
            event = bytes(self.events[:end])
            del self.events[: end + 2]
            record.events.append((now, event.removeprefix(b"data: ")))
            completed += 1
        if completed:
            record.events_per_read.append(completed)
        if self.body.finished:
            record.complete = True
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(None if self.record.complete else f"connection lost: {exc}")

    def _finish(self, error: str | None) -> None:
        if error is not None and self.record.error is None:
            self.record.error = error
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


def stream_request(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def open_stream(host: str, port: int, request: bytes, record: StreamRecord) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    try:
        await loop.create_connection(lambda: StreamProtocol(record, request, finished), host, port)
    except OSError as exc:
        record.error = f"connect: {exc}"
        return
    await finished


async def run_streams(
    host: str,
    port: int,
    request: bytes,
    count: int,
    start_spacing_s: float,
    timeout_s: float,
    during: asyncio.Event | None = None,
) -> list[StreamRecord]:
    """Open `count` streams `start_spacing_s` apart and wait for all, at most `timeout_s`.

    `during`, when given, is set once every stream has been started (to begin sampling).
    """
    records = [StreamRecord() for _ in range(count)]
    tasks: list[asyncio.Task[None]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            for record in records:
                tasks.append(asyncio.create_task(open_stream(host, port, request, record)))
                await asyncio.sleep(start_spacing_s)
            if during is not None:
                during.set()
            await asyncio.gather(*tasks)
    for task in tasks:
        task.cancel()
    for record in records:
        if not record.complete and record.error is None:
            record.error = f"not finished within {timeout_s} s"
    return records


# -- analysis --------------------------------------------------------------------------------


def transit_times_ns(records: list[StreamRecord]) -> list[int]:
    """Receive time minus the upstream's send stamp, for every stamped event."""
    transits = []
    for record in records:
        for received_ns, event in record.events:
            stamp = SEND_STAMP.search(event)
            if stamp is not None:
                transits.append(received_ns - int(stamp[1]))
    return transits


def first_byte_times_ns(records: list[StreamRecord]) -> list[int]:
    return [r.first_byte_ns - r.sent_ns for r in records if r.first_byte_ns is not None]


def coalesced_fraction(records: list[StreamRecord]) -> float:
    """The share of events that arrived in the same read as an earlier event of their stream."""
    events = sum(len(r.events) for r in records)
    merged = sum(n - 1 for r in records for n in r.events_per_read)
    return merged / events if events else 0.0


def longest_gap_ns(record: StreamRecord) -> int:
    """The longest wait between consecutive arrivals (first byte, then each event)."""
    arrivals = [record.first_byte_ns or record.sent_ns, *(t for t, _ in record.events)]
    return max((b - a for a, b in itertools.pairwise(arrivals)), default=0)


def stalled(record: StreamRecord, interval_s: float, slack_s: float) -> bool:
    """Unfinished, or a gap longer than the upstream's interval plus `slack_s`."""
    return not record.complete or longest_gap_ns(record) > (interval_s + slack_s) * 1e9


def token_text(event: bytes) -> str:
    """The content delta of an OpenAI chat-completion chunk ('' for role or final chunks)."""
    if event.startswith(b"[DONE]"):
        return ""
    choices = json.loads(event).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


@dataclass
class GenerationTiming:
    first_token_s: float
    total_s: float
    tokens: int


def generation_timing(record: StreamRecord) -> GenerationTiming | None:
    """Time to the first content token and to the end of the stream, from the request."""
    token_times = [t for t, event in record.events if token_text(event)]
    if not record.complete or not token_times:
        return None
    last = record.events[-1][0]
    return GenerationTiming(
        (token_times[0] - record.sent_ns) / 1e9, (last - record.sent_ns) / 1e9, len(token_times)
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
