"""Test doubles and clients for the router tests: a scripted upstream and raw HTTP clients.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ROUTER_SCRIPT = ROOT / "pkgs" / "llmhop" / "llmhop.py"
sys.path.insert(0, str(ROUTER_SCRIPT.parent))

import llmhop  # noqa: E402

WAIT = 5.0  # the bound on every wait in these tests


class SocketReader:
    """Reads HTTP framing off a blocking socket, keeping every byte it received."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes) -> bytes | None:
        while (index := self.buffer.find(marker)) < 0:
            if not self._more():
                return None
        data, self.buffer = self.buffer[: index + len(marker)], self.buffer[index + len(marker) :]
        return data

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._more():
                raise EOFError(f"wanted {size} bytes, connection closed after {len(self.buffer)}")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def chunked(self) -> bytes:
        """A whole chunked body, raw, trailers included."""
        raw = b""
        while True:
            line = self.until(b"\r\n")
            if line is None:
                raise EOFError("connection closed inside a chunked body")
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                break
            raw += self.exactly(size + 2)
        while (line := self.until(b"\r\n")) not in (b"\r\n", None):
            raw += line
        return raw + b"\r\n"

    def rest(self) -> bytes:
        """Everything up to the peer closing the connection."""
        while self._more():
            pass
        data, self.buffer = self.buffer, b""
        return data


def header_map(head: bytes) -> dict[str, str]:
    """Lower-cased header names to values; a repeated name keeps its values comma-joined."""
    result: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        result[key] = f"{result[key]}, {value.strip()}" if key in result else value.strip()
    return result


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


def read_request(reader: SocketReader) -> tuple[bytes, bytes] | None:
    head = reader.until(b"\r\n\r\n")
    if head is None:
        return None
    headers = header_map(head)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return head, reader.chunked()
    return head, reader.exactly(int(headers.get("content-length", "0")))


Handler = Callable[["Received", socket.socket], bool | None]


def http_response(
    status: int = 200,
    body: bytes = b'{"ok":true}',
    headers: dict[str, str] | None = None,
    reason: str = "OK",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    all_headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    all_headers.update(headers or {})
    lines += [f"{name}: {value}" for name, value in all_headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def respond_with(response: bytes) -> Handler:
    def handler(request: Received, conn: socket.socket) -> bool:
        conn.sendall(response)
        return True

    return handler


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


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
        self.call(self.server.start())
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.address = ("127.0.0.1", self.port)

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


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def read_reply(reader: SocketReader, method: str = "GET") -> Reply:
    """One response off the socket, its body de-chunked."""
    while True:
        head = reader.until(b"\r\n\r\n")
        if head is None:
            raise EOFError("connection closed before a response")
        status = int(head.split(b" ", 2)[1])
        if status >= 200 or status == 101:
            break
    headers = header_map(head)
    if method == "HEAD" or status in (204, 304) or status == 101:
        body = b""
    elif headers.get("transfer-encoding") == "chunked":
        body = dechunk(reader.chunked())
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.rest()
    return Reply(status, head, body, headers)


def dechunk(raw: bytes) -> bytes:
    payload = b""
    while True:
        line, _, raw = raw.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return payload
        payload, raw = payload + raw[:size], raw[size + 2 :]


def request_bytes(
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    all_headers = {"Host": "router.test"}
    if body is not None:
        all_headers["Content-Length"] = str(len(body))
    all_headers.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in all_headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


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


class RouterProcess:
    """The router as its own process, as users run it; its stderr is collected as it comes.

    Reading stderr all the time matters: a full pipe would block the router's log writes.
    """

    def __init__(self, config: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None):
        import re
        import subprocess

        path = tmp_path / "config.json"
        path.write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}))
        self.process = subprocess.Popen(
            [sys.executable, str(ROUTER_SCRIPT), "--config", str(path)],
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ["PATH"], **(env or {})},
        )
        assert self.process.stderr is not None
        self.first_line = self.process.stderr.readline()
        self.lines: list[str] = [self.first_line]
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) ", self.first_line)
        assert match, self.first_line
        self.address = ("127.0.0.1", int(match[1]))

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=WAIT)

    def stop(self) -> str:
        """Terminate, wait, and return everything the router wrote to stderr."""
        self.process.terminate()
        self.process.wait(WAIT * 2)
        self._reader.join(WAIT)
        return "".join(self.lines)
