"""One access-log line per request, and never a secret in the log."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import FakeUpstream, chat, llmhop

from tests.support.router import RouterProcess
from tests.support.wire import SocketReader, read_reply, request_bytes

LINE = re.compile(
    r'access: "(?P<method>\S+) (?P<path>\S+)" '
    r'model=(?P<model>"(?:[^"\\]|\\.)*"|\S+) key=(?P<key>\S+) route=(?P<route>\S+) '
    r"status=(?P<status>\d+) in=(?P<bytes_in>\d+) out=(?P<bytes_out>\d+) "
    r"total_ms=(?P<total>[\d.]+) upstream_ms=(?P<upstream>[\d.]+|-) id=(?P<id>\S+)"
)


def test_access_log_lines_and_no_secrets(tmp_path: Path, upstream: FakeUpstream) -> None:
    (tmp_path / "key").write_text("upstream-secret-77\n")
    router = RouterProcess(
        {
            "authTokens": ["${env:CLIENT_TOKEN}"],
            "models": {
                "m": {"url": upstream.url, "headers": {"Authorization": "Bearer ${file:key}"}}
            },
        },
        tmp_path,
        env={"CLIENT_TOKEN": "client-secret-42", "CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    auth = {"Authorization": "Bearer client-secret-42", "X-Request-Id": "trace-1"}
    requests = [
        request_bytes("POST", "/v1/chat/completions?api_key=query-secret-9", chat("m"), auth),
        request_bytes("POST", "/v1/chat/completions", chat("nope"), auth),
        request_bytes("GET", "/v1/models", None, {"Authorization": "Bearer wrong-secret-5"}),
        request_bytes("GET", "/health"),
        request_bytes("POST", "/v1/x", chat("evil\naccess: forged line"), auth),
    ]
    with router.connect() as sock:
        reader = SocketReader(sock)
        for request in requests:
            sock.sendall(request)
            read_reply(reader)
    log = router.stop()
    lines = [LINE.search(line) for line in log.splitlines() if line.startswith("access:")]
    assert all(lines), log
    fields = [m.groupdict() for m in lines if m]
    assert [(f["method"], f["path"], f["model"], f["status"]) for f in fields] == [
        ("POST", "/v1/chat/completions", "m", "200"),
        ("POST", "/v1/chat/completions", "nope", "404"),
        ("GET", "/v1/models", "-", "401"),
        ("GET", "/health", "-", "200"),
        ("POST", "/v1/x", '"evil\\naccess: forged line"', "404"),
    ]
    # A model name with a line break cannot forge a log line of its own.
    assert len(log.splitlines()) == 1 + len(requests)
    proxied = fields[0]
    assert proxied["route"] == "body"
    assert int(proxied["bytes_in"]) == len(chat("m"))
    assert int(proxied["bytes_out"]) == len(b'{"ok":true}')
    assert proxied["upstream"] != "-"
    assert proxied["id"] == "trace-1"
    for secret in ("client-secret-42", "upstream-secret-77", "query-secret-9", "wrong-secret-5"):
        assert secret not in log


# --- when lines are written: in batches, never lost ------------------------------------------


class Writes(io.StringIO):
    """stderr as the access log sees it, counting its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def write(self, text: str) -> int:
        self.count += 1
        return super().write(text)


def stderr_counted(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """sys.stderr replaced for the test's call (a fixture's would be pytest's capture's)."""
    writes = Writes()
    monkeypatch.setattr(sys, "stderr", writes)
    return writes


async def written(stderr: Writes, count: int) -> None:
    """Until stderr has had ``count`` writes, within 5 s."""
    deadline = time.monotonic() + 5
    while stderr.count < count and time.monotonic() < deadline:
        await asyncio.sleep(llmhop.ACCESS_LOG_DELAY / 4)


def exchange(number: int) -> llmhop.Exchange:
    recorded = llmhop.Exchange(time.monotonic(), method="POST", path="/v1/x", model="m")
    recorded.status = 200 + number % 2
    return recorded


def log_of(count: int) -> llmhop.AccessLog:
    """An access log that recorded ``count`` exchanges (in a running loop: it sets a timer)."""
    access_log = llmhop.AccessLog()
    for number in range(count):
        access_log.record(exchange(number))
    return access_log


def test_lines_recorded_together_share_one_write_soon_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stderr = stderr_counted(monkeypatch)

    async def record_three() -> None:
        log_of(3)
        assert stderr.count == 0  # not yet: later lines may share the write
        await written(stderr, 1)

    asyncio.run(record_three())
    assert stderr.count == 1
    assert [line.split()[6] for line in stderr.getvalue().splitlines()] == [
        "status=200",
        "status=201",
        "status=200",
    ]


def test_a_full_batch_is_written_at_once_and_the_rest_at_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stderr = stderr_counted(monkeypatch)

    async def record_a_batch_and_one() -> None:
        access_log = log_of(llmhop.ACCESS_LOG_BATCH + 1)
        assert stderr.count == 1  # the full batch, without waiting for the loop
        access_log.flush()  # as at shutdown: whatever waits goes out now
        assert stderr.count == 2
        access_log.flush()  # nothing left, nothing written
        assert stderr.count == 2

    asyncio.run(record_a_batch_and_one())
    assert len(stderr.getvalue().splitlines()) == llmhop.ACCESS_LOG_BATCH + 1


def test_the_line_after_a_full_batch_goes_out_with_the_running_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stderr = stderr_counted(monkeypatch)

    async def record_past_a_batch() -> int:
        loop = asyncio.get_running_loop()
        timers = []
        schedule = loop.call_later

        def counted(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            timers.append(delay)
            return schedule(delay, callback, *args)

        monkeypatch.setattr(loop, "call_later", counted)
        log_of(llmhop.ACCESS_LOG_BATCH + 1)
        scheduled_while_recording = len(timers)
        assert stderr.count == 1
        await written(stderr, 2)
        return scheduled_while_recording

    # One timer served both the batch and the line after it, which it wrote without a flush.
    assert asyncio.run(record_past_a_batch()) == 1
    assert stderr.count == 2
    assert len(stderr.getvalue().splitlines()) == llmhop.ACCESS_LOG_BATCH + 1
