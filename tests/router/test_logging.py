"""One access-log line per request, and never a secret in the log."""

from __future__ import annotations

import re
from pathlib import Path

from support import FakeUpstream, chat

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
