"""Raw HTTP/1.1 for the tests: framing read off blocking sockets byte for byte, messages
written by hand, so that what the router sends and receives is seen exactly; and `request`, one
ordinary exchange through http.client over TCP or a unix socket.

Deliberately independent of the router's own HTTP code: a bug there cannot hide itself by
being on both sides of a test.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Any

WAIT = 10.0


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


def read_request(reader: SocketReader) -> tuple[bytes, bytes] | None:
    head = reader.until(b"\r\n\r\n")
    if head is None:
        return None
    headers = header_map(head)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return head, reader.chunked()
    return head, reader.exactly(int(headers.get("content-length", "0")))


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


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


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


class UnixConnection(http.client.HTTPConnection):
    """http.client over a unix socket."""

    def __init__(self, path: str, timeout: float = WAIT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def request(
    address: str | int,
    path: str,
    body: Any = None,
    *,
    method: str | None = None,
    token: str | None = None,
    timeout: float = WAIT,
) -> tuple[int, dict[str, str], bytes]:
    """One request to a unix socket path or a loopback port, `body` sent as JSON: status,
    headers, body."""
    connection = (
        UnixConnection(address, timeout)
        if isinstance(address, str)
        else http.client.HTTPConnection("127.0.0.1", address, timeout=timeout)
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method or ("GET" if data is None else "POST"), path, data, headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()
