#!/usr/bin/env python3
"""llmhop: one OpenAI-compatible endpoint in front of many LLM servers.

The router reads the ``model`` of each request (the top-level JSON field of the body, or the
``/route/{model}/...`` prefix of the path), finds that model's upstream in its JSON config and
forwards the request byte for byte, streaming the answer back.

The file follows a request's way through the router; nothing is used above its definition:

1. protocol      -- HTTP/1.1 vocabulary and messages (RFC 9110, RFC 9112) on bytes, no I/O
2. secrets       -- ``${env:...}``, ``${file:...}``, ``${cred:...}`` references
3. config        -- the strict JSON config: models and their replicas, keys
4. routing       -- the routing table, what each key may reach, and ``route``: what a request
                    gets, from its head alone; the ``model`` of a JSON body
5. header rules  -- how a request head is rewritten for the upstream, and a response head for
                    the client (RFC 9110 §7.6)
6. errors        -- the OpenAI error shape of the router's own answers
7. observability -- the record of an exchange, metrics, request ids, the access log
8. upstreams     -- connections to the model servers, pooled for keep-alive
9. client        -- groups and their queues; one client connection: its phase, keep-alive,
                    request bodies, answers; the state all connections share
10. forward      -- the choice of a replica; one proxied request and its response; the
                    tunnel after 101
11. server       -- listeners (socket activation too), sd_notify, reload, drain
12. notify       -- ``llmhop-notify``: sd_notify readiness for workers that lack it
13. command line

Standard library only, Python 3.11 or newer.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import select
import signal
import socket
import ssl
import sys
import time
import zlib
from collections.abc import Callable, Collection, Coroutine, Iterable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import unquote, unquote_to_bytes, urlsplit

VERSION = "0.1.0"

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_REQUESTS = 8
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_QUEUE_TIMEOUT = 600.0  # a cold start (loading weights) can take minutes
# Below the keep-alive of the servers behind (uvicorn's and llama.cpp's are 5 s), so the
# router lets go of an idle connection before the server may close it under a request.
DEFAULT_UPSTREAM_IDLE_TIMEOUT = 4.0
DEFAULT_HEALTH_INTERVAL = 15.0

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 256
HEAD_TIMEOUT = 10.0  # a request head must arrive whole within this, from its first byte
IDLE_TIMEOUT = 75.0  # a keep-alive client connection may wait this long for its next request
MAX_PIPELINED_BYTES = 256 * 1024  # held for later while a request is served; reading pauses
WRITE_HIGH_WATER = 256 * 1024
JOIN_LIMIT = 64 * 1024  # a body up to this size goes out joined to its head, in one write
MAX_IDLE_UPSTREAM_CONNECTIONS = 64
# An unread request body up to this size is read and dropped after an early error response, so
# the connection can be reused and the client is not cut off mid-send.
MAX_DISCARD_BYTES = 256 * 1024
DISCARD_TIMEOUT = 1.0
# A client that half-closes right after its request still gets an answer that comes this soon;
# later, its end of stream counts as leaving, which stops the exchange.
CLIENT_EOF_GRACE = 0.05


def log(message: str) -> None:
    sys.stderr.write(f"llmhop: {message}\n")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# 1. Protocol: HTTP/1.1 vocabulary and messages (RFC 9110, RFC 9112), on bytes; no I/O
# ---------------------------------------------------------------------------------------------


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Header value octets: VCHAR, obs-text, SP and HTAB (RFC 9110 §5.5); used to delete valid bytes.
_FIELD_VALUE_OCTETS = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])


def is_valid_field_value(value: bytes) -> bool:
    return not value.translate(None, _FIELD_VALUE_OCTETS)


HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te transfer-encoding upgrade "
    b"proxy-authenticate proxy-authorization".split()
)

# Request headers a proxy sets itself, whatever the client sent.
REPLACED_REQUEST_HEADERS = frozenset(
    b"host content-length expect x-request-id forwarded x-forwarded-for x-forwarded-host "
    b"x-forwarded-proto".split()
)

# Where clients send their tokens; never forwarded when the router checks tokens itself.
_CREDENTIAL_HEADERS = frozenset((b"authorization", b"x-api-key"))
# Framing and connection management stay the proxy's: a model may not set them.
_MANAGED_HEADERS = frozenset(
    b"connection content-length expect keep-alive proxy-connection te trailer "
    b"transfer-encoding upgrade".split()
)


class ProtocolError(Exception):
    """A message that breaks HTTP/1.1; the connection it came on cannot be trusted further."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# A valid request line; when it does not match, the looser one tells what is wrong with it.
_REQUEST_LINE = re.compile(rb"(%s) ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]\.[0-9])" % _TOKEN.pattern)

_ANY_REQUEST_LINE = re.compile(rb"([^ ]+) ([^ ]+) (HTTP/[0-9]\.[0-9])")

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")


class Fields(list[tuple[bytes, bytes]]):
    """Header fields in order as received, (name, value), indexed once by lower-cased name."""

    __slots__ = ("lowered",)

    # A message has a handful of fields: a search of this list, in C, beats building an index
    # of them for every message.
    lowered: list[bytes]

    @classmethod
    def of(cls, fields: list[tuple[bytes, bytes]]) -> Fields:
        # list's own constructor, without a Python __init__ around it: this runs twice a request
        made = cls(fields)
        made.lowered = [name.lower() for name, _ in fields]
        return made

    def only(self, lower_name: bytes) -> bytes | None:
        """The value of the field of that name when there is exactly one, the usual case."""
        lowered = self.lowered
        return self[lowered.index(lower_name)][1] if lowered.count(lower_name) == 1 else None

    def values(self, lower_name: bytes) -> list[bytes]:
        """The values of every field of that name, in order."""
        if lower_name not in self.lowered:
            return []
        value = self.only(lower_name)
        if value is not None:
            return [value]
        return [
            value
            for (_, value), lower in zip(self, self.lowered, strict=True)
            if lower == lower_name
        ]

    def first(self, lower_name: bytes) -> bytes | None:
        """The value of the first field of that name."""
        lowered = self.lowered
        return self[lowered.index(lower_name)][1] if lower_name in lowered else None

    def without(self, dropped: frozenset[bytes] | set[bytes]) -> list[bytes]:
        """``Name: value`` lines of the fields not named in ``dropped``."""
        return [
            name + b": " + value
            for (name, value), lower in zip(self, self.lowered, strict=True)
            if lower not in dropped
        ]


# A valid field line (RFC 9110 §5.5): token ":" OWS value OWS CRLF, the value without its OWS.
_FIELD_NAME = _TOKEN.pattern

_FIELD_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"

_FIELD_LINE = re.compile(rb"(?m)^(%s):[ \t]*(%s)[ \t]*\r\n" % (_FIELD_NAME, _FIELD_VALUE))


def _field_error(block: bytes) -> ProtocolError:
    """What is wrong with the first invalid line of a field block."""
    for line in block.split(b"\r\n")[:-1]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            if line[:1] in (b" ", b"\t"):
                return ProtocolError(400, "obsolete line folding is not allowed")
            return ProtocolError(400, "malformed header field")
        if not is_valid_field_value(value.strip(b" \t")):
            break
    return ProtocolError(400, "invalid character in header value")


def parse_fields(block: bytes) -> Fields:
    """The fields of a block of field lines, each line ending with CRLF."""
    lines = block.count(b"\n")
    if lines > MAX_HEADER_FIELDS:
        raise ProtocolError(431, f"more than {MAX_HEADER_FIELDS} header fields")
    # One pass in C instead of one in Python over the lines. A match starts at a line's start
    # and ends with the line's CRLF, the only LF it can hold: as many matches as LFs means
    # every line matched whole (a bare LF ends a line no match takes). The lines are walked
    # only to tell what is wrong.
    fields = _FIELD_LINE.findall(block)
    if len(fields) != lines:
        raise _field_error(block)
    return Fields.of(fields)


def header_tokens(headers: Fields, lower_name: bytes) -> list[bytes]:
    """The comma-separated elements of every field of that name, lower-cased."""
    if lower_name not in headers.lowered:
        return []  # the usual answer, without building a list from nothing
    value = headers.only(lower_name)
    if value is not None and b"," not in value:
        # One element, the next most usual (Connection: keep-alive): a field value has no
        # surrounding whitespace left, and an empty one has no element.
        return [value.lower()] if value else []
    return [
        element.strip(b" \t").lower()
        for value in headers.values(lower_name)
        for element in value.split(b",")
        if element.strip(b" \t")
    ]


CHUNKED = -1  # a body length meaning "chunked transfer coding"

UNTIL_CLOSE = -2  # a response body delimited by the connection closing


def body_length(headers: Fields) -> int:
    """The framing of a request body (RFC 9112 §6.3): its length (0 for none) or CHUNKED."""
    codings = header_tokens(headers, b"transfer-encoding")
    if codings:
        if b"content-length" in headers.lowered:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        if codings[-1] != b"chunked":
            raise ProtocolError(400, "chunked must be the final transfer coding")
        if len(codings) > 1:
            raise ProtocolError(501, "transfer codings other than chunked are not supported")
        return CHUNKED
    length = headers.only(b"content-length")
    if length is not None and length.isdigit() and len(length) <= 18:
        return int(length)  # the usual case, in short
    lengths = headers.values(b"content-length")
    if not lengths:
        return 0
    elements = {element.strip(b" \t") for value in lengths for element in value.split(b",")}
    if len(elements) != 1:
        raise ProtocolError(400, "conflicting Content-Length values")
    (length,) = elements
    if not length.isdigit() or len(length) > 18:
        raise ProtocolError(400, "invalid Content-Length")
    return int(length)


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of an origin-form or absolute-form request target; query keeps its '?'."""
    if not target.startswith(b"/"):
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise ProtocolError(400, "request target must be a path")
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    question = target.find(b"?")
    if question < 0:
        return target, b""
    return target[:question], target[question:]


class HTTPError(Exception):
    """A request the router refuses or answers in the upstream's place (section 6 shapes it)."""

    def __init__(
        self, status: int, message: str, code: str, *, headers: tuple[bytes, ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers


class Request(NamedTuple):
    """A parsed request head; how far its body has been read is the connection's to track."""

    method: bytes
    target: bytes  # in origin form: the path and the query, as received
    path: bytes
    query: bytes  # with its "?", or empty
    http_minor: int  # 0 or 1
    headers: Fields
    length: int  # bytes of body as declared, or CHUNKED
    keep_alive: bool  # whether the client allows another request on its connection
    expect_continue: bool
    upgrade: bytes | None  # the protocol asked for, when the client asks to switch
    connection: tuple[bytes, ...]  # the Connection options, lower-cased

    def header(self, lower_name: bytes) -> bytes | None:
        return self.headers.first(lower_name)


def _request_line_error(request_line: bytes) -> ProtocolError:
    match = _ANY_REQUEST_LINE.fullmatch(request_line)
    if match is None or not _TOKEN.fullmatch(match[1]):
        return ProtocolError(400, "malformed request line")
    return ProtocolError(400, "invalid character in request target")


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (without its final blank line); raise ProtocolError if invalid."""
    request_line, _, fields = head.partition(b"\r\n")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise _request_line_error(request_line)
    method, target, version = match.groups()
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    http_minor = version[-1] - ord("0")
    path, query = split_target(target)
    headers = parse_fields(fields + b"\r\n" if fields else b"")
    if http_minor == 1 and headers.lowered.count(b"host") != 1:
        raise ProtocolError(400, "an HTTP/1.1 request needs exactly one Host header")
    if http_minor == 0 and b"transfer-encoding" in headers.lowered:
        raise ProtocolError(400, "Transfer-Encoding is not defined for HTTP/1.0")
    length = body_length(headers)
    connection = header_tokens(headers, b"connection")
    expectations = header_tokens(headers, b"expect")
    if expectations and expectations != [b"100-continue"]:
        raise ProtocolError(417, "only Expect: 100-continue is supported")
    upgrade = headers.values(b"upgrade") if b"upgrade" in connection else None
    return Request(
        method,
        target if target[:1] == b"/" else path + query,
        path,
        query,
        http_minor,
        headers,
        length,
        # HTTP/1.1 is persistent unless "close" is asked for; we do not keep HTTP/1.0
        # connections alive (RFC 9112 §9.3).
        http_minor == 1 and b"close" not in connection,
        bool(expectations) and http_minor == 1,
        upgrade[0] if upgrade else None,
        tuple(connection),
    )


@dataclass(slots=True)
class Response:
    status: int
    reason: bytes
    headers: Fields
    length: int  # bytes of body, CHUNKED or UNTIL_CLOSE
    keep_alive: bool
    connection: tuple[bytes, ...] = ()  # the Connection options, lower-cased


def parse_response_head(head: bytes, request_method: bytes) -> Response:
    status_line, _, fields = head.partition(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ProtocolError(502, "malformed status line from upstream")
    headers = parse_fields(fields + b"\r\n" if fields else b"")
    status = int(match[2])
    connection = header_tokens(headers, b"connection")
    keep_alive = match[1] == b"1" and b"close" not in connection
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        length = 0
    else:
        length = body_length(headers)
        if length == 0 and b"content-length" not in headers.lowered:
            length, keep_alive = UNTIL_CLOSE, False
    return Response(status, match[3] or b"", headers, length, keep_alive, tuple(connection))


class ChunkedDecoder:
    """Follows chunked framing (RFC 9112 §7.1) over raw bytes, which callers forward unchanged.

    ``feed`` returns how much of the data belongs to the message; the rest, if any, follows it.
    Payload pieces are appended to ``payload`` when one is given.
    """

    __slots__ = ("_line", "_remaining", "_state", "done", "size", "trailer_fields")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    _MAX_LINE = 8 * 1024

    def __init__(self) -> None:
        self._state = self._SIZE
        self._line = b""
        self._remaining = 0
        self.size = 0  # payload bytes so far
        self.done = False
        self.trailer_fields = 0

    def feed(self, data: bytes, payload: list[bytes] | None = None) -> int:
        position = 0
        end = len(data)
        while position < end and not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, end - position)
                if payload is not None:
                    payload.append(data[position : position + take])
                position += take
                self.size += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", position)
            if newline < 0:
                self._line += data[position:]
                if len(self._line) > self._MAX_LINE:
                    raise ProtocolError(400, "chunked framing line too long")
                return end
            line = self._line + data[position:newline]
            self._line = b""
            position = newline + 1
            if not line.endswith(b"\r"):
                raise ProtocolError(400, "chunked framing lines must end with CRLF")
            self._line_complete(line[:-1])
        return position

    def _line_complete(self, line: bytes) -> None:
        if self._state == self._SIZE:
            size, _, extension = line.partition(b";")
            size = size.rstrip(b" \t")
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise ProtocolError(400, "invalid chunk size")
            if not is_valid_field_value(extension):
                raise ProtocolError(400, "invalid chunk extension")
            self._remaining = int(size, 16)
            self._state = self._DATA if self._remaining else self._TRAILER
        elif self._state == self._DATA_END:
            if line:
                raise ProtocolError(400, "chunk data longer than its size")
            self._state = self._SIZE
        elif not line:
            self.done = True
        else:
            self.trailer_fields += 1
            parse_fields(line + b"\r\n")
            if self.trailer_fields > MAX_HEADER_FIELDS:
                raise ProtocolError(431, "too many trailer fields")


def take_head(buffer: bytearray, max_bytes: int = MAX_HEAD_BYTES) -> bytes | None:
    """Remove the next message head from ``buffer`` and return it without its blank line.

    None while the head is still incomplete; ProtocolError when it grows past ``max_bytes``.
    """
    while buffer.startswith(b"\r\n"):  # RFC 9112 §2.2: blank lines may precede a message
        del buffer[:2]
    end = buffer.find(b"\r\n\r\n")
    if end > max_bytes or (end < 0 and len(buffer) > max_bytes):
        raise ProtocolError(431, f"header block larger than {max_bytes} bytes")
    if end < 0:
        return None
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    return head


class Framing:
    """Where one message body ends (RFC 9112 §6.3), over its bytes as they arrive.

    ``feed`` returns how many of the bytes belong to the body, framing included, and sets
    ``done`` at its end; the content is appended to ``payload`` when one is given. A body
    delimited by the connection closing is never done: its reader ends it at the close.
    """

    __slots__ = ("_chunks", "_remaining", "done", "length")

    def __init__(self, length: int) -> None:
        self.length = length  # bytes, CHUNKED or UNTIL_CLOSE
        self._remaining = max(length, 0)
        self._chunks = ChunkedDecoder() if length == CHUNKED else None
        self.done = length == 0

    @property
    def content_size(self) -> int:
        """Chunked content so far, for a cap on bodies without a declared length."""
        return self._chunks.size if self._chunks is not None else 0

    @property
    def remaining(self) -> int:
        """Bytes still to come of a declared length; 0 for chunked framing, which cannot say."""
        return self._remaining

    def feed(self, data: bytes, payload: list[bytes] | None = None) -> int:
        if self._chunks is not None:
            end = self._chunks.feed(data, payload)
            self.done = self._chunks.done
            return end
        if self.length == UNTIL_CLOSE:
            take = len(data)
        else:
            take = min(self._remaining, len(data))
            self._remaining -= take
            self.done = not self._remaining
        if payload is not None and take:
            payload.append(data[:take])
        return take


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def response_head(status: int, headers: list[bytes], reason: bytes | None = None) -> bytes:
    """A response head; ``headers`` are complete ``Name: value`` lines without CRLF."""
    if reason is None:
        reason = _REASONS.get(status, b"")
    return b"\r\n".join([b"HTTP/1.1 %d %s" % (status, reason), *headers, b"", b""])


# ---------------------------------------------------------------------------------------------
# 2. Secrets
# ---------------------------------------------------------------------------------------------


SECRET_SCHEMES = ("env", "file", "cred")

_BARE_REFERENCE = re.compile(r"[A-Za-z0-9_]+|[*#@!?-]")


class SecretError(Exception):
    """A secret reference that cannot be resolved; the message never holds secret contents."""


def _trim_line_terminator(text: str) -> str:
    # Exactly one: "secret\n\n" keeps its inner newline, as files written by hand often end so.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _read_secret_file(path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return _trim_line_terminator(data.decode())
    except UnicodeDecodeError:
        raise SecretError(f"{path} is not UTF-8 text") from None


class SecretResolver:
    """Resolves one ``scheme:argument`` reference; ``check_only`` validates without reading."""

    def __init__(self, environ: dict[str, str] | None = None, *, check_only: bool = False):
        self.environ = os.environ if environ is None else environ
        self.check_only = check_only

    def __call__(self, scheme: str, argument: str) -> str:
        return getattr(self, f"_{scheme}")(argument)

    def _env(self, name: str) -> str:
        if not name:
            raise SecretError("env: needs a variable name")
        if self.check_only:
            return _unread("env", name)
        value = self.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set")
        return value

    def _credentials_directory(self, reference: str) -> str:
        directory = self.environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory:
            raise SecretError(f"{reference} needs $CREDENTIALS_DIRECTORY, which is not set")
        return directory

    def _file(self, path: str) -> str:
        if not path:
            raise SecretError("file: needs a path")
        if self.check_only:
            return _unread("file", path)
        if not os.path.isabs(path):
            # As in the Go project: a relative path names a file among systemd's credentials.
            path = os.path.join(self._credentials_directory(f"relative path {path!r}"), path)
        return _read_secret_file(path)

    def _cred(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise SecretError(f"cred: needs a credential name without '/', got {name!r}")
        if self.check_only:
            return _unread("cred", name)
        return _read_secret_file(os.path.join(self._credentials_directory(f"cred:{name}"), name))


def _unread(scheme: str, argument: str) -> str:
    """What a reference stands for while a config is only checked: distinct references stay
    distinct, so two keys given as two credentials are not taken for one token."""
    return f"unread-{scheme}-{argument}"


def _not_a_reference(text: str) -> str:
    return f"{text!r} is not a cred:, env: or file: reference; write $$ for a literal $"


def expand_secrets(value: str, resolve: Callable[[str, str], str]) -> tuple[str, list[str]]:
    """Expand every reference in ``value``; return the result and every error found."""
    parts: list[str] = []
    errors: list[str] = []
    position = 0
    while (dollar := value.find("$", position)) >= 0:
        parts.append(value[position:dollar])
        following = value[dollar + 1 : dollar + 2]
        if following == "$":
            parts.append("$")
            position = dollar + 2
        elif following == "{":
            close = value.find("}", dollar + 2)
            if close < 0:
                errors.append(f"unclosed reference {value[dollar:]!r}")
                return "".join(parts), errors
            reference = value[dollar + 2 : close]
            scheme, colon, argument = reference.partition(":")
            if colon and scheme in SECRET_SCHEMES:
                try:
                    parts.append(resolve(scheme, argument))
                except SecretError as exc:
                    errors.append(f"${{{reference}}}: {exc}")
            else:
                errors.append(_not_a_reference(f"${{{reference}}}"))
            position = close + 1
        elif match := _BARE_REFERENCE.match(value, dollar + 1):
            errors.append(_not_a_reference("$" + match.group()))
            position = match.end()
        else:
            parts.append("$")  # a lone "$" followed by nothing name-like is literal text
            position = dollar + 1
    parts.append(value[position:])
    return "".join(parts), errors


# ---------------------------------------------------------------------------------------------
# 3. Config
# ---------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """Every problem found in a config, each as ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__(
            "\n".join(
                f"config: {path}: {message}" if path else f"config: {message}"
                for path, message in problems
            )
        )
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a model is served: a TCP host and port (maybe TLS), or a unix socket."""

    scheme: str  # "http", "https" or "unix"
    host: str  # no brackets; the socket path for unix
    port: int
    base_path: str  # "" or "/prefix" without a trailing slash
    query: str  # raw, forwarded byte for byte
    host_header: bytes  # the upstream's own authority, as a Host header value
    pool_key: tuple[str, str, int] = ("", "", 0)  # what its pooled connections are kept by
    path_prefix: bytes = b""  # base_path, as the request line carries it

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_key", (self.scheme, self.host, self.port))
        object.__setattr__(self, "path_prefix", self.base_path.encode())

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def parse_upstream_url(url: str) -> Upstream:
    """Parse a model URL: absolute ``http(s)://host[:port][/base][?query]`` or ``unix:///path``."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if "#" in url:
        raise ValueError("must not have a fragment")
    if parts.scheme == "unix":
        if parts.netloc:
            raise ValueError("a unix URL takes no host: write unix:///absolute/path.sock")
        if not parts.path.startswith("/"):
            raise ValueError("a unix URL needs an absolute socket path")
        if parts.query:
            raise ValueError("a unix URL takes no query")
        return Upstream("unix", parts.path, 0, "", "", b"localhost")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s) or unix URL")
    if "@" in parts.netloc:
        raise ValueError("must not carry user information")
    if not parts.hostname:
        raise ValueError("needs a host")
    _check_host_name(parts.hostname)
    try:
        explicit_port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    default_port = 443 if parts.scheme == "https" else 80
    port = default_port if explicit_port is None else explicit_port
    authority = parts.netloc.rpartition(":")[0] if explicit_port is not None else parts.netloc
    if port != default_port:
        authority = f"{authority}:{port}"
    return Upstream(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        query=parts.query,
        host_header=authority.lower().encode("ascii"),
    )


def _check_host_name(host: str) -> None:
    """A host name must be one the resolver can be asked for: IDNA refuses an empty label or
    one over 63 characters (RFC 1035 §2.3.4), and connecting would fail on every request."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return
    except OSError:
        pass
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"has a host name that cannot be looked up: {host!r} (an empty label, or one "
            "longer than 63 characters)"
        ) from None


@dataclass(frozen=True, slots=True)
class Listener:
    host: str  # "" = every interface
    port: int  # 0 = an ephemeral port, logged at startup


class ReplicaState:
    """What the router knows of one replica at run time; it outlives reloads that keep it."""

    __slots__ = (
        "connect_failures",
        "failed_at",
        "failures",
        "in_flight",
        "requests",
        "retry_at",
        "seen",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.connect_failures = 0  # ever, for metrics
        self.failures = 0  # connection attempts failed in a row; 0 once one succeeds
        self.failed_at = 0.0  # monotonic time of the last failed attempt
        self.retry_at = 0.0  # left out of the choice until then
        # What the router last learnt of it: READY or LOADING from a response head (or a
        # probe), UNAVAILABLE from a failed connect, UNKNOWN before either.
        self.seen = UNKNOWN


# A model's state, as the router sees it (``model_state``).
READY, LOADING, IDLE, UNAVAILABLE, UNKNOWN = "ready", "loading", "idle", "unavailable", "unknown"
STATES = (READY, LOADING, IDLE, UNAVAILABLE, UNKNOWN)


def model_state(model: Model, group: Group | None) -> str:
    """A model's state: ``idle`` while another model of its group is active; else ``ready``
    if any replica answered, ``loading`` if any is loading (its group switched to it, or it
    answered 503), ``unknown`` before the router has heard from one, and ``unavailable`` when
    connecting to every replica failed last."""
    if group is not None and group.active is not None and group.active != model.name:
        return IDLE
    states = [replica.state.seen for replica in model.replicas]
    for state in (READY, LOADING, UNKNOWN):
        if state in states:
            return state
    return UNAVAILABLE


def seen_in(status: int) -> str:
    """What a response head tells of its server: llama.cpp and vLLM answer 503 while they
    load their weights; any other answer comes from a server that is up."""
    return LOADING if status == 503 else READY


@dataclass(slots=True)
class Replica:
    """One upstream of a model, with the request headers it gets."""

    index: int  # its place in the model's urls: the replica label of the metrics
    url: str  # as configured, to find its state again after a reload; never logged
    upstream: Upstream
    headers: tuple[tuple[bytes, bytes], ...]  # injected into every request, replacing the client's
    # Client headers never forwarded to it: hop-by-hop ones, those the proxy sets, those it
    # sets, and the credential headers when the router checks tokens itself.
    forwarding_drops: frozenset[bytes]
    host_header: bytes  # the Host sent upstream: a configured Host wins over the upstream's own
    state: ReplicaState
    header_lines: tuple[bytes, ...] = ()  # ``headers`` as field lines, made once

    def __post_init__(self) -> None:
        lines = tuple(name + b": " + value for name, value in self.headers)
        object.__setattr__(self, "header_lines", lines)


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    replicas: tuple[Replica, ...]  # one for a model given by url
    unlisted: bool
    affinity: bytes | None  # the lower-case header whose value keeps a client on one replica
    group: str | None  # models of one group are served one at a time
    queue_timeout: float  # how long a request may wait for its group
    upstream_idle_timeout: float  # pooled connections to it close after this
    # The provider's name for it, JSON-encoded: it replaces the body's top-level "model".
    upstream_model: bytes | None = None
    health_path: str | None = None  # probed every health_interval seconds, when set
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    metrics_path: str | None = None  # the upstream's own metrics, merged into /metrics


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client's credential: the models it may use and how many requests it may have open."""

    name: str  # for logs and metric labels; "-" for a key given as a plain token
    digest: bytes  # SHA-256 of the token, which is what a config may hold instead
    models: re.Pattern[str] | None  # the model names it may use (from globs); None: all
    max_concurrent_requests: int  # 0: no cap of its own


def token_digest(token: bytes) -> bytes:
    import hashlib  # loaded only with keys configured, as hmac is

    return hashlib.sha256(token).digest()


def glob_pattern(globs: list[str]) -> re.Pattern[str]:
    """One pattern for model-name globs: ``*`` is any run of characters, ``?`` any one."""
    translated = (
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
        for glob in globs
    )
    return re.compile("|".join(translated), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Config:
    listener: Listener
    max_body_bytes: int  # 0 = no cap
    max_concurrent_requests: int  # 0 = no cap
    api_keys: tuple[ApiKey, ...]  # none: auth off
    connect_timeout: float
    shutdown_timeout: float
    metrics_auth: bool  # whether /metrics needs a token too; by default, when tokens are set
    models: dict[str, Model]
    server_timing: bool = True  # Server-Timing on every forwarded response
    # (key path, message): what is allowed but likely a mistake, said at start and by --check.
    warnings: tuple[tuple[str, str], ...] = ()


_CONFIG_KEYS = {
    "host": str,
    "port": int,
    "listen": str,
    "maxBodyBytes": int,
    "maxConcurrentRequests": int,
    "connectTimeout": (int, float),
    "shutdownTimeout": (int, float),
    "authTokens": list,
    "metricsAuth": bool,
    "serverTiming": bool,
    "queueTimeout": (int, float),
    "upstreamIdleTimeout": (int, float),
    "models": dict,
}

_MODEL_KEYS = {
    "url": str,
    "urls": list,
    "headers": dict,
    "unlisted": bool,
    "affinity": str,
    "group": str,
    "queueTimeout": (int, float),
    "upstreamIdleTimeout": (int, float),
    "upstreamModel": str,
    "healthPath": str,
    "healthInterval": (int, float),
    "metricsPath": str,
}
_REPLICA_KEYS = {"url": str, "headers": dict}
_API_KEY_KEYS = {
    "name": str,
    "sha256": str,
    "token": str,
    "models": list,
    "maxConcurrentRequests": int,
}
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


# Header names that carry a credential: a model that sets one spends someone's account.
_CREDENTIAL_WORDS = ("auth", "key", "token", "secret")


def injected_credentials(config: Config) -> list[str]:
    """The models whose injected headers carry a credential (``Authorization``, an API key)."""
    return [
        name
        for name, model in config.models.items()
        if any(
            word in header.lower().decode("latin-1")
            for replica in model.replicas
            for header, _ in replica.headers
            for word in _CREDENTIAL_WORDS
        )
    ]


def is_loopback(host: str) -> bool:
    """Whether a listening host is this machine's loopback (or a unix socket path)."""
    return host == "localhost" or host == "::1" or host.startswith(("127.", "/"))


def open_proxy_warnings(config: Config, hosts: Iterable[str]) -> list[tuple[str, str]]:
    """A listener beyond loopback without authTokens, while models inject credentials, lends
    those credentials to anyone who reaches it."""
    exposed = [host or "every interface" for host in hosts if not is_loopback(host)]
    models = injected_credentials(config)
    if config.api_keys or not exposed or not models:
        return []
    address = exposed[0]
    names = ", ".join(models)
    message = (
        f"listening on {address}, beyond this machine's loopback, with no authTokens, while "
        f"{names} inject{'s' if len(models) == 1 else ''} credentials: anyone who reaches the "
        "router spends them. Listen on 127.0.0.1, or set authTokens"
    )
    return [("authTokens", message)]


class _JSONObject(dict[str, Any]):
    """A decoded JSON object that remembers the keys it had more than once."""

    __slots__ = ("repeated",)


def _object_noting_repeats(pairs: list[tuple[str, Any]]) -> _JSONObject:
    result = _JSONObject()
    result.repeated = []
    for key, value in pairs:
        if key in result:
            result.repeated.append(key)
        result[key] = value
    return result


def _repeated_keys(value: Any, path: str = "") -> Iterable[tuple[str, str]]:
    """A problem for each key an object of the document has twice, by its key path: JSON
    would keep the last silently."""
    if isinstance(value, _JSONObject):
        for key in dict.fromkeys(value.repeated):
            yield f"{path}.{key}" if path else key, "appears more than once in its object"
        for key, item in value.items():
            yield from _repeated_keys(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _repeated_keys(item, f"{path}[{index}]")


def _syntax_error(text: str, error: json.JSONDecodeError, source: str) -> str:
    """Where the JSON breaks: file, line and column, the line itself and a caret."""
    line = text.splitlines()[error.lineno - 1] if text.strip() else ""
    where = f"{source}:{error.lineno}:{error.colno}" if source else f"line {error.lineno}"
    return f"invalid JSON at {where}: {error.msg}\n    {line}\n    {' ' * (error.colno - 1)}^"


def _has_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true is no number here
        return expected is bool
    if expected is float or (isinstance(expected, tuple) and float in expected):
        return isinstance(value, int | float) and value == value  # NaN is no timeout
    return isinstance(value, expected)


def _type_name(expected: type | tuple[type, ...]) -> str:
    return "a number" if isinstance(expected, tuple) else _TYPE_NAMES[expected]


class _ConfigReader:
    """Walks the decoded JSON, collecting every problem with its key path."""

    def __init__(self, resolve: Callable[[str, str], str]):
        self.resolve = resolve
        self.problems: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.checks_tokens = False
        # The defaults of the models' own settings, read before the models.
        self.queue_timeout = DEFAULT_QUEUE_TIMEOUT
        self.upstream_idle_timeout = DEFAULT_UPSTREAM_IDLE_TIMEOUT

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append((path, message))

    def fields(self, obj: dict[str, Any], schema: dict[str, Any], prefix: str) -> dict[str, Any]:
        """The keys of ``obj`` that exist in ``schema`` and have the right type."""
        valid = {}
        for key, value in obj.items():
            path = f"{prefix}{key}"
            expected = schema.get(key)
            if expected is None:
                self.problem(path, f"unknown key (known: {', '.join(schema)})")
            elif not _has_type(value, expected):
                self.problem(path, f"must be {_type_name(expected)}")
            else:
                valid[key] = value
        return valid

    def secret(self, path: str, template: str) -> bytes | None:
        value, errors = expand_secrets(template, self.resolve)
        for error in errors:
            self.problem(path, error)
        if errors:
            return None
        encoded = value.encode()
        if not is_valid_field_value(encoded):
            self.problem(path, "must be a valid header value (no control characters)")
            return None
        return encoded

    def listener(self, fields: dict[str, Any]) -> Listener:
        if "listen" in fields:
            if "host" in fields or "port" in fields:
                self.problem("listen", "cannot be combined with host/port")
            return self.listen_address(fields["listen"])
        port = fields.get("port", DEFAULT_PORT)
        if not 0 <= port <= 65535:
            self.problem("port", "must be in 0..65535")
        return Listener(fields.get("host", ""), port)

    def listen_address(self, address: str) -> Listener:
        host, colon, port_text = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            colon = ""  # an IPv6 literal must be written in brackets
        if not colon or not port_text.isdigit() or int(port_text) > 65535:
            self.problem("listen", 'must be "host:port", ":port" or "[ipv6]:port"')
            return Listener("", DEFAULT_PORT)
        return Listener(host, int(port_text))

    def count(self, fields: dict[str, Any], key: str, default: int) -> int:
        value = fields.get(key, default)
        if value < 0:
            self.problem(key, "must not be negative (0 disables the limit)")
        return value

    def seconds(self, fields: dict[str, Any], key: str, default: float, prefix: str = "") -> float:
        value = float(fields.get(key, default))
        if value <= 0:
            self.problem(f"{prefix}{key}", "must be a positive number of seconds")
        return value

    def api_keys(self, entries: list[Any]) -> tuple[ApiKey, ...]:
        keys: list[ApiKey] = []
        names: dict[str, str] = {}  # key name -> where it was given
        digests: dict[bytes, str] = {}
        for index, entry in enumerate(entries):
            path = f"authTokens[{index}]"
            if isinstance(entry, str):
                key = self.plain_key(path, entry)
            elif isinstance(entry, dict):
                key = self.api_key(path, entry, names)
            else:
                self.problem(path, "must be a string (a token) or an object (a named key)")
                continue
            if key is None:
                continue
            if key.digest in digests:
                self.problem(path, f"has the same token as {digests[key.digest]}")
                continue
            digests[key.digest] = path
            keys.append(key)
        return tuple(keys)

    def plain_key(self, path: str, template: str) -> ApiKey | None:
        token = self.token(path, template)
        return None if token is None else ApiKey("-", token_digest(token), None, 0)

    def token(self, path: str, template: str) -> bytes | None:
        token = self.secret(path, template)
        if token is not None and not token:
            self.problem(path, "must not be empty")
            return None
        return token

    def api_key(self, path: str, entry: dict[str, Any], names: dict[str, str]) -> ApiKey | None:
        fields = self.fields(entry, _API_KEY_KEYS, f"{path}.")
        problems = len(self.problems)
        name = fields.get("name")
        if name is None:
            if "name" not in entry:
                self.problem(f"{path}.name", "is required")
        elif not _KEY_NAME.fullmatch(name):
            self.problem(
                f"{path}.name",
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        elif name in names:
            self.problem(f"{path}.name", f"is taken by {names[name]}")
        else:
            names[name] = path
        digest = None
        given = [key for key in ("sha256", "token") if key in entry]
        if len(given) != 1:
            self.problem(path, "needs exactly one of sha256 and token")
        elif (hexdigest := fields.get("sha256")) is not None:
            if _SHA256_HEX.fullmatch(hexdigest):
                digest = bytes.fromhex(hexdigest)
            else:
                self.problem(f"{path}.sha256", "must be 64 hex digits (llmhop hash-token)")
        elif (template := fields.get("token")) is not None and (
            token := self.token(f"{path}.token", template)
        ) is not None:
            digest = token_digest(token)
        models = None
        if (globs := fields.get("models")) is not None:
            if not globs:
                self.problem(f"{path}.models", "must not be empty (leave it out for every model)")
            for glob_index, glob in enumerate(globs):
                if not isinstance(glob, str) or not glob:
                    self.problem(f"{path}.models[{glob_index}]", "must be a non-empty string")
            if len(self.problems) == problems:
                models = glob_pattern(globs)
        limit = fields.get("maxConcurrentRequests", 0)
        if limit < 0:
            self.problem(f"{path}.maxConcurrentRequests", "must not be negative (0: no cap)")
        if len(self.problems) > problems or name is None or digest is None:
            return None
        return ApiKey(name, digest, models, limit)

    def models(self, models: dict[str, Any]) -> dict[str, Model]:
        if not models:
            self.problem("models", "no models configured")
        result = {}
        for name, entry in models.items():
            path = f"models.{name}"
            if not name:
                self.problem("models", "a model name must not be empty")
            elif not isinstance(entry, dict):
                self.problem(path, "must be an object")
            elif (model := self.model(name, entry, path)) is not None:
                result[name] = model
        return result

    def model(self, name: str, entry: dict[str, Any], path: str) -> Model | None:
        fields = self.fields(entry, _MODEL_KEYS, f"{path}.")
        problems = len(self.problems)
        if "url" not in entry and "urls" not in entry:
            self.problem(f"{path}.url", "is required (or urls, for several upstreams)")
            return None
        if "url" in entry and "urls" in entry:
            self.problem(path, "needs exactly one of url and urls")
            return None
        headers = self.model_headers(fields.get("headers", {}), f"{path}.headers")
        if "url" in fields:
            replicas = [self.replica(0, fields["url"], headers, f"{path}.url")]
        elif "urls" in fields:
            if not fields["urls"]:
                self.problem(f"{path}.urls", "must name at least one upstream")
            replicas = [
                self.replica_entry(index, element, headers, f"{path}.urls[{index}]")
                for index, element in enumerate(fields["urls"])
            ]
        else:
            return None
        affinity = None
        if (spec := fields.get("affinity")) is not None:
            kind, _, header = spec.partition(":")
            if kind != "header" or not _TOKEN.fullmatch(header.encode()):
                self.problem(f"{path}.affinity", 'must be "header:<header name>"')
            else:
                affinity = header.lower().encode()
        group = fields.get("group")
        if group is not None and not group:
            self.problem(f"{path}.group", "must not be empty")
        queue_timeout = self.seconds(fields, "queueTimeout", self.queue_timeout, f"{path}.")
        idle_timeout = self.upstream_idle_timeout
        if "upstreamIdleTimeout" in fields:
            idle_timeout = self.seconds(fields, "upstreamIdleTimeout", 0, f"{path}.")
        upstream_model = fields.get("upstreamModel")
        if upstream_model is not None and not upstream_model:
            self.problem(f"{path}.upstreamModel", "must not be empty")
        for key in ("healthPath", "metricsPath"):
            value = fields.get(key)
            if value is not None and (not value.startswith("/") or not value.isprintable()):
                self.problem(f"{path}.{key}", 'must be a path starting with "/"')
        if "healthPath" in fields and group is not None:
            # A probe is a request: it would wake a model that waits for its turn.
            self.problem(f"{path}.healthPath", "cannot be probed in a group: it would wake it")
        health_interval = self.seconds(
            fields, "healthInterval", DEFAULT_HEALTH_INTERVAL, f"{path}."
        )
        if len(self.problems) > problems or None in replicas:
            return None
        return Model(
            name,
            tuple(r for r in replicas if r is not None),
            fields.get("unlisted", False),
            affinity,
            group,
            queue_timeout,
            idle_timeout,
            None if upstream_model is None else json.dumps(upstream_model).encode(),
            fields.get("healthPath"),
            health_interval,
            fields.get("metricsPath"),
        )

    def replica_entry(
        self, index: int, element: Any, model_headers: list[tuple[bytes, bytes]], path: str
    ) -> Replica | None:
        """An element of urls: a URL, or {"url", "headers"} whose headers add to the model's
        or replace those of the same name."""
        if isinstance(element, str):
            return self.replica(index, element, model_headers, path)
        if not isinstance(element, dict):
            self.problem(path, "must be a URL or an object with url and headers")
            return None
        fields = self.fields(element, _REPLICA_KEYS, f"{path}.")
        if "url" not in fields:
            if "url" not in element:
                self.problem(f"{path}.url", "is required")
            return None
        own = self.model_headers(fields.get("headers", {}), f"{path}.headers")
        replaced = {name.lower() for name, _ in own}
        headers = [(n, v) for n, v in model_headers if n.lower() not in replaced] + own
        return self.replica(index, fields["url"], headers, f"{path}.url")

    def replica(
        self, index: int, url: str, headers: list[tuple[bytes, bytes]], path: str
    ) -> Replica | None:
        try:
            upstream = parse_upstream_url(url)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None
        if upstream.base_path.endswith("/v1"):
            # Clients name the API's own /v1 in their paths: it would be there twice.
            without = url.replace(upstream.base_path, upstream.base_path[: -len("/v1")], 1)
            self.warn(
                path,
                f"ends in /v1, so a request for /v1/chat/completions would go to "
                f"{upstream.base_path}/v1/chat/completions: write {without!r}",
            )
        header_names = frozenset(n.lower() for n, _ in headers)
        return Replica(
            index,
            url,
            upstream,
            tuple((n, v) for n, v in headers if n != b"host"),
            HOP_BY_HOP
            | REPLACED_REQUEST_HEADERS
            | header_names
            | (_CREDENTIAL_HEADERS if self.checks_tokens else set()),
            dict(headers).get(b"host") or upstream.host_header,
            ReplicaState(),
        )

    def model_headers(self, headers: dict[str, Any], prefix: str) -> list[tuple[bytes, bytes]]:
        result: list[tuple[bytes, bytes]] = []
        seen: dict[bytes, str] = {}
        for name, template in headers.items():
            path = f"{prefix}.{name}"
            raw_name = name.encode("utf-8", "replace")
            lower = raw_name.lower()
            if not _TOKEN.fullmatch(raw_name):
                self.problem(path, "is not a valid header name")
            elif lower in seen:
                self.problem(path, f"duplicates header {seen[lower]!r} (names ignore case)")
            elif lower in _MANAGED_HEADERS:
                self.problem(path, "is managed by the proxy and cannot be set")
            elif not isinstance(template, str):
                self.problem(path, "must be a string")
            elif (value := self.secret(path, template)) is not None:
                # Host is kept by its lower-case name so the caller can find it.
                result.append((lower if lower == b"host" else raw_name, value))
            seen.setdefault(lower, name)
        return result


def parse_config(text: str | bytes, resolve: Callable[[str, str], str], source: str = "") -> Config:
    """Decode and validate a config strictly; raise ConfigError naming every problem.
    ``source`` names the file in a syntax error."""
    try:
        if isinstance(text, bytes):
            text = text.decode()
        decoder = json.JSONDecoder(object_pairs_hook=_object_noting_repeats)
        start = len(text) - len(text.lstrip())
        document, end = decoder.raw_decode(text, start)
    except UnicodeDecodeError:
        raise ConfigError([("", "is not UTF-8 text")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([("", _syntax_error(text, exc, source))]) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError([("", f"invalid JSON: {exc}")]) from None
    if text[end:].strip():
        raise ConfigError([("", "multiple JSON values in config")])
    if not isinstance(document, dict):
        raise ConfigError([("", "must be a JSON object")])
    reader = _ConfigReader(resolve)
    reader.problems.extend(_repeated_keys(document))
    fields = reader.fields(document, _CONFIG_KEYS, "")
    # What models forward depends on whether the router checks tokens itself.
    reader.checks_tokens = bool(fields.get("authTokens"))
    reader.queue_timeout = reader.seconds(fields, "queueTimeout", DEFAULT_QUEUE_TIMEOUT)
    if "upstreamIdleTimeout" in fields:
        reader.upstream_idle_timeout = reader.seconds(fields, "upstreamIdleTimeout", 0)
    config = Config(
        listener=reader.listener(fields),
        max_body_bytes=reader.count(fields, "maxBodyBytes", DEFAULT_MAX_BODY_BYTES),
        max_concurrent_requests=reader.count(
            fields, "maxConcurrentRequests", DEFAULT_MAX_CONCURRENT_REQUESTS
        ),
        api_keys=reader.api_keys(fields.get("authTokens", [])),
        connect_timeout=reader.seconds(fields, "connectTimeout", DEFAULT_CONNECT_TIMEOUT),
        shutdown_timeout=reader.seconds(fields, "shutdownTimeout", DEFAULT_SHUTDOWN_TIMEOUT),
        metrics_auth=fields.get("metricsAuth", reader.checks_tokens),
        server_timing=fields.get("serverTiming", True),
        models=reader.models(fields.get("models", {})),
    )
    if reader.problems:
        raise ConfigError(reader.problems)
    return dataclasses.replace(config, warnings=tuple(reader.warnings))


def load_config(path: str, *, check_only: bool = False) -> Config:
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from None
    return parse_config(text, SecretResolver(check_only=check_only), path)


# ---------------------------------------------------------------------------------------------
# 4. Routing: what a request gets, decided from its head; the model a JSON body names
# ---------------------------------------------------------------------------------------------


_DOT_SEGMENTS = frozenset((b".", b".."))


def has_dot_segment(path: bytes) -> bool:
    """Whether a path has a "." or ".." segment (RFC 3986), percent-encoded or not.

    Such a path is refused rather than cleaned: appended to an upstream's base path, a ".."
    that an upstream or a CDN resolves would leave that base path, carrying the headers the
    router injects for it. Backslashes and encoded slashes count as separators, since some
    servers treat them so.
    """
    if b"." not in path and b"%" not in path:
        return False
    for segment in path.split(b"/"):
        if b"%" in segment:
            segment = unquote_to_bytes(segment)
        if b"." in segment and not _DOT_SEGMENTS.isdisjoint(
            segment.replace(b"\\", b"/").split(b"/")
        ):
            return True
    return False


JSON = b"application/json"


class Answer(NamedTuple):
    """An answer of the router's own, the same for every request that gets it; the models
    API's add each model's state as they go out (``models``)."""

    kind: str  # the route, as metrics and the access log name it
    body: bytes
    content_type: bytes = JSON
    models: tuple[str, ...] | None = None  # the models it describes, for the models API
    one: bool = False  # one model object, not a list


class Scrape(NamedTuple):
    """GET /metrics: ``models`` limits which models it names, ``key`` which key's series it
    shows (None: all)."""

    models: frozenset[str] | None
    key: str | None = None
    kind: str = "metrics"


class ByPath(NamedTuple):
    """Path routing: forward to ``model`` as ``target``; the body streams through unread."""

    model: Model
    target: bytes
    access: Access
    kind: str = "path"


class ByBody(NamedTuple):
    """Body routing: read the body whole, then forward to the model its JSON names, if the
    request's access allows it."""

    kind: str = "body"


_BY_BODY = ByBody()


class Refusal(NamedTuple):
    """The request is refused with ``error``; ``model`` is the name asked for, if one was."""

    kind: str
    error: HTTPError
    model: str = "-"


Route = Answer | Scrape | ByPath | ByBody | Refusal


class Access:
    """What a client may reach: the models of its key, with the answers it gets prepared.

    A key that may not use a model gets what an unknown model gets, so no key can probe which
    models exist.
    """

    __slots__ = (
        "key",
        "max_concurrent_requests",
        "model_objects",
        "models",
        "models_list",
        "name",
        "scrape",
    )

    def __init__(
        self,
        key: ApiKey | None,
        models: frozenset[str] | None,
        models_list: Answer,
        model_objects: dict[str, Answer],
        scrape: Scrape,
    ) -> None:
        self.key = key  # None when auth is off
        self.name = "-" if key is None else key.name
        self.models = models  # the model names it may use; None: all
        self.models_list = models_list
        self.model_objects = model_objects
        self.scrape = scrape
        self.max_concurrent_requests = 0 if key is None else key.max_concurrent_requests

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def carry_replica_states(old: RoutingTable, new: RoutingTable) -> None:
    """A reload keeps what the router knows of each replica that it keeps (same model, same
    URL): requests in flight, back-off, counts."""
    for name, model in new.models.items():
        previous = old.models.get(name)
        if previous is None:
            continue
        states = {replica.url: replica.state for replica in previous.replicas}
        for replica in model.replicas:
            replica.state = states.get(replica.url, replica.state)


def _models_list(objects: list[dict[str, Any]]) -> Answer:
    names = tuple(model["id"] for model in objects)
    return Answer("models", _json_bytes({"object": "list", "data": objects}), JSON, names)


def models_document(answer: Answer, table: RoutingTable, states: Callable[[str], str]) -> bytes:
    """The models API's answer with each model's state, under ``llmhop`` (OpenAI clients
    ignore fields they do not know)."""
    assert answer.models is not None
    objects = [
        {**table.objects[name], "llmhop": {"status": states(name)}} for name in answer.models
    ]
    return _json_bytes(objects[0] if answer.one else {"object": "list", "data": objects})


class RoutingTable:
    """A config with its answers prepared; replaced whole, never changed, so a reload is atomic."""

    def __init__(self, config: Config, created: int | None = None):
        self.config = config
        self.models = config.models
        created = int(time.time()) if created is None else created
        listed = sorted(name for name, model in config.models.items() if not model.unlisted)
        self.listed = frozenset(listed)
        self.groups = frozenset(m.group for m in config.models.values() if m.group is not None)
        objects = {
            name: {"id": name, "object": "model", "created": created, "owned_by": "llmhop"}
            for name in listed
        }
        self.objects = objects  # the models API's objects of the listed models, by name
        self.model_objects = {
            name: Answer("models", _json_bytes(o), JSON, (name,), one=True)
            for name, o in objects.items()
        }
        self.health = Answer("health", _json_bytes({"status": "ok", "models": len(listed)}))
        self.models_list = _models_list([objects[name] for name in listed])
        # Unlisted models are named only to a caller who showed a token: anyone else is told
        # what /v1/models would tell them, and no more.
        self.listed_scrape = Scrape(self.listed)
        self.open_access = Access(
            None, None, self.models_list, self.model_objects, self.listed_scrape
        )
        full_scrape = Scrape(None)
        self.accesses = tuple(self._access(key, objects, full_scrape) for key in config.api_keys)

    def _access(self, key: ApiKey, objects: dict[str, Any], full_scrape: Scrape) -> Access:
        if key.models is None:
            return Access(key, None, self.models_list, self.model_objects, full_scrape)
        allowed = frozenset(name for name in self.models if key.models.fullmatch(name))
        listed = sorted(allowed & self.listed)
        return Access(
            key,
            allowed,
            _models_list([objects[name] for name in listed]),
            {name: self.model_objects[name] for name in listed},
            Scrape(allowed, key.name),
        )

    def access_for(self, request: Request) -> Access | None:
        """The access a request's token gives (``Authorization: Bearer``, else ``x-api-key``);
        None without a valid one. Every request has the open access when auth is off."""
        if not self.accesses:
            return self.open_access
        token = None
        authorization = request.header(b"authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.partition(b" ")
            if scheme.lower() == b"bearer":
                token = credentials
        if token is None:
            token = request.header(b"x-api-key")
        if token is None:
            return None
        import hmac  # loaded only with keys configured: it costs 0.7 MiB of memory

        # Digests of equal length, compared with every key: the time taken tells neither
        # which key matched nor how much of a wrong token was right.
        digest = token_digest(token)
        found = None
        for access in self.accesses:
            assert access.key is not None
            if hmac.compare_digest(digest, access.key.digest):
                found = access
        return found


_READS = (b"GET", b"HEAD")
_ALLOW_READS = (b"Allow: GET, HEAD",)
_UNAUTHORIZED = HTTPError(
    401,
    "missing or invalid bearer token",
    "invalid_api_key",
    headers=(b'WWW-Authenticate: Bearer realm="llmhop"',),
)
_DOT_SEGMENT_ERROR = HTTPError(400, 'the path may not contain "." or ".." segments', "invalid_path")


# GET /ui: one page of the router's own, with everything inline (it works offline). It holds no
# data: it reads /status every two seconds, with the key it asks for once, kept in the tab.
_STATUS_PAGE = Answer(
    "ui",
    rb"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmhop</title>
<style>
  :root { color-scheme: light dark; --ok: #1a7f37; --wait: #9a6700; --bad: #cf222e;
          --dim: #6e7781; --line: #d0d7de; }
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 1rem; max-width: 60rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  #meta, .dim { color: var(--dim); font-size: .85rem; }
  table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
  th, td { text-align: left; padding: .45rem .5rem; border-bottom: 1px solid var(--line); }
  th { font-size: .8rem; text-transform: uppercase; color: var(--dim); }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .state { display: inline-block; padding: .05rem .5rem; border-radius: 1rem; font-size: .85rem;
           border: 1px solid currentColor; }
  .ready { color: var(--ok); } .loading { color: var(--wait); } .unavailable { color: var(--bad); }
  .idle, .unknown { color: var(--dim); }
  .replicas .state { font-size: .75rem; margin: 0 .2rem .2rem 0; }
  [hidden] { display: none !important; }
  form { margin-top: 1rem; display: flex; gap: .5rem; flex-wrap: wrap; }
  input { flex: 1; min-width: 12rem; padding: .4rem; font: inherit; }
  button { padding: .4rem .9rem; font: inherit; }
  #groups { margin-top: .8rem; }
  @media (max-width: 40rem) {
    thead { display: none; }
    tr { display: block; border-bottom: 1px solid var(--line); padding: .4rem 0; }
    td { display: inline-block; border: 0; padding: .15rem .4rem; }
    td[data-label]::before { content: attr(data-label) ": "; color: var(--dim); }
  }
</style>
</head>
<body>
<h1>llmhop</h1>
<div id="meta">connecting&hellip;</div>
<form id="key" hidden>
  <input id="token" type="password" autocomplete="off"
         placeholder="API key (kept in this tab only)">
  <button>Show</button>
</form>
<div id="groups"></div>
<table id="models" hidden>
  <thead><tr><th>model</th><th>state</th><th>in flight</th><th>queued</th><th>group</th>
  <th>replicas</th></tr></thead>
  <tbody></tbody>
</table>
<script>
"use strict";
const KEY = "llmhop-key";
const $ = (id) => document.getElementById(id);

function cell(row, text, label, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (label) td.dataset.label = label;
  if (className) td.className = className;
  return td;
}

function badge(state) {
  const span = document.createElement("span");
  span.className = "state " + state;
  span.textContent = state;
  return span;
}

function render(status) {
  $("key").hidden = true;
  $("models").hidden = false;
  const body = $("models").tBodies[0];
  body.replaceChildren();
  for (const [name, model] of Object.entries(status.models)) {
    const row = body.insertRow();
    row.dataset.model = name;
    cell(row, name);
    cell(row, "", "state").append(badge(model.status));
    cell(row, model.in_flight, "in flight", "n");
    cell(row, model.queued, "queued", "n");
    cell(row, model.group || "\u2014", "group");
    const replicas = cell(row, "", "replicas", "replicas");
    model.replicas.forEach((replica) => {
      const mark = badge(replica.status);
      mark.textContent = replica.status + " \u00b7 " + replica.in_flight;
      replicas.append(mark);
    });
  }
  const groups = Object.entries(status.groups).map(([name, group]) =>
    name + ": " + (group.active ? "serving " + group.active : "nothing loaded") +
    (group.queued ? ", " + group.queued + " queued" : ""));
  $("groups").textContent = groups.join(" \u00b7 ");
  $("meta").textContent = Object.keys(status.models).length + " model(s) \u00b7 llmhop " +
    status.version + " \u00b7 up " + Math.round(status.uptime_s) + " s \u00b7 " +
    new Date().toLocaleTimeString();
}

async function refresh() {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  try {
    const response = await fetch("status", { headers, cache: "no-store" });
    if (response.status === 401) {
      $("meta").textContent = key ? "that key may not see the status" : "a key is needed";
      $("key").hidden = false;
      return;
    }
    render(await response.json());
  } catch (error) {
    $("meta").textContent = "the router does not answer (" + error.message + ")";
  }
}

$("key").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("token").value.trim());
  refresh();
});
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
""",
    b"text/html; charset=utf-8",
)


def unknown_model(name: str) -> HTTPError:
    return HTTPError(404, f"unknown model {json.dumps(name)}", "model_not_found")


def route(request: Request, table: RoutingTable, access: Access | None) -> Route:
    """What a request gets, decided from its head and the access its token gives (None: no
    valid token); the order of these checks is the contract.

    /health answers anyone; then the token is checked (before any model is looked up, so
    unauthenticated clients learn nothing of the models); then the router's own routes, path
    routing, and body routing for everything else, each within what the key may use.
    """
    path, method = request.path, request.method
    if path == b"/health":
        if method in _READS:
            return table.health
        error = HTTPError(405, "use GET /health", "method_not_allowed", headers=_ALLOW_READS)
        return Refusal("health", error)
    if path == b"/ui" and method in _READS:
        return _STATUS_PAGE  # a page without data: /status, which it reads, asks for a key
    if path in (b"/metrics", b"/status") and method in _READS:
        # Both tell what the models are doing, and name them as far as the caller may see.
        scrape = access.scrape if access is not None else None
        if scrape is None and not table.config.metrics_auth:
            scrape = table.listed_scrape
        if scrape is not None:
            return scrape if path == b"/metrics" else scrape._replace(kind="status")
    if access is None:
        return Refusal("error", _UNAUTHORIZED)
    if method in _READS:
        if path == b"/v1/models":
            return access.models_list
        if path.startswith(b"/v1/models/"):
            name = unquote(path[len(b"/v1/models/") :].decode("latin-1"), errors="replace")
            answer = access.model_objects.get(name)
            return answer if answer is not None else Refusal("models", unknown_model(name))
    if path.startswith(b"/route/"):
        encoded_name, _, rest = path[len(b"/route/") :].partition(b"/")
        name = unquote(encoded_name.decode("latin-1"), errors="replace")
        if not name:
            error = HTTPError(400, "missing model name in /route/{model}/...", "missing_model")
            return Refusal("path", error)
        model = table.models.get(name)
        if model is None or not access.allows(name):
            return Refusal("path", unknown_model(name), name)
        if has_dot_segment(rest):
            return Refusal("path", _DOT_SEGMENT_ERROR, name)
        return ByPath(model, b"/" + rest + request.query, access)
    if has_dot_segment(path):
        return Refusal("body", _DOT_SEGMENT_ERROR)
    return _BY_BODY


def model_named(table: RoutingTable, name: str, access: Access) -> Model:
    """The model a JSON body names; HTTPError when there is none of that name for the key."""
    model = table.models.get(name)
    if model is None or not access.allows(name):
        raise unknown_model(name)
    return model


@dataclass(slots=True)
class BufferedBody:
    raw: bytes  # as received, framing included
    payload: bytes  # the content, for reading the model
    chunked: bool

    @property
    def length(self) -> int:
        return CHUNKED if self.chunked else len(self.raw)


# Bodies from this size on are parsed without the contents of their long strings (a long
# prompt, say): decoding those whole costs more than all else a request does.
LONG_BODY = 64 * 1024


LONG_STRING = 16 * 1024  # never below len("model"): that key must stay as it is


STRING_PIECE = 64 * 1024  # long string contents are checked in pieces this large


MAX_QUOTES_WALKED = 256  # past this many strings, json.loads is quicker than the walk


ELIDED = b"..."  # what stands in for the contents of a long string


def _piece_end(document: bytes, start: int, cut: int) -> int:
    """``cut`` moved back, if need be, so it splits neither a UTF-8 sequence nor an escape."""
    for _ in range(3):
        if 0x80 <= document[cut] < 0xC0:  # a continuation byte
            cut -= 1
    if 0x80 <= document[cut] < 0xC0:
        return start  # not UTF-8 at all
    # An escape is at most six bytes (\uXXXX), so only the last backslash of the six before
    # the cut can begin one that spans it. Backslashes pair up from the start of their run.
    backslash = document.rfind(b"\\", max(start, cut - 6), cut)
    if backslash >= 0:
        run = backslash
        while run > start and document[run - 1] == 0x5C:
            run -= 1
        if (backslash - run) % 2 == 0:
            length = 6 if document[backslash + 1] == 0x75 else 2  # \uXXXX or \n, say
            if cut < backslash + length:
                cut = backslash
    return cut


def _is_string_content(document: bytes, start: int, end: int) -> bool:
    """Whether document[start:end] is valid between the quotes of a JSON string.

    Checked by json itself, in pieces (so no copy of it all is made at once), each cut where
    it splits neither a UTF-8 sequence nor an escape.
    """
    while start < end:
        cut = min(start + STRING_PIECE, end)
        if cut < end:
            cut = _piece_end(document, start, cut)
            if cut <= start:
                return False  # no place to cut: let json.loads judge the whole
        try:
            # As json.loads decodes a UTF-8 document; cut on sequence ends, the pieces decode
            # as the whole would.
            json.loads(f'"{document[start:cut].decode("utf-8", "surrogatepass")}"')
        except ValueError:
            return False
        start = cut
    return True


def _without_long_strings(document: bytes) -> bytes | None:
    """The document with the contents of its long strings checked, then replaced by ELIDED.

    json.loads fails on the result exactly when it fails on the document, and otherwise gives
    the same values but for the replaced strings. None when there is nothing to replace, or
    when telling would take longer than parsing.

    Only quotes delimit strings, and inside them only a backslash escapes: the strings are
    found with bytes.find, each quote's escaping judged by the backslashes before it. Up to
    the first error in a document that judgement is json's own; past it, json.loads fails on
    both alike, as nothing before the error is changed but valid string contents.
    """
    if json.detect_encoding(document) != "utf-8":
        return None  # UTF-16 or -32, or a byte order mark: not worth the trouble
    parts: list[bytes] = []
    kept = 0  # document[:kept] is in parts
    position = 0
    opening = -1  # the quote that opened the string being read, or -1 outside strings
    for _ in range(MAX_QUOTES_WALKED):
        quote = document.find(b'"', position)
        if quote < 0:
            break
        position = quote + 1
        if opening < 0:
            opening = quote
            continue
        backslashes = quote
        while document[backslashes - 1] == 0x5C:  # the opening quote stops this
            backslashes -= 1
        if (quote - backslashes) % 2:
            continue  # an escaped quote, inside the string
        start = opening + 1
        opening = -1
        if quote - start > LONG_STRING:
            if not _is_string_content(document, start, quote):
                return None  # invalid: json.loads says so, and says it alike
            parts += (document[kept:start], ELIDED)
            kept = quote
    else:
        return None
    if not parts:
        return None
    parts.append(document[kept:])
    return b"".join(parts)


_scan_json_value = json.JSONDecoder().scan_once  # json.loads's own parser, called directly

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def json_document(payload: bytes) -> Any:
    """json.loads(payload), the same document or the same failure (a ValueError).

    A request body is nearly always an object in UTF-8: that one is parsed without the
    layers json.loads puts around its parser (telling the encoding apart, the Python-level
    decode), which cost more than the parse of a small body. Any other goes to json.loads.
    """
    # json.loads would take a second byte of zero for UTF-16 or UTF-32 (RFC 8259 §8.1 says
    # UTF-8, but json.loads decides what is valid here).
    if payload[:1] != b"{" or payload[1:2] == b"\x00":
        return json.loads(payload)
    text = payload.decode()
    try:
        document, end = _scan_json_value(text, 0)
    except StopIteration:
        raise ValueError("invalid JSON") from None
    if end != len(text) and _JSON_WHITESPACE.match(text, end).end() != len(text):
        raise ValueError("extra data after the JSON document")
    return document


def _parse_for_model(payload: bytes) -> Any:
    """json.loads(payload), or an equivalent document as far as ``model`` goes.

    Long strings are left out of the parse (see ``_without_long_strings``), unless ``model``
    is one of them: then the body is parsed whole after all.
    """
    shortened = _without_long_strings(payload) if len(payload) >= LONG_BODY else None
    if shortened is None:
        return json_document(payload)
    document = json_document(shortened)
    if isinstance(document, dict) and document.get("model") == ELIDED.decode():
        return json_document(payload)
    return document


def model_of_body(payload: bytes) -> str:
    """The top-level ``model`` string of a JSON body."""
    try:
        document = _parse_for_model(payload)
    except (ValueError, RecursionError):
        raise HTTPError(400, "invalid JSON request body", "invalid_json") from None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str):
        raise HTTPError(
            400, 'missing model: the JSON body needs a string "model" field', "missing_model"
        )
    if not model:
        raise HTTPError(400, "missing model: the model name is empty", "missing_model")
    return model


# What a walk over a JSON document stops at: strings, nesting, and a top-level key's end.
_JSON_STRUCTURE = re.compile(rb'["{}\[\]:,]')


def _string_end(document: bytes, opening: int) -> int:
    """The index of the quote that closes the JSON string opened at ``opening``."""
    quote = opening
    while True:
        quote = document.index(b'"', quote + 1)
        backslashes = quote
        while document[backslashes - 1] == 0x5C:
            backslashes -= 1
        if (quote - backslashes) % 2 == 0:  # not escaped
            return quote


def top_level_string_span(document: bytes, key: str) -> tuple[int, int] | None:
    """Where the string value of a JSON object's top-level ``key`` sits, quotes included: the
    last one, as json.loads keeps. The document must be valid JSON (it was parsed)."""
    found = None
    depth = 0
    in_key = False  # at depth 1, the next string is a key
    value_of: str | None = None  # at depth 1, the key whose value comes next
    position = 0
    while (match := _JSON_STRUCTURE.search(document, position)) is not None:
        at = match.start()
        char = document[at]
        position = at + 1
        if char == 0x22:  # "
            end = _string_end(document, at)
            position = end + 1
            if depth == 1 and in_key:
                value_of = json.loads(document[at:position])
                in_key = False
            elif depth == 1 and value_of is not None:
                if value_of == key:
                    found = (at, position)
                value_of = None
        elif char in b"{[":
            depth += 1
            in_key = depth == 1
        elif char in b"}]":
            depth -= 1
            if depth == 1:
                value_of = None
        elif char == 0x2C and depth == 1:  # ,
            in_key, value_of = True, None
    return found


def with_upstream_model(body: BufferedBody, upstream_model: bytes) -> BufferedBody:
    """The body with its top-level ``model`` string replaced by ``upstream_model`` (JSON),
    every other byte as it was; sent with a Content-Length, chunked or not before."""
    span = top_level_string_span(body.payload, "model")
    if span is None:
        return body
    start, end = span
    payload = body.payload[:start] + upstream_model + body.payload[end:]
    return BufferedBody(payload, payload, chunked=False)


def _too_large(cap: int) -> str:
    return f"request body too large (the limit is {cap} bytes)"


# ---------------------------------------------------------------------------------------------
# 5. Proxy header rules (RFC 9110 §7.6): the request head upstream, the response head back
# ---------------------------------------------------------------------------------------------


_RESPONSE_DROPS = HOP_BY_HOP | {b"content-length"}


def client_ip(peername: Any) -> str | None:
    """A connection's client address, as the forwarding headers name it; None on a unix socket."""
    return peername[0] if isinstance(peername, tuple) and peername else None


def _quoted(value: bytes) -> bytes:
    return b'"%s"' % value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def forwarded_value(client_ip: str | None, host: bytes | None) -> bytes:
    """The RFC 7239 Forwarded element for a request the router received over plain HTTP."""
    elements = []
    if client_ip is not None:
        node = client_ip.encode()
        elements.append(b'for="[%s]"' % node if b":" in node else b"for=" + node)
    if host is not None:
        elements.append(b"host=" + (host if _TOKEN.fullmatch(host) else _quoted(host)))
    elements.append(b"proto=http")
    return b";".join(elements)


@functools.lru_cache(maxsize=256)  # a client sends the same Host request after request
def forwarding_fields(client_ip: str | None, host: bytes | None) -> bytes:
    """The lines that tell the upstream who asked, and for which host, as the router saw it."""
    lines = [b"Forwarded: " + forwarded_value(client_ip, host)]
    if client_ip is not None:
        lines.append(b"X-Forwarded-For: " + client_ip.encode())
    if host:
        lines.append(b"X-Forwarded-Host: " + host)
    lines.append(b"X-Forwarded-Proto: http")
    return b"\r\n".join(lines)


def join_query(upstream_query: str, client_query: bytes) -> bytes:
    """The upstream's own query, then the client's, both verbatim."""
    if not upstream_query:
        return client_query
    if len(client_query) <= 1:
        return b"?" + upstream_query.encode()
    return b"?" + upstream_query.encode() + b"&" + client_query[1:]


def upstream_request_head(
    request: Request,
    replica: Replica,
    target: bytes,
    length: int,
    client_ip: str | None,
    request_id: bytes,
) -> bytes:
    """The request head as the upstream gets it (RFC 9110 §7.6).

    Hop-by-hop fields go, with those the client's Connection names; the fields the proxy sets
    itself, the model's own and (when the router checks tokens) the credentials are replaced.
    """
    upstream = replica.upstream
    if upstream.query:
        path, question, query = target.partition(b"?")
        target = path + join_query(upstream.query, question + query)
    dropped = replica.forwarding_drops
    if not dropped.issuperset(request.connection):
        dropped = dropped.union(request.connection)
    lines = [
        b"%s %s%s HTTP/1.1" % (request.method, upstream.path_prefix, target),
        b"Host: " + replica.host_header,
    ]
    lines += request.headers.without(dropped)
    lines += replica.header_lines
    # Whatever the client claimed in these is replaced by what the router saw.
    lines.append(forwarding_fields(client_ip, request.header(b"host")))
    lines.append(b"X-Request-Id: " + request_id)
    if request.upgrade is not None:
        lines += [b"Connection: Upgrade", b"Upgrade: " + request.upgrade]
    if length == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked")
    elif length or request.method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % length)
    lines += [b"", b""]
    return b"\r\n".join(lines)


def client_response_head(
    response: Response,
    request_id: bytes,
    keep_alive: bool,
    dechunk: bool,
    timing: bytes | None = None,
) -> bytes:
    """The upstream's response head as the client gets it.

    Hop-by-hop fields go; the framing is the router's own: chunked passes as chunked, or, for
    an HTTP/1.0 client (``dechunk``), the content goes out bare and the connection's end
    delimits it.
    """
    dropped = _RESPONSE_DROPS
    if not dropped.issuperset(response.connection):
        dropped = dropped.union(response.connection)
    lines = [b"HTTP/1.1 %d %s" % (response.status, response.reason)]
    lines += response.headers.without(dropped)
    if b"x-request-id" not in response.headers.lowered:
        lines.append(b"X-Request-Id: " + request_id)
    if response.length == CHUNKED and not dechunk:
        lines.append(b"Transfer-Encoding: chunked")
    elif response.length > 0:
        lines.append(b"Content-Length: %d" % response.length)
    elif response.length == 0 and (lengths := response.headers.values(b"content-length")):
        # HEAD and 304 answers describe the body they would have had.
        lines.append(b"Content-Length: " + lengths[0].split(b",")[0].strip())
    if timing is not None:
        lines.append(timing)
    if not keep_alive:
        lines.append(b"Connection: close")
    lines += [b"", b""]
    return b"\r\n".join(lines)


def server_timing(queued: float | None, connect: float | None, upstream: float) -> bytes:
    """The router's share of a response's time (W3C Server Timing), in milliseconds: waiting
    for the model's group, opening the upstream connection, and from the request going out to
    the upstream's response head."""
    if not queued and connect is None:  # the usual: no queue, a pooled connection
        return _NO_WAIT_TIMING % (upstream * 1000)
    return b"Server-Timing: queue;dur=%.1f, connect;dur=%.1f, upstream;dur=%.1f" % (
        (queued or 0.0) * 1000,
        (connect or 0.0) * 1000,
        (upstream - (connect or 0.0)) * 1000,
    )


_NO_WAIT_TIMING = b"Server-Timing: queue;dur=0.0, connect;dur=0.0, upstream;dur=%.1f"


def switching_protocols_head(response: Response) -> bytes:
    """A 101 head as the upstream sent it: its Connection and Upgrade make the switch."""
    lines = [b"HTTP/1.1 101 " + response.reason]
    lines += [n + b": " + v for n, v in response.headers]
    return b"\r\n".join([*lines, b"", b""])


# ---------------------------------------------------------------------------------------------
# 6. The OpenAI error shape of the router's own answers
# ---------------------------------------------------------------------------------------------


ERROR_TYPES = {401: "authentication_error", 502: "upstream_error", 503: "server_error"}

ERROR_TYPES[504] = ERROR_TYPES[502]


def error_body(status: int, message: str, code: str) -> bytes:
    """An OpenAI-shaped error object."""
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error"),
        "param": None,
        "code": code,
    }
    return _json_bytes({"error": error})


_PROTOCOL_ERROR_CODES = {431: "headers_too_large", 505: "http_version_not_supported"}


# ---------------------------------------------------------------------------------------------
# 7. Observability: the record of an exchange, metrics, request ids, the access log
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """What one request did, for the access log and the metrics."""

    started: float
    method: str = "-"
    path: str = "-"
    route: str = "-"  # health, metrics, models, path, body, error
    model: str = "-"
    key: str = "-"  # the name of the API key it came with
    tries: int = 1  # replicas tried
    queued_seconds: float | None = None  # how long it waited for its model's group
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float | None = None  # until the upstream's response head
    connect_seconds: float | None = None  # opening the upstream connection; None when reused
    upstream_failure: str | None = None  # connect, timeout, protocol: the upstream's fault
    request_id: bytes = b"-"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def lines(self, name: str, labels: str) -> list[str]:
        result = []
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.counts, strict=True):
            cumulative += count
            result.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        result.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        result.append(f"{name}_count{{{labels}}} {cumulative}")
        return result


_SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_THEIR_MODEL_LABEL = re.compile(r"(^|,)\s*model=")


def _labelled(sample: str, labels: str) -> str | None:
    """A sample line with ``labels`` first in its label set (a ``model`` label of its own
    becomes ``upstream_model``); None for a line that is no sample."""
    name = _SAMPLE_NAME.match(sample)
    if name is None:
        return None
    rest = sample[name.end() :]
    if rest.startswith("{"):
        theirs = _THEIR_MODEL_LABEL.sub(r"\1upstream_model=", rest[1:], count=1)
        joined = labels if theirs.lstrip().startswith("}") else f"{labels},"
        return f"{name[0]}{{{joined}{theirs}"
    return f"{name[0]}{{{labels}}}{rest}"


def merge_metrics(sources: list[tuple[str, str]]) -> str:
    """Upstreams' Prometheus texts as one, each sample given its source's labels (``model``,
    and ``replica`` of a model with several): a family's HELP and TYPE once, and all its
    samples together, as the format wants."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for labels, text in sources:
        family = ""
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2] if line.count(" ") >= 2 else ""
                heads.setdefault(family, [])
                samples.setdefault(family, [])
                kind = line[:6]
                if not any(head.startswith(kind) for head in heads[family]):
                    heads[family].append(line)
            elif line and not line.startswith("#"):
                labelled = _labelled(line, labels)
                if labelled is None:
                    continue
                # Histogram and summary samples carry suffixes; anything else is its own.
                name = labelled.partition("{")[0]
                owner = family if family and name.startswith(family) else name
                heads.setdefault(owner, [])
                samples.setdefault(owner, []).append(labelled)
    lines = [line for family in heads for line in (*heads[family], *samples[family])]
    return "".join(line + "\n" for line in lines)


UPSTREAM_METRICS_TIMEOUT = 1.0  # a scrape waits this long for the upstreams' own metrics


async def with_upstream_metrics(own: bytes, sources: list[tuple[str, Replica, str]]) -> bytes:
    """The router's metrics and, after them, the upstreams' (``sources``: labels, replica,
    path) that answered within the deadline; one that did not is left out, never the scrape."""
    answers = await asyncio.gather(
        *(ask_upstream(replica, path, UPSTREAM_METRICS_TIMEOUT) for _, replica, path in sources)
    )
    texts = [
        (labels, answer[1].decode("utf-8", "replace"))
        for (labels, _, _), answer in zip(sources, answers, strict=True)
        if answer is not None and answer[0] == 200
    ]
    return own + merge_metrics(texts).encode()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters of what the router did, rendered in the Prometheus text format.

    Only configured model and key names become label values, so clients cannot grow the
    label set.
    """

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.duration: collections.defaultdict[str, Histogram] = collections.defaultdict(Histogram)
        self.first_byte: collections.defaultdict[str, Histogram] = collections.defaultdict(
            Histogram
        )
        self.bytes_in: collections.Counter[str] = collections.Counter()
        self.bytes_out: collections.Counter[str] = collections.Counter()
        self.upstream_errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reloads: collections.Counter[str] = collections.Counter()
        self.key_requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.key_in_flight: collections.Counter[str] = collections.Counter()
        self.queue_wait: collections.defaultdict[str, Histogram] = collections.defaultdict(
            Histogram
        )

    def observe(self, exchange: Exchange, model: str) -> None:
        self.requests[model, exchange.route, exchange.status] += 1
        self.duration[model].observe(time.monotonic() - exchange.started)
        if exchange.upstream_seconds is not None:
            self.first_byte[model].observe(exchange.upstream_seconds)
        self.bytes_in[model] += exchange.bytes_in
        self.bytes_out[model] += exchange.bytes_out
        if exchange.upstream_failure is not None:
            self.upstream_errors[model, exchange.upstream_failure] += 1
        if exchange.key != "-":
            self.key_requests[exchange.key, exchange.status] += 1

    def render(
        self,
        table: RoutingTable,
        connections_opened: int,
        scrape: Scrape,
        groups: Collection[Group] = (),
        state_of: Callable[[str], str] = lambda model: UNKNOWN,
    ) -> bytes:
        """The metrics text, naming only the models and keys ``scrape`` may see."""
        shown = scrape.models
        if shown is None:
            model_count = len(table.models)

            def named(model: str) -> bool:
                return True
        else:
            model_count = len(shown)

            def named(model: str) -> bool:
                return model == "-" or model in shown

        lines = [
            "# HELP llmhop_info The running llmhop.",
            "# TYPE llmhop_info gauge",
            f'llmhop_info{{version="{VERSION}"}} 1',
            "# HELP llmhop_models Models in the routing table.",
            "# TYPE llmhop_models gauge",
            f"llmhop_models {model_count}",
            "# HELP llmhop_requests_total Requests answered, by model, route kind and status.",
            "# TYPE llmhop_requests_total counter",
        ]
        for (model, route, status), count in sorted(self.requests.items()):
            if not named(model):
                continue
            labels = f'model="{_label(model)}",route="{route}",status="{status}"'
            lines.append(f"llmhop_requests_total{{{labels}}} {count}")
        keys = {key.name for key in table.config.api_keys} | set(self.key_in_flight)
        keys.discard("-")  # keys given as plain tokens have no name to count under
        if scrape.key is not None:
            keys &= {scrape.key}
        lines += [
            "# HELP llmhop_key_requests_total Requests answered, by API key and status.",
            "# TYPE llmhop_key_requests_total counter",
        ]
        for (key, status), count in sorted(self.key_requests.items()):
            if scrape.key is None or key == scrape.key:
                labels = f'key="{_label(key)}",status="{status}"'
                lines.append(f"llmhop_key_requests_total{{{labels}}} {count}")
        lines += [
            "# HELP llmhop_key_requests_in_flight Proxied requests in flight, by API key.",
            "# TYPE llmhop_key_requests_in_flight gauge",
        ]
        for key in sorted(keys):
            lines.append(
                f'llmhop_key_requests_in_flight{{key="{_label(key)}"}} {self.key_in_flight[key]}'
            )
        lines += [
            "# HELP llmhop_requests_in_flight Proxied requests in flight, by model.",
            "# TYPE llmhop_requests_in_flight gauge",
        ]
        for model in sorted(filter(named, set(self.in_flight) | set(table.models))):
            lines.append(
                f'llmhop_requests_in_flight{{model="{_label(model)}"}} {self.in_flight[model]}'
            )
        lines += [
            "# HELP llmhop_model_status Each model's state, as the router sees it: 1 for the "
            "state it is in.",
            "# TYPE llmhop_model_status gauge",
        ]
        for model in sorted(filter(named, table.models)):
            now_in = state_of(model)
            lines += [
                f'llmhop_model_status{{model="{_label(model)}",status="{state}"}} '
                f"{int(state == now_in)}"
                for state in STATES
            ]
        for name, help_text, histograms in (
            (
                "llmhop_request_duration_seconds",
                "Time from request head to the end of the response.",
                self.duration,
            ),
            (
                "llmhop_time_to_first_byte_seconds",
                "Time from forwarding until the upstream's response head.",
                self.first_byte,
            ),
            (
                "llmhop_queue_wait_seconds",
                "Time a request waited for its model's group.",
                self.queue_wait,
            ),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for model, histogram in sorted(histograms.items()):
                if named(model):
                    lines += histogram.lines(name, f'model="{_label(model)}"')
        for name, help_text, counter in (
            ("llmhop_request_body_bytes_total", "Request body bytes received.", self.bytes_in),
            ("llmhop_response_body_bytes_total", "Response body bytes sent.", self.bytes_out),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [
                f'{name}{{model="{_label(m)}"}} {n}' for m, n in sorted(counter.items()) if named(m)
            ]
        lines += [
            "# HELP llmhop_upstream_errors_total Upstreams unreachable, slow to connect or broken.",
            "# TYPE llmhop_upstream_errors_total counter",
        ]
        for (model, kind), count in sorted(self.upstream_errors.items()):
            if named(model):
                lines.append(
                    f'llmhop_upstream_errors_total{{model="{_label(model)}",kind="{kind}"}} {count}'
                )
        lines += [
            "# HELP llmhop_queue_depth Requests waiting for their model's group.",
            "# TYPE llmhop_queue_depth gauge",
        ]
        shown_groups = [
            group
            for group in sorted(groups, key=lambda g: g.name)
            if any(named(m.name) for m in table.models.values() if m.group == group.name)
        ]
        for group in shown_groups:
            depth = collections.Counter(waiter.model for waiter in group.waiters)
            for model in sorted(filter(named, depth)):
                labels = f'group="{_label(group.name)}",model="{_label(model)}"'
                lines.append(f"llmhop_queue_depth{{{labels}}} {depth[model]}")
        lines += [
            "# HELP llmhop_group_switches_total Times a group changed its active model.",
            "# TYPE llmhop_group_switches_total counter",
        ]
        lines += [
            f'llmhop_group_switches_total{{group="{_label(group.name)}"}} {group.switches}'
            for group in shown_groups
        ]
        replicated = [
            (name, model.replicas)
            for name, model in sorted(table.models.items())
            if len(model.replicas) > 1 and named(name)
        ]
        for name, help_text, field in (
            ("llmhop_replica_requests_total", "Requests sent to each replica.", "requests"),
            ("llmhop_replica_requests_in_flight", "Requests at each replica.", "in_flight"),
            (
                "llmhop_replica_connect_failures_total",
                "Failed attempts to connect to each replica.",
                "connect_failures",
            ),
        ):
            kind = "gauge" if field == "in_flight" else "counter"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for model, replicas in replicated:
                lines += [
                    f'{name}{{model="{_label(model)}",replica="{replica.index}"}} '
                    f"{getattr(replica.state, field)}"
                    for replica in replicas
                ]
        lines += [
            "# HELP llmhop_upstream_connections_opened_total Connections opened to upstreams.",
            "# TYPE llmhop_upstream_connections_opened_total counter",
            f"llmhop_upstream_connections_opened_total {connections_opened}",
            "# HELP llmhop_config_reloads_total Config reloads, by result.",
            "# TYPE llmhop_config_reloads_total counter",
        ]
        for result in ("success", "failure"):
            lines.append(f'llmhop_config_reloads_total{{result="{result}"}} {self.reloads[result]}')
        return ("\n".join(lines) + "\n").encode()


PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def _request_id_prefix() -> bytes:
    """A random UUID (version 4) without its last 12 digits, which count requests instead.

    UUID-shaped because some servers, llama-cpp-python among them, refuse other request ids;
    a counter because drawing randomness for every request costs a system call.
    """
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-".encode()


_REQUEST_ID_PREFIX = _request_id_prefix()


_request_counter = itertools.count(1)


def request_id_for(request: Request) -> bytes:
    given = request.header(b"x-request-id")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return b"%s%012x" % (_REQUEST_ID_PREFIX, next(_request_counter))


def _loggable(text: str, limit: int = 200) -> str:
    """Client-chosen text made safe for a one-line log: no spaces, controls or runaway length."""
    if len(text) <= limit and text.isprintable() and " " not in text:
        return text
    return json.dumps(text[:limit] + ("..." if len(text) > limit else ""))


ACCESS_LOG_DELAY = 0.05  # seconds a line may wait for others to share its write
ACCESS_LOG_BATCH = 64  # lines written at once, however soon


class AccessLog:
    """One line per request on stderr, written in batches: at most ACCESS_LOG_DELAY after it
    was recorded, at once when ACCESS_LOG_BATCH lines wait, and whatever waits at shutdown.
    A write per pass of the event loop cost more than all the router's metrics (as nginx's
    ``access_log ... buffer= flush=`` does, lines share writes)."""

    def __init__(self) -> None:
        self.enabled = True
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def record(self, exchange: Exchange) -> None:
        if not self.enabled:
            return
        total = (time.monotonic() - exchange.started) * 1000
        upstream = (
            "-" if exchange.upstream_seconds is None else f"{exchange.upstream_seconds * 1000:.1f}"
        )
        queued, connect = exchange.queued_seconds, exchange.connect_seconds
        lines = self._lines
        if self._timer is None:
            # One timer at a time: a line recorded after a full batch went out is written
            # when the running timer passes, which is sooner than a timer of its own.
            self._timer = asyncio.get_running_loop().call_later(
                ACCESS_LOG_DELAY, self._timer_passed
            )
        lines.append(
            f'access: "{exchange.method} {exchange.path}" model={_loggable(exchange.model)} '
            f"key={exchange.key} route={exchange.route} status={exchange.status} "
            f"in={exchange.bytes_in} out={exchange.bytes_out} total_ms={total:.1f} "
            f"upstream_ms={upstream} id={exchange.request_id.decode('ascii', 'replace')}"
            f"{'' if connect is None else f' connect_ms={connect * 1000:.1f}'}"
            f"{'' if exchange.tries == 1 else f' tries={exchange.tries}'}"
            f"{'' if queued is None else f' queued_ms={queued * 1000:.1f}'}\n"
        )
        if len(lines) >= ACCESS_LOG_BATCH:
            self._write()

    def flush(self) -> None:
        """Write whatever waits, now (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write()

    def _timer_passed(self) -> None:
        self._timer = None
        self._write()

    def _write(self) -> None:
        if self._lines:
            sys.stderr.write("".join(self._lines))
            self._lines.clear()


# ---------------------------------------------------------------------------------------------
# 8. Upstream connections, pooled for keep-alive
# ---------------------------------------------------------------------------------------------


class WriteBatch:
    """When bytes go to the sockets: at once while one exchange is in progress, and at the end
    of the event loop's pass while several are (``defer``, which the router keeps).

    A peer asleep in its own event loop is woken by every write that reaches it; the writes of
    a pass, sent one after another, wake it once. Under load that cuts the kernel's time per
    request by about a third (for the router and its peers alike), while a lone request, which
    nothing would share a wake with, is not delayed. A transport's bytes keep their order:
    once some wait, every later write waits behind them, and ``flush`` sends them before the
    transport closes.
    """

    __slots__ = ("_pending", "defer")

    def __init__(self) -> None:
        self.defer = False
        self._pending: dict[asyncio.Transport, list[bytes]] = {}

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        waiting = self._pending.get(transport)
        if waiting is not None:
            waiting.append(data)
        elif self.defer:
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._end_of_pass)
            self._pending[transport] = [data]
        else:
            transport.write(data)

    def flush(self, transport: asyncio.Transport) -> None:
        """Send what waits for ``transport`` now: before it closes or ends its stream."""
        waiting = self._pending.pop(transport, None)
        if waiting is not None:
            _send_waiting(transport, waiting)

    def _end_of_pass(self) -> None:
        pending, self._pending = self._pending, {}
        for transport, waiting in pending.items():
            _send_waiting(transport, waiting)


def _send_waiting(transport: asyncio.Transport, waiting: list[bytes]) -> None:
    if transport.is_closing():
        return  # the peer went away meanwhile: nothing can reach it
    try:
        for data in waiting:  # as written: a large body is not copied to be joined
            transport.write(data)
    except Exception as exc:  # a bug must cost one connection, never the others' writes
        log(f"internal error writing to a connection: {exc!r}")
        transport.abort()


class UpstreamError(Exception):
    """The upstream could not be reached, or broke HTTP; the request gets a 502 or 504."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UpstreamConnection(asyncio.Protocol):
    """A connection to one upstream; between exchanges it waits, silent, in the pool.

    While it carries an exchange, every event goes to its ``handler``: the exchange's
    ``Forward``, or after 101 Switching Protocols its ``Tunnel``.
    """

    __slots__ = ("buffer", "closed", "handler", "idle_until", "readable", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()  # received, not yet relayed: a head in the making, say
        self.closed = False
        self.handler: Forward | Tunnel | None = None
        self.idle_until = math.inf  # while pooled: when it is closed unless used again
        self.readable = select.poll()  # asks the socket, not the loop, whether it has news

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a transport of the tests' own may have none
            self.readable.register(sock.fileno(), select.POLLIN)

    def said_something(self) -> bool:
        """Whether the upstream closed or sent bytes since the loop last looked: either way an
        idle connection cannot carry a request. Asked right before reuse, it narrows the race
        with a server closing an idle connection to the time a request takes to write."""
        return bool(self.readable.poll(0))

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            self.close()  # an idle upstream that speaks cannot be trusted with a request
            return
        try:
            handler.upstream_data(data)
        except Exception as exc:  # a bug must cost one connection, never the server
            handler.client.internal_error(exc)

    def eof_received(self) -> bool:
        # Only a tunnel keeps the other direction open; otherwise the transport closes.
        return self.handler is not None and self.handler.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        handler = self.handler
        if handler is not None:
            try:
                handler.upstream_closed(exc)
            except Exception as error:
                handler.client.internal_error(error)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.client.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _reason(exc: Exception) -> str:
    """Why connecting failed, in words that name no address."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or 'handshake'})"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own wording names the address
    return "connection failed"


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The one TLS client context of every upstream connection, pooled or on the side: making
    one loads the system's CA certificates."""
    return ssl.create_default_context()


ASIDE_LIMIT = 4 * 1024 * 1024  # what a probe or a metrics fetch reads of an answer, at most


async def ask_upstream(replica: Replica, path: str, timeout: float) -> tuple[int, bytes] | None:
    """GET ``path`` of a replica on a connection of its own, outside the pool and the
    requests' slots: (status, body), or None when it cannot be reached in time or answers
    out of HTTP. Asked as HTTP/1.0, so the body is framed by its length or the connection's
    end, never chunked."""
    upstream = replica.upstream
    head = b"GET %s%s HTTP/1.0\r\nHost: %s\r\nUser-Agent: llmhop/%s\r\n" % (
        upstream.path_prefix,
        path.encode(),
        replica.host_header,
        VERSION.encode(),
    )
    head += b"".join(line + b"\r\n" for line in replica.header_lines) + b"\r\n"
    writer = None
    try:
        async with asyncio.timeout(timeout):
            if upstream.scheme == "unix":
                reader, writer = await asyncio.open_unix_connection(upstream.host)
            else:
                context = tls_context() if upstream.scheme == "https" else None
                reader, writer = await asyncio.open_connection(
                    upstream.host, upstream.port, ssl=context
                )
            writer.write(head)
            answered = await reader.readuntil(b"\r\n\r\n")
            response = parse_response_head(answered[:-4], b"GET")
            if response.length == CHUNKED or response.length > ASIDE_LIMIT:
                return None
            if response.length == UNTIL_CLOSE:
                body = b""
                while len(body) < ASIDE_LIMIT and (more := await reader.read(ASIDE_LIMIT)):
                    body += more
            else:
                body = await reader.readexactly(response.length)
            return response.status, body
    except Exception:  # unreachable, slow or broken: all the same here
        return None
    finally:
        if writer is not None:
            writer.close()


class UpstreamPool:
    """Idle keep-alive connections per upstream, reused most-recent first.

    A model may ask that its idle connections close after a while: a worker that stops when
    unused (socket-activated, say) would otherwise never see the router let go of it.
    """

    def __init__(self) -> None:
        self.idle: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self.opened = 0  # connections opened since start, for metrics and benchmarks
        self._sweep: asyncio.TimerHandle | None = None  # closes idle connections when due
        self._sweep_at = math.inf

    def take(self, upstream: Upstream) -> UpstreamConnection | None:
        """An idle connection to the upstream that is still open, if there is one: the
        socket is asked right before, since a server may close an idle connection any time."""
        idle = self.idle.get(upstream.pool_key)
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if not connection.said_something():
                return connection
            connection.close()
        return None

    def release(
        self, upstream: Upstream, connection: UpstreamConnection, idle_timeout: float
    ) -> None:
        connection.handler = None
        idle = self.idle.setdefault(upstream.pool_key, [])
        if len(idle) < MAX_IDLE_UPSTREAM_CONNECTIONS and not connection.closed:
            assert connection.transport is not None
            connection.transport.resume_reading()  # to notice the upstream closing it
            idle.append(connection)
            connection.idle_until = time.monotonic() + idle_timeout
            if connection.idle_until < self._sweep_at:
                self._schedule_sweep(connection.idle_until)
        else:
            connection.close()

    def close_idle(self, upstreams: Iterable[Upstream]) -> None:
        """Close the idle connections to these upstreams (a model its group leaves, say)."""
        for upstream in upstreams:
            for connection in self.idle.pop(upstream.pool_key, ()):
                connection.close()

    def _schedule_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        loop = asyncio.get_running_loop()
        self._sweep_at = when
        self._sweep = loop.call_at(loop.time() + max(when - time.monotonic(), 0.0), self._swept)

    def _swept(self) -> None:
        self._sweep, self._sweep_at = None, math.inf
        now = time.monotonic()
        due = math.inf
        for key, idle in list(self.idle.items()):
            kept = [c for c in idle if not c.closed and c.idle_until > now]
            for connection in idle:
                if connection.idle_until <= now:
                    connection.close()
            self.idle[key] = kept
            due = min([due, *(c.idle_until for c in kept)])
        if due < math.inf:
            self._schedule_sweep(due)

    def close(self) -> None:
        for idle in self.idle.values():
            for connection in idle:
                connection.close()
        self.idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep, self._sweep_at = None, math.inf

    async def open(self, upstream: Upstream, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if upstream.scheme == "unix":
                    _, connection = await loop.create_unix_connection(
                        UpstreamConnection, upstream.host
                    )
                else:
                    _, connection = await loop.create_connection(
                        UpstreamConnection,
                        upstream.host,
                        upstream.port,
                        ssl=tls_context() if upstream.scheme == "https" else None,
                    )
        except TimeoutError:
            raise UpstreamError(504, f"connecting to the upstream took over {timeout:g}s") from None
        except Exception as exc:  # whatever connecting raises is a 502, never a hang
            # The client learns the kind of failure; the upstream's address goes to the log.
            log(f"cannot connect to {upstream}: {exc!r}")
            raise UpstreamError(502, f"cannot connect to the upstream: {_reason(exc)}") from None
        self.opened += 1
        return connection


# ---------------------------------------------------------------------------------------------
# 9. The client connection: groups, its phase, keep-alive, request bodies, its own answers
# ---------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """Chunked content grew past the cap; ``taken`` bytes of the data were the body's."""

    def __init__(self, taken: int = 0) -> None:
        super().__init__()
        self.taken = taken


class ClientGone(Exception):
    pass


class BodyReader(NamedTuple):
    """Who reads a request body now: where its pieces go and what happens at its end."""

    on_data: Callable[[bytes], None] | None  # None: the bytes are dropped
    on_done: Callable[[], None]
    cap: int  # on chunked content; a declared length is refused before reading
    exchange: Exchange | None = None  # where received bytes are counted, if anywhere
    payload: list[bytes] | None = None  # the content, de-chunked, when wanted


class RequestBody(Framing):
    """A request's body on the client connection: one framing from its first byte to its
    last, whatever becomes of the bytes (forwarded, held for routing, or skipped), and who reads
    it now.

    It alone says where the next request starts. A reader that stops early (a body over the
    cap, an upstream gone) leaves the framing where the body stands: the rest is then skipped
    by that framing, or the connection closes after its answer. Body bytes are never read as
    a request (RFC 9112 §6.3, §11.2).
    """

    __slots__ = ("reader",)

    def __init__(self, length: int) -> None:
        Framing.__init__(self, length)
        self.reader: BodyReader | None = None  # None: nobody reads it now

    def skippable(self) -> bool:
        """Whether the rest is small enough to read and drop, keeping the connection: a
        declared length with at most MAX_DISCARD_BYTES left; chunked content is read at most
        MAX_DISCARD_BYTES further (``skip`` sets that cap)."""
        return self.remaining <= MAX_DISCARD_BYTES

    def skip(self, on_done: Callable[[], None]) -> None:
        """Read the rest and drop it, by the same framing."""
        self.reader = BodyReader(None, on_done, self.content_size + MAX_DISCARD_BYTES)

    def take(self, data: bytes) -> int:
        """Take the body's bytes from ``data``: how many belong to it. BodyTooLarge past the
        cap (after the bytes are taken, so the framing stays where the body stands)."""
        reader = self.reader
        assert reader is not None
        end = self.feed(data, reader.payload)
        if reader.exchange is not None:
            reader.exchange.bytes_in += end
        if reader.cap and self.content_size > reader.cap:
            raise BodyTooLarge(end)
        return end


class Waiter:
    """A request waiting for its model's group to let it in."""

    __slots__ = ("admit", "admitted", "model", "on_busy", "on_turn", "queued_at", "timer", "waited")

    def __init__(
        self,
        model: str,
        admit: Callable[[], None],
        timer: asyncio.TimerHandle,
        on_turn: Callable[[], None],
        on_busy: Callable[[str | None], None],
    ) -> None:
        self.model = model
        self.admit = admit  # called (soon, from the event loop) when the request may go
        self.timer = timer  # its queue timeout
        self.on_turn = on_turn  # the request's own, when its turn came
        self.on_busy = on_busy  # the request's own, when the queue timeout passed
        self.queued_at = time.monotonic()
        self.waited: float | None = None  # seconds, once it stopped waiting
        self.admitted = False  # let in, and counted in flight, but not yet going


class Group:
    """Models that share a group (a GPU, say) are served one at a time.

    While the active model has requests in flight, a request for another model waits; when
    the last of them ends, the group switches to the model of the longest-waiting request
    and lets in every request already waiting for it. Requests for the active model that
    arrive while anyone waits queue too, so a steady stream cannot starve a waiting model.
    The state outlives reloads: a queue is never dropped.
    """

    __slots__ = ("active", "in_flight", "name", "on_switch", "switches", "waiters")

    def __init__(self, name: str, on_switch: Callable[[str | None, str], None]) -> None:
        self.name = name
        self.active: str | None = None  # the model that may have requests in flight
        self.in_flight = 0  # its requests in flight
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.switches = 0
        self.on_switch = on_switch  # told (from, to) when the active model changes

    def enter(self, model: str) -> bool:
        """Let a request in at once (True), or tell it to queue (False)."""
        if self.waiters:
            return False
        if model != self.active:
            if self.in_flight:
                return False
            self._activate(model)
        self.in_flight += 1
        return True

    def wait(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)

    def leave(self, waiter: Waiter) -> None:
        """A waiter gives up (timed out, or its client left): those behind it may go now."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
        self._let_in_next()

    def release(self) -> None:
        """A request of the active model ended."""
        self.in_flight -= 1
        self._let_in_next()

    def disband(self) -> None:
        """The group is gone from the config: its waiters go to their models unhindered."""
        while self.waiters:
            waiter = self.waiters.popleft()
            self.in_flight += 1
            _admit(waiter)

    def _let_in_next(self) -> None:
        """Let in every waiter for the model at the head of the queue, if it may go: the
        active model at once, another once the active one has nothing in flight."""
        if not self.waiters:
            return
        model = self.waiters[0].model
        if model != self.active:
            if self.in_flight:
                return
            self._activate(model)
        staying = collections.deque()
        for waiter in self.waiters:
            if waiter.model == model:
                self.in_flight += 1
                _admit(waiter)
            else:
                staying.append(waiter)
        self.waiters = staying

    def _activate(self, model: str) -> None:
        previous, self.active = self.active, model
        if previous is not None:
            self.switches += 1
        self.on_switch(previous, model)


def _admit(waiter: Waiter) -> None:
    waiter.admitted = True
    waiter.timer.cancel()
    # Not from inside the call that released the group: the admitted request starts afresh.
    asyncio.get_running_loop().call_soon(waiter.admit)


class Admission:
    """A proxied request's hold on what requests share: the router's slot, its key's slot,
    and, in a group, its turn or its place in the queue.

    Taken whole by ``RouterState.admit``; given back whole, once, by ``release``, whoever
    ends the request: its forward, the tunnel it became, or the queue it left.
    """

    __slots__ = ("going", "group", "key", "model", "released", "router", "waiter")

    def __init__(self, router: RouterState, model: str, key: str, *, going: bool) -> None:
        self.router = router
        self.model = model
        self.key = key
        self.group: Group | None = None
        self.waiter: Waiter | None = None  # once it queued for its group
        self.going = going  # let through to the upstream: in flight to its model
        self.released = False
        if going:
            router.metrics.in_flight[model] += 1

    @property
    def waiting(self) -> bool:
        return self.waiter is not None and self.waiter.waited is None

    def enter(self, group: Group) -> bool:
        """Take the group's turn at once (True), or be told to queue (False)."""
        self.group = group
        return group.enter(self.model)

    def queue(
        self, timeout: float, on_turn: Callable[[], None], on_busy: Callable[[str | None], None]
    ) -> None:
        """Wait for the group's turn: ``on_turn`` when it comes; past ``timeout`` the place
        is given up and ``on_busy`` is told which model the group was serving."""
        assert self.group is not None
        timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)
        self.waiter = Waiter(self.model, self._turn_came, timer, on_turn, on_busy)
        self.group.wait(self.waiter)

    def go(self) -> None:
        self.going = True
        self.router.metrics.in_flight[self.model] += 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        router = self.router
        router.in_flight -= 1
        router.metrics.key_in_flight[self.key] -= 1
        if self.going:
            router.metrics.in_flight[self.model] -= 1
        group, waiter = self.group, self.waiter
        if waiter is not None:
            waiter.timer.cancel()
            self._stop_waiting()
        if group is not None:
            if waiter is not None and not waiter.admitted:
                group.leave(waiter)
            else:
                group.release()

    def _stop_waiting(self) -> None:
        waiter = self.waiter
        if waiter is not None and waiter.waited is None:
            waiter.waited = waited = time.monotonic() - waiter.queued_at
            self.router.metrics.queue_wait[self.model].observe(waited)

    def _turn_came(self) -> None:
        if self.released:
            return  # gave up meanwhile, and gave the turn back
        self._stop_waiting()
        assert self.waiter is not None
        self.waiter.on_turn()

    def _timed_out(self) -> None:
        waiter = self.waiter
        if self.released or waiter is None or waiter.admitted:
            return
        assert self.group is not None
        active = self.group.active
        self.release()
        waiter.on_busy(active)


class Deadline:
    """One timer for a connection's deadlines, one after another (a head's, a skipped body's,
    an idle connection's): moving a deadline later costs no new timer, since the timer re-arms
    itself when it fires early. An action that raises goes to ``on_error``."""

    __slots__ = ("action", "loop", "on_error", "timer", "timer_when", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[Exception], None]):
        self.loop = loop
        self.on_error = on_error
        self.action: Callable[[], None] | None = None
        self.when = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0

    def set(self, delay: float, action: Callable[[], None]) -> None:
        when = self.loop.time() + delay
        self.when = when
        self.action = action
        if self.timer is None or self.timer_when > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(when, self._passed)
            self.timer_when = when

    def clear(self) -> None:
        self.action = None

    def cancel(self) -> None:
        self.action = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _passed(self) -> None:
        self.timer = None
        action = self.action
        if action is None:
            return
        if self.when > self.timer_when:  # moved later meanwhile
            self.timer = self.loop.call_at(self.when, self._passed)
            self.timer_when = self.when
            return
        self.action = None
        try:
            action()
        except Exception as exc:
            self.on_error(exc)


class Phase:
    """Where a client connection stands in its exchanges, which says where its bytes go."""

    IDLE = 0  # between requests: bytes are buffered until a head begins
    HEAD = 1  # a head has begun; it must arrive whole within the head timeout
    EXCHANGE = 2  # a request is served; while its body is read, bytes go to ``body``
    TUNNEL = 3  # after 101 Switching Protocols: bytes go to the upstream, unread


class ClientConnection(asyncio.Protocol):
    """One client connection, request after request, driven by the event loop's callbacks.

    Requests are parsed from ``buffer`` as bytes arrive, and ``route`` says what each gets: an
    answer of the router's own at once, or a ``Forward`` that relays the upstream's answer as
    it comes. One exchange at a time: a pipelined request waits in ``buffer`` meanwhile.

    Every exchange ends in ``_end_exchange``, which serves the next request or closes;
    whether it may go on is decided by ``decide_keep_alive`` alone.
    """

    def __init__(self, router: RouterState) -> None:
        self.router = router
        self.writes = router.writes  # this connection's and its forwards' writes go through it
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # until connected
        self.buffer = bytearray()
        self.client_ip: str | None = None  # until connected
        self.phase = Phase.IDLE
        self.keep_alive = True  # once False, the connection closes after the current answer
        self.busy = False  # between the first byte of a request and the end of its response
        self.closed = False
        self.eof = False  # the client will send nothing more: it half-closed, or left
        self.gone = False  # the client left before its answer was complete
        # The exchange in progress: its request, the table it started with, and how far its
        # body has been read.
        self.request: Request | None = None
        self.exchange: Exchange | None = None
        self.table: RoutingTable = router.table
        self.access: Access | None = None  # what the request's token gives
        self.body: RequestBody | None = None  # the request's body, if it has one
        self.forward: Forward | None = None
        self.tunnel: Tunnel | None = None
        self.admission: Admission | None = None  # of a proxied request
        self.aside: asyncio.Task[bytes] | None = None  # an answer being made on the side
        self._answer_after_body: Callable[[], None] | None = None
        self._dispatching = False
        self._leaving: asyncio.TimerHandle | None = None
        self.deadline = Deadline(self.loop, self.internal_error)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self.client_ip = client_ip(transport.get_extra_info("peername"))
        router = self.router
        router.connections.add(self)
        router.no_connections.clear()
        if router.draining:
            self.close_gracefully()
        else:
            self.deadline.set(router.idle_timeout, self.close)

    def data_received(self, data: bytes) -> None:
        try:
            if self.body is not None and self.body.reader is not None:
                self._read_body(data)
            elif self.phase == Phase.TUNNEL:
                assert self.tunnel is not None
                self.tunnel.client_data(data)
            else:
                self.buffer += data
                if self.phase != Phase.EXCHANGE:
                    self._serve_next()
                elif len(self.buffer) > MAX_PIPELINED_BYTES:
                    self.transport.pause_reading()  # pipelined requests wait their turn
        except Exception as exc:  # a bug must cost one connection, never the server
            self.internal_error(exc)

    def eof_received(self) -> bool:
        self.eof = True
        try:
            if self.phase == Phase.TUNNEL:
                assert self.tunnel is not None
                self.tunnel.client_eof()
            elif self.body is not None and self.body.reader is not None:
                self._exchange_failed(ClientGone())
            elif self.phase != Phase.EXCHANGE:
                self._serve_next()  # an incomplete head is an error, none at all the end
            elif self.admission is not None and self.admission.waiting:
                # Nothing went upstream: a queued client that half-closes is taken as gone,
                # rather than switch a GPU's model for an answer nobody may read.
                self._client_left()
            elif self.forward is not None and not self.buffer and self._leaving is None:
                # The request is whole, so the client leaving is all this can mean, or a
                # half-close: answers that come within the grace still reach the latter.
                grace = self.forward.sent_at + CLIENT_EOF_GRACE - time.monotonic()
                self._leaving = self.loop.call_later(max(grace, 0.0), self._client_left)
        except Exception as exc:
            self.internal_error(exc)
        return True  # keep the write side open for the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        router = self.router
        router.connections.discard(self)
        if not router.connections:
            router.no_connections.set()
        self.deadline.cancel()
        try:
            if self.exchange is not None:
                self._client_left()
            else:
                self._set_busy(False)
        except Exception as error:
            self.internal_error(error)

    def pause_writing(self) -> None:
        source = self.forward or self.tunnel
        if source is not None and source.upstream is not None:
            assert source.upstream.transport is not None
            source.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        source = self.forward or self.tunnel
        if source is not None and source.upstream is not None:
            assert source.upstream.transport is not None
            source.upstream.transport.resume_reading()

    # -- the connection -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.writes.write(self.transport, data)

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close_gracefully(self) -> None:
        """Close once what was written has gone out."""
        if self.transport is not None:
            self.writes.flush(self.transport)
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.writes.flush(self.transport)
            self.transport.abort()

    def internal_error(self, exc: Exception) -> None:
        """A bug met on this connection: it costs the connection, never the server."""
        log(f"internal error on a client connection: {exc!r}")
        if self.forward is not None:
            self.forward.cancel()
        if self.tunnel is not None:
            self.tunnel.close()
        self.close()

    def _set_busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            if busy:
                self.router.exchange_started()
            else:
                self.router.exchange_finished()

    # -- keep-alive -----------------------------------------------------------------------------

    def decide_keep_alive(self, *, response_closes: bool = False) -> bool:
        """Whether the connection carries another request after the response going out now.

        Every response asks here as its head is written, so the rules sit together; once no,
        a connection stays no (``_must_close``), and ``_end_exchange`` closes it.
        """
        request = self.request
        assert request is not None
        if (
            # HTTP/1.0, or the client asked to close (RFC 9112 §9.3).
            not request.keep_alive
            # Unread body bytes would be taken for the next request (RFC 9112 §9.3): a body
            # is read, skipped or the connection closes.
            or (self.body is not None and not self.body.done)
            # A response body delimited by the connection closing (RFC 9112 §6.3).
            or response_closes
            # Shutting down: no further requests (RFC 9112 §9.6).
            or self.router.draining
        ):
            self._must_close()
        return self.keep_alive

    def _must_close(self) -> None:
        """No further request on this connection: the other rules, each where it arises, are
        a broken message (RFC 9112 §2.2), a response cut off (only closing tells the client),
        a client that left, and a switch of protocols (RFC 9110 §7.8)."""
        self.keep_alive = False

    # -- one exchange ---------------------------------------------------------------------------

    def _serve_next(self) -> None:
        """Serve the requests that have arrived whole, one at a time."""
        if self._dispatching:
            return  # an exchange ended inside this loop, which goes on by itself
        self._dispatching = True
        try:
            # Once the connection is to close, nothing after the current request is served.
            while self.phase < Phase.EXCHANGE and self.keep_alive and not self.closed:
                if not self.buffer:
                    if self.eof:
                        self.close_gracefully()
                    return
                if self.router.draining:
                    self.close_gracefully()
                    return
                self._set_busy(True)
                try:
                    head = take_head(self.buffer)
                    if head is None and self.eof:
                        raise ProtocolError(400, "connection closed inside a message head")
                except ProtocolError as exc:
                    self._reject_message(exc, Exchange(time.monotonic()))
                    return
                if head is None:
                    if self.phase == Phase.IDLE:
                        self.phase = Phase.HEAD
                        self.deadline.set(self.router.head_timeout, self.close_gracefully)
                    return
                self.deadline.clear()
                self._start_exchange(head)
        finally:
            self._dispatching = False

    def _start_exchange(self, head: bytes) -> None:
        exchange = Exchange(time.monotonic())
        try:
            request = parse_request_head(head)
        except ProtocolError as exc:
            self._reject_message(exc, exchange)
            return
        exchange.method = request.method.decode("latin-1")
        exchange.path = request.path.decode("latin-1")
        exchange.request_id = request_id_for(request)
        self.phase = Phase.EXCHANGE
        self.request = request
        self.exchange = exchange
        self.body = RequestBody(request.length) if request.length else None
        self.table = table = self.router.table  # this request keeps the table it started with
        self.access = access = table.access_for(request) if table.accesses else table.open_access
        if access is not None:
            exchange.key = access.name
        try:
            self._serve(route(request, table, access), request, exchange)
        except Exception as exc:
            self._exchange_failed(exc)

    def _serve(self, decision: Route, request: Request, exchange: Exchange) -> None:
        exchange.route = decision.kind
        if type(decision) is ByBody:
            self._read_body_for_routing(request, exchange)
        elif type(decision) is ByPath:
            exchange.model = decision.model.name
            self._proxy(decision.model, decision.target, None)
        elif type(decision) is Answer:
            body = decision.body
            if decision.models is not None:
                body = models_document(decision, self.table, self.router.state_of)
            self._answer(200, body, decision.content_type)
        elif type(decision) is Scrape:
            router = self.router
            if decision.kind == "status":
                self._answer(200, router.status_document(self.table, decision.models), JSON)
                return
            metrics = router.metrics.render(
                self.table, router.pool.opened, decision, router.groups.values(), router.state_of
            )
            sources = router.metrics_sources(self.table, decision.models)
            if sources:
                self._answer_later(with_upstream_metrics(metrics, sources), PROMETHEUS_TEXT)
            else:
                self._answer(200, metrics, PROMETHEUS_TEXT)
        else:
            assert type(decision) is Refusal
            exchange.model = decision.model
            self._refuse(decision.error)

    def _exchange_failed(self, exc: Exception) -> None:
        """End the exchange in progress on an error, as far as it got."""
        if self._answer_after_body is not None:
            # Only the unread body before an answer of our own broke: answer, then close.
            send, self._answer_after_body = self._answer_after_body, None
            send()
            return
        if self.forward is not None:
            self.forward.cancel()
        if isinstance(exc, BodyTooLarge):
            cap = self.table.config.max_body_bytes
            exc = HTTPError(413, _too_large(cap), "request_too_large")
        if isinstance(exc, HTTPError):
            self._refuse(exc)
        elif isinstance(exc, ProtocolError):
            assert self.exchange is not None
            self._reject_message(exc, self.exchange)
        elif isinstance(exc, ClientGone | ConnectionError):
            self._client_left()
        else:
            raise exc

    def _client_left(self) -> None:
        self._leaving = None
        self.gone = True
        self._must_close()
        if self.forward is not None:
            self.forward.cancel()
        if self.tunnel is not None:
            self.tunnel.close()
        if self.exchange is not None:
            self._end_exchange()

    def _end_exchange(self) -> None:
        """The exchange is over, answered or not: log it, then serve the next request or close."""
        exchange = self.exchange
        assert exchange is not None
        if self.transport.is_closing() and not self.gone:
            # A write failed: the client left while its answer went out.
            self.gone = True
            self._must_close()
        if self.gone and exchange.status == 0:
            exchange.status = 499  # nginx's "client closed request"
        admission = self.admission
        if admission is not None:
            # Whatever ended the exchange, what it held is given back (once: the forward or
            # the tunnel usually did so already).
            if not admission.released:
                admission.release()
            if admission.waiter is not None:
                exchange.queued_seconds = admission.waiter.waited
        self.request = self.exchange = self.forward = self.tunnel = self.body = None
        self.admission = None
        self._answer_after_body = None
        self.phase = Phase.IDLE
        if self._leaving is not None:
            self._leaving.cancel()
            self._leaving = None
        self._set_busy(False)
        self.router.record(exchange, self.access)
        if not self.keep_alive or self.closed:
            self.close_gracefully()
            return
        self.deadline.set(self.router.idle_timeout, self.close)
        self.resume_reading()
        self._serve_next()

    # -- request bodies -------------------------------------------------------------------------

    def _read_body_for_routing(self, request: Request, exchange: Exchange) -> None:
        """Body routing: the body is read whole, then its ``model`` says where it goes."""
        body = self.body
        if body is None:  # no body: the model it lacks is the error
            self._proxy_by_body(BufferedBody(b"", b"", chunked=False))
            return
        length = request.length
        cap = self.table.config.max_body_bytes
        if length > 0 and cap and length > cap:
            raise BodyTooLarge
        if 0 < length <= len(self.buffer):
            # Small bodies usually arrive with their head: take them as they are.
            raw = bytes(self.buffer[:length])
            del self.buffer[:length]
            self.body = None  # taken whole with its head: nothing of it is left unread
            exchange.bytes_in += length
            self._proxy_by_body(BufferedBody(raw, raw, chunked=False))
            return
        wire: list[bytes] = []
        payload: list[bytes] | None = [] if length == CHUNKED else None

        def whole() -> None:
            raw = b"".join(wire)
            content = raw if payload is None else b"".join(payload)
            self._proxy_by_body(BufferedBody(raw, content, payload is not None))

        body.reader = BodyReader(wire.append, whole, cap, exchange, payload)
        self._start_body()

    def _proxy_by_body(self, body: BufferedBody) -> None:
        try:
            name = model_of_body(body.payload)
            assert self.exchange is not None and self.request is not None
            self.exchange.model = name
            assert self.access is not None  # body routing needs a valid token
            model = model_named(self.table, name, self.access)
            if model.upstream_model is not None:
                body = with_upstream_model(body, model.upstream_model)
            self._proxy(model, self.request.target, body)
        except Exception as exc:
            self._exchange_failed(exc)

    def _start_body(self) -> None:
        """Read the request body from here on; what is buffered already goes first."""
        body, request = self.body, self.request
        assert body is not None and body.reader is not None and request is not None
        if request.expect_continue:
            # A body is skipped only without Expect, so this goes out once.
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            self._read_body(data)
        if self.body is body and body.reader is not None and self.eof:
            # The client's stream ended before the reading began (an upstream connection was
            # being opened, say): what is buffered was all there was to read.
            self._exchange_failed(ClientGone())

    def _read_body(self, data: bytes) -> None:
        body = self.body
        assert body is not None
        try:
            end = body.take(data)
        except BodyTooLarge as exc:
            self.buffer += data[exc.taken :]  # the next request, if the body ended here
            body.reader = None
            self._exchange_failed(exc)
            return
        except ProtocolError as exc:
            body.reader = None
            self._exchange_failed(exc)
            return
        if end < len(data):
            self.buffer += data[end:]  # the start of the next request
            data = data[:end]
        reader = body.reader
        assert reader is not None
        done = body.done
        if done:
            body.reader = None
        if data and reader.on_data is not None:
            reader.on_data(data)
        if done:
            reader.on_done()

    # -- what the forward asks of the client connection -------------------------------------------

    def stream_body_to(self, forward: Forward) -> None:
        """Send the request body on to the upstream as it arrives; the forward owns the end."""
        assert self.request is not None
        body = self.body
        assert body is not None
        cap = self.table.config.max_body_bytes
        body.reader = BodyReader(forward.send_body, forward.body_sent, cap, self.exchange)
        self._start_body()

    def stop_reading_body(self) -> None:
        """The upstream went away: the rest of the body is skipped, or the connection closes."""
        if self.body is not None:
            self.body.reader = None

    def response_complete(self) -> None:
        """The upstream's response went out whole."""
        self._end_exchange()

    def response_cut_off(self) -> None:
        """The upstream's response broke after its head: closing is how the client learns."""
        self._must_close()
        self.response_complete()

    def upstream_failed(self, error: HTTPError) -> None:
        """No response came from the upstream: the router answers in its place."""
        self.forward = None
        self.stop_reading_body()
        self._refuse(error)

    def switch_to_tunnel(self, tunnel: Tunnel) -> None:
        """After 101 Switching Protocols the client's bytes go to the upstream unread."""
        self.forward = None
        self.tunnel = tunnel
        self.phase = Phase.TUNNEL
        self._must_close()
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            tunnel.client_data(data)
        self.resume_reading()
        if self.eof:
            tunnel.client_eof()

    def tunnel_closed(self) -> None:
        self._end_exchange()

    # -- forwarding -----------------------------------------------------------------------------

    def _proxy(self, model: Model, target: bytes, body: BufferedBody | None) -> None:
        """Forward the request; ``body`` is None when it streams from the client as it comes."""
        request, exchange = self.request, self.exchange
        assert request is not None and exchange is not None
        config = self.table.config
        cap = config.max_body_bytes
        if body is None and cap and request.length > cap:
            raise HTTPError(413, _too_large(cap), "request_too_large")
        access = self.access
        assert access is not None
        admission = self.router.admit(model, access, config.max_concurrent_requests)
        if type(admission) is HTTPError:
            raise admission
        assert type(admission) is Admission
        self.admission = admission
        if model.group is not None and not admission.enter(self.router.group(model.group)):

            def turn_came() -> None:
                try:
                    self._forward(model, target, body)
                except Exception as exc:
                    self.internal_error(exc)

            # It keeps its concurrency slot meanwhile; a body still to come waits in the buffer.
            admission.queue(model.queue_timeout, turn_came, self._busy)
            return
        self._forward(model, target, body)

    def _forward(self, model: Model, target: bytes, body: BufferedBody | None) -> None:
        request, exchange, admission = self.request, self.exchange, self.admission
        assert request is not None and exchange is not None and admission is not None
        if not admission.going:  # a request that waited for its group goes only now
            admission.go()
        config = self.table.config
        self.forward = Forward(self, request, exchange, model, admission, config, target, body)
        self.forward.start()

    def _busy(self, active: str | None) -> None:
        """The request was not let in within its queue timeout."""
        admission, access = self.admission, self.access
        try:
            assert admission is not None and admission.group is not None and access is not None
            # The model it waited behind is named only to a key that may see it.
            seen = active is not None and access.allows(active)
            message = (
                f"model {json.dumps(admission.model)} is busy: its group "
                f"{json.dumps(admission.group.name)} is serving "
                f"{json.dumps(active) if seen else 'another model'}; try again later"
            )
            self._refuse(HTTPError(503, message, "model_busy", headers=_RETRY_SOON))
        except Exception as exc:
            self.internal_error(exc)

    # -- answers of our own ---------------------------------------------------------------------

    def _answer(
        self, status: int, body: bytes, content_type: bytes, headers: tuple[bytes, ...] = ()
    ) -> None:
        """Answer the request; an unread small body is read and dropped first, to keep the
        connection usable (else the answer closes it)."""
        request, exchange = self.request, self.exchange
        assert request is not None and exchange is not None
        exchange.status = status

        def send() -> None:
            keep_alive = self.decide_keep_alive()
            head = response_head(
                status,
                [
                    b"Content-Type: " + content_type,
                    b"Content-Length: %d" % len(body),
                    b"X-Request-Id: " + exchange.request_id,
                    *headers,
                    *(() if keep_alive else (b"Connection: close",)),
                ],
            )
            if request.method == b"HEAD":
                self.write(head)
            else:
                self.write(head + body)
                exchange.bytes_out = len(body)
            self._end_exchange()

        unread = self.body
        if (
            unread is not None
            and not unread.done
            and request.keep_alive
            and not self.router.draining
            # A client waiting for 100 Continue sends nothing; a large body takes too long.
            and not request.expect_continue
            and unread.skippable()
        ):
            self._skip_body(unread, send)
        else:
            send()

    def _skip_body(self, body: RequestBody, send: Callable[[], None]) -> None:
        """Read and drop the rest of a small body within a second, then answer; past that the
        answer goes out and the connection closes."""

        def skipped() -> None:
            self.deadline.clear()
            send()

        def given_up() -> None:
            body.reader = None
            send()

        self._answer_after_body = send
        self.deadline.set(DISCARD_TIMEOUT, given_up)
        body.skip(skipped)
        self._start_body()

    def _answer_later(self, body: Coroutine[Any, Any, bytes], content_type: bytes) -> None:
        """Answer once ``body`` is made (upstreams asked on the side), if the exchange is
        still on by then."""
        exchange = self.exchange

        def made(task: asyncio.Task[bytes]) -> None:
            self.aside = None
            if self.exchange is not exchange or self.closed:
                return  # the client left meanwhile
            try:
                self._answer(200, task.result(), content_type)
            except Exception as exc:
                self.internal_error(exc)

        self.aside = self.loop.create_task(body)
        self.aside.add_done_callback(made)

    def _refuse(self, error: HTTPError) -> None:
        body = error_body(error.status, str(error), error.code)
        self._answer(error.status, body, JSON, error.headers)

    def _reject_message(self, error: ProtocolError, exchange: Exchange) -> None:
        """Answer a message that broke HTTP, then give up on the connection."""
        self._must_close()
        body = error_body(
            error.status, str(error), _PROTOCOL_ERROR_CODES.get(error.status, "bad_request")
        )
        self.write(
            response_head(
                error.status,
                [
                    b"Content-Type: application/json",
                    b"Content-Length: %d" % len(body),
                    b"Connection: close",
                ],
            )
            + body
        )
        exchange.status = error.status
        exchange.route = "error"
        exchange.bytes_out = len(body)
        self.exchange = exchange
        self._end_exchange()


_RETRY_SOON = (b"Retry-After: 1",)


class RouterState:
    """What every client connection shares: the routing table, the upstream pool, metrics and
    the access log, and the counts that admission and a graceful stop go by."""

    def __init__(self, table: RoutingTable, *, metrics: Metrics | None = None):
        self.table = table
        self.pool = UpstreamPool()
        self.metrics = metrics or Metrics()
        self.access_log = AccessLog()
        self.writes = WriteBatch()
        self.in_flight = 0  # proxied requests holding a slot
        self.connections: set[ClientConnection] = set()
        self.no_connections = asyncio.Event()
        self.no_connections.set()
        self.busy_connections = 0
        self.drained = asyncio.Event()  # set once draining and no request is being served
        self.draining = False
        self.groups: dict[str, Group] = {}  # by name; kept across reloads
        self.head_timeout = HEAD_TIMEOUT
        self.idle_timeout = IDLE_TIMEOUT
        self.started = time.monotonic()
        self.probes = HealthProbes()

    def new_connection(self) -> ClientConnection:
        """The protocol factory of the listeners: one per client connection."""
        return ClientConnection(self)

    def exchange_started(self) -> None:
        self.busy_connections += 1
        self.writes.defer = self.busy_connections > 1

    def exchange_finished(self) -> None:
        self.busy_connections -= 1
        self.writes.defer = self.busy_connections > 1
        if not self.busy_connections and self.draining:
            self.drained.set()

    def admit(self, model: Model, access: Access, limit: int) -> Admission | HTTPError:
        """Admit a proxied request, or say why not: its key's own limit first (429), then the
        router's (503); 0 is no limit. A request waiting for its group holds both."""
        key_limit = access.max_concurrent_requests
        key_in_flight = self.metrics.key_in_flight
        if key_limit and key_in_flight[access.name] >= key_limit:
            message = (
                f"too many concurrent requests for key {access.name} (its limit is {key_limit})"
            )
            return HTTPError(429, message, "rate_limit_exceeded", headers=_RETRY_SOON)
        if limit and self.in_flight >= limit:
            message = f"too many concurrent requests (the limit is {limit})"
            return HTTPError(503, message, "too_many_concurrent_requests", headers=_RETRY_SOON)
        self.in_flight += 1
        key_in_flight[access.name] += 1
        # A model in a group may have to wait its turn; any other goes at once.
        return Admission(self, model.name, access.name, going=model.group is None)

    def metrics_sources(
        self, table: RoutingTable, shown: frozenset[str] | None
    ) -> list[tuple[str, Replica, str]]:
        """The replicas whose own metrics a scrape merges: of the models it may name that
        have a ``metricsPath`` and are ready or loading. Asking an idle model of a group, or
        one nobody has used yet, would wake it: its samples are left out instead."""
        sources = []
        for name, model in table.models.items():
            if model.metrics_path is None or (shown is not None and name not in shown):
                continue
            if self.state_of(name) not in (READY, LOADING):
                continue
            for replica in model.replicas:
                labels = f'model="{_label(name)}"'
                if len(model.replicas) > 1:
                    labels += f',replica="{replica.index}"'
                sources.append((labels, replica, model.metrics_path))
        return sources

    def state_of(self, name: str) -> str:
        """The state of a model of the current table (see ``model_state``)."""
        model = self.table.models[name]
        group = self.groups.get(model.group) if model.group is not None else None
        return model_state(model, group)

    def status_document(self, table: RoutingTable, shown: frozenset[str] | None) -> bytes:
        """GET /status: what each model the caller may see is doing, and its group's turn;
        a group's active model is named only to a caller who may see that model."""
        now = time.monotonic()
        waiting = collections.Counter(
            waiter.model for group in self.groups.values() for waiter in group.waiters
        )
        models = {}
        for name, model in sorted(table.models.items()):
            if shown is not None and name not in shown:
                continue
            group = self.groups.get(model.group) if model.group is not None else None
            state = model_state(model, group)
            models[name] = {
                "status": state,
                "in_flight": self.metrics.in_flight[name],
                "queued": waiting[name],
                "group": model.group,
                "replicas": [
                    {
                        "status": IDLE if state == IDLE else replica.state.seen,
                        "in_flight": replica.state.in_flight,
                    }
                    for replica in model.replicas
                ],
            }
        groups = {}
        for name in sorted({entry["group"] for entry in models.values() if entry["group"]}):
            group = self.groups.get(name)
            active = group.active if group is not None else None
            seen = active is not None and (shown is None or active in shown)
            groups[name] = {
                "active": active if seen else None,
                "queued": sum(e["queued"] for e in models.values() if e["group"] == name),
            }
        document = {
            "version": VERSION,
            "uptime_s": round(now - self.started, 3),
            "models": models,
            "groups": groups,
        }
        return _json_bytes(document)

    @property
    def queued(self) -> int:
        return sum(len(group.waiters) for group in self.groups.values())

    def group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, self._group_switched)
        return group

    def _group_switched(self, previous: str | None, model: str) -> None:
        # The model left behind may stop when idle: the router's pooled connections to it
        # would keep it in use.
        left = self.table.models.get(previous) if previous is not None else None
        if left is not None:
            self.pool.close_idle(replica.upstream for replica in left.replicas)
        # The model switched to loads (its worker starts) until its first answer.
        entered = self.table.models.get(model)
        if entered is not None:
            for replica in entered.replicas:
                replica.state.seen = LOADING

    def replace_table(self, table: RoutingTable) -> None:
        """A reload: requests in flight keep the table they started with; what is known of
        each replica kept goes on; a group no longer configured lets its waiters go."""
        carry_replica_states(self.table, table)
        self.table = table
        for name, group in self.groups.items():
            if name not in table.groups:
                group.disband()
        if self.probes.tasks or any(m.health_path for m in table.models.values()):
            self.probes.start(table)

    def record(self, exchange: Exchange, access: Access | None) -> None:
        # A model the key may not see is counted as an unknown one: a scoped key reading the
        # metrics must not tell them apart.
        name = exchange.model
        known = name in self.table.models and access is not None and access.allows(name)
        self.metrics.observe(exchange, name if known else "-")
        self.access_log.record(exchange)


# ---------------------------------------------------------------------------------------------
# 10. The forward: the choice of a replica, one proxied request, the tunnel after 101
# ---------------------------------------------------------------------------------------------


BACKOFF_FIRST = 1.0  # a replica that could not be reached is left out this long, at first,
BACKOFF_MAX = 30.0  # doubling with each failure in a row up to this
_BACKOFF_DOUBLINGS = 64
_turns = itertools.count()  # rotates the choice among equally busy replicas


def choose_replica(
    replicas: tuple[Replica, ...],
    tried: Collection[int],
    now: float,
    preferred: Replica | None,
    turn: int,
) -> Replica | None:
    """The replica for the next attempt at a request, None when all have been tried.

    ``preferred`` (by affinity) while it is not backing off; else the one with the fewest
    requests in flight from this router, ties taken in turn; when every untried replica is
    backing off, the one that failed longest ago rather than none.
    """
    count = len(replicas)
    chosen = fallback = None
    least = 0
    # One pass, starting at a different replica each turn: the first of the least busy is
    # taken, so ties rotate, and nothing is allocated.
    for step in range(count):
        replica = replicas[(turn + step) % count]
        if replica.index in tried:
            continue
        state = replica.state
        if state.retry_at > now:
            if fallback is None or state.failed_at < fallback.state.failed_at:
                fallback = replica
        elif replica is preferred:
            return replica
        elif chosen is None or state.in_flight < least:
            chosen, least = replica, state.in_flight
    return chosen if chosen is not None else fallback


def replica_failed(state: ReplicaState, now: float) -> None:
    """Connecting failed: back off, twice as long as last time, up to BACKOFF_MAX."""
    state.connect_failures += 1
    state.failures += 1
    state.failed_at = now
    state.seen = UNAVAILABLE
    # The exponent is capped: a float overflows past 2 ** 1023, and the back-off is capped
    # long before.
    doublings = min(state.failures - 1, _BACKOFF_DOUBLINGS)
    state.retry_at = now + min(BACKOFF_FIRST * 2.0**doublings, BACKOFF_MAX)


class Tunnel:
    """After 101 Switching Protocols: bytes copied both ways, unread, until both sides end.

    It holds the concurrency slot of the request that opened it until it closes.
    """

    __slots__ = ("admission", "client", "closed", "ends", "upstream")

    def __init__(
        self, client: ClientConnection, upstream: UpstreamConnection, admission: Admission
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.admission = admission
        self.ends = 0  # sides that have sent their end of stream
        self.closed = False

    def client_data(self, data: bytes) -> None:
        if not self.upstream.closed:
            assert self.upstream.transport is not None
            self.client.writes.write(self.upstream.transport, data)

    def client_eof(self) -> None:
        assert self.upstream.transport is not None
        self._end_of_stream(self.upstream.transport)

    def upstream_data(self, data: bytes) -> None:
        self.client.write(data)

    def upstream_eof(self) -> bool:
        self._end_of_stream(self.client.transport)
        return True  # the other direction stays open

    def upstream_closed(self, exc: Exception | None) -> None:
        self._finish()

    def close(self) -> None:
        """The exchange ends elsewhere (the client left, say): drop the upstream side."""
        if not self.closed:
            self.closed = True
            self.upstream.handler = None
            self.upstream.close()
            self.admission.release()

    def _end_of_stream(self, target: asyncio.Transport) -> None:
        if self.closed:
            return
        if target.can_write_eof() and not target.is_closing():
            self.client.writes.flush(target)  # what came before the end goes first
            target.write_eof()
        self.ends += 1
        if self.ends == 2:
            self._finish()

    def _finish(self) -> None:
        self.close()
        self.client.tunnel_closed()


class HealthProbes:
    """Asks each replica of the models that name a ``healthPath`` how it is, every
    ``healthInterval`` seconds: a GET, never a billed completion. An answer says ready (or
    loading, for a 503) and ends a back-off; no answer is a failed connect."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, table: RoutingTable) -> None:
        self.stop()
        loop = asyncio.get_running_loop()
        timeout = table.config.connect_timeout
        for model in table.models.values():
            if model.health_path is not None:
                for replica in model.replicas:
                    probing = self._probe(model, replica, min(timeout, model.health_interval))
                    self.tasks.append(loop.create_task(probing))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()

    async def _probe(self, model: Model, replica: Replica, timeout: float) -> None:
        assert model.health_path is not None
        while True:
            answer = await ask_upstream(replica, model.health_path, timeout)
            state = replica.state
            if answer is None:
                replica_failed(state, time.monotonic())
            else:
                state.seen = seen_in(answer[0])
                state.failures, state.retry_at = 0, 0.0
            await asyncio.sleep(model.health_interval)


_IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def may_send_again(request: Request) -> bool:
    """Whether a request may reach an upstream twice: an idempotent method (RFC 9110 §9.2.2),
    or a client that says so with an ``Idempotency-Key``. A completion is billed work."""
    return request.method in _IDEMPOTENT_METHODS or request.header(b"idempotency-key") is not None


class Forward:
    """One proxied request: sent to the upstream, its response relayed back as it arrives.

    It picks one of the model's replicas and moves on to another when connecting fails, before
    any byte of the request went out. It holds the request's concurrency slot until it ends,
    one of five ways: ``_complete``
    (the response went out whole), ``_cut_off`` (the response broke after its head: the client
    connection closes), ``_no_response`` (nothing usable came: the router answers in its
    place), ``_switch_to_tunnel`` (101: the slot passes to the tunnel), or ``cancel`` (the
    exchange ended elsewhere, the client leaving, say).

    Flow control joins the two connections: when one side's write buffer fills, the other
    side stops reading until it drains.
    """

    __slots__ = (
        "admission",
        "attempts",
        "body",
        "client",
        "client_head",
        "config",
        "connecting",
        "ended",
        "exchange",
        "framing",
        "head",
        "length",
        "model",
        "payload",
        "replayed",
        "replica",
        "request",
        "request_sent",
        "reused",
        "sent_at",
        "target",
        "tried",
        "upstream",
        "upstream_keep_alive",
    )

    def __init__(
        self,
        client: ClientConnection,
        request: Request,
        exchange: Exchange,
        model: Model,
        admission: Admission,
        config: Config,
        target: bytes,
        body: BufferedBody | None,
    ) -> None:
        self.client = client
        self.request = request
        self.exchange = exchange
        self.model = model
        self.admission = admission  # given back when the request ends
        self.config = config
        self.target = target
        self.body = body
        self.length = request.length if body is None else body.length
        self.replica: Replica | None = None  # the one being tried or used
        self.tried: set[int] | None = None  # replicas tried, once there is a second
        self.head = b""  # the request head for the replica
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.attempts = 0  # replicas tried
        self.replayed = False
        self.reused = False
        self.request_sent = False  # the whole request has gone to the upstream
        self.framing: Framing | None = None  # of the response body, once its head is in
        self.client_head = b""  # the response head, until it goes out with the first bytes
        self.payload: list[bytes] | None = None  # de-chunked content, for HTTP/1.0 clients
        self.sent_at = 0.0
        self.upstream_keep_alive = False
        self.ended = False

    def start(self) -> None:
        self.sent_at = time.monotonic()
        replicas = self.model.replicas
        self._try_replica(replicas[0] if len(replicas) == 1 else self._first_choice())

    def cancel(self) -> None:
        """The exchange ends elsewhere (the client left, say): drop the upstream side.

        A connection still being opened is left to finish: it goes to the pool then.
        """
        self._drop_upstream()
        self._release()

    def _release(self) -> None:
        if not self.ended:
            self.ended = True
            if self.replica is not None:
                self.replica.state.in_flight -= 1
            self.admission.release()

    def _leave_replica(self) -> None:
        if self.replica is not None:
            self.replica.state.in_flight -= 1

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.handler = None
            self.upstream.close()
            self.upstream = None

    # -- the request ----------------------------------------------------------------------------

    def _first_choice(self) -> Replica:
        replicas = self.model.replicas
        preferred = None
        if self.model.affinity is not None:
            value = self.request.header(self.model.affinity)
            if value is not None:
                preferred = replicas[zlib.crc32(value) % len(replicas)]
        chosen = choose_replica(replicas, (), time.monotonic(), preferred, next(_turns))
        assert chosen is not None
        return chosen

    def _try_replica(self, replica: Replica) -> None:
        self.replica = replica
        self.attempts += 1
        self.exchange.tries = self.attempts
        state = replica.state
        state.in_flight += 1
        state.requests += 1
        client = self.client
        self.head = upstream_request_head(
            self.request,
            replica,
            self.target,
            self.length,
            client.client_ip,
            self.exchange.request_id,
        )
        self._attempt()

    def _attempt(self) -> None:
        assert self.replica is not None
        connection = self.client.router.pool.take(self.replica.upstream)
        if connection is None:
            self.connecting = self.client.loop.create_task(self._connect(self.replica))
        else:
            self._send(connection, reused=True)

    async def _connect(self, replica: Replica) -> None:
        pool = self.client.router.pool
        started = time.monotonic()
        try:
            connection = await pool.open(replica.upstream, self.config.connect_timeout)
        except UpstreamError as exc:
            self.connecting = None
            replica_failed(replica.state, time.monotonic())
            if not self.ended:
                self._connect_failed(exc)
            return
        self.connecting = None
        self.exchange.connect_seconds = time.monotonic() - started
        if replica.state.seen == UNAVAILABLE:
            replica.state.seen = UNKNOWN  # reached again; its answer will tell more
        replica.state.failures = 0
        replica.state.retry_at = 0.0
        if self.ended:
            pool.release(replica.upstream, connection, self.model.upstream_idle_timeout)
            return
        try:
            self._send(connection, reused=False)
        except Exception as exc:
            self.client.internal_error(exc)

    def _connect_failed(self, error: UpstreamError) -> None:
        """Nothing of the request went out: the next replica may take it, if there is one."""
        replicas = self.model.replicas
        assert self.replica is not None
        if len(replicas) > 1:
            if self.tried is None:
                self.tried = set()
            self.tried.add(self.replica.index)
            self._leave_replica()
            self.replica = None
            now = time.monotonic()
            chosen = choose_replica(replicas, self.tried, now, None, next(_turns))
            # Failover is to a replica that is up; when every one is backing off, the one
            # tried first (the one that failed longest ago) was the request's one try.
            if chosen is not None and chosen.state.retry_at <= now:
                self._try_replica(chosen)
                return
        timed_out = error.status == 504
        self.exchange.upstream_failure = "timeout" if timed_out else "connect"
        code = "upstream_timeout" if timed_out else "upstream_unavailable"
        message = str(error)
        if self.attempts > 1:
            message = f"{message} (tried all {self.attempts} replicas)"
        self._no_response(HTTPError(error.status, message, code))

    def _send(self, connection: UpstreamConnection, *, reused: bool) -> None:
        self.upstream = connection
        connection.handler = self
        self.reused = reused
        transport = connection.transport
        assert transport is not None
        write = self.client.writes.write
        if self.body is not None:
            raw = self.body.raw
            # One system call for a small request; a large body is not copied to be joined.
            if len(raw) <= JOIN_LIMIT:
                write(transport, self.head + raw)
            else:
                write(transport, self.head)
                write(transport, raw)
            self.request_sent = True
            return
        write(transport, self.head)
        if self.request.length == 0:
            self.request_sent = True
        else:
            self.client.stream_body_to(self)

    def send_body(self, data: bytes) -> None:
        if self.upstream is not None and not self.upstream.closed:
            assert self.upstream.transport is not None
            self.client.writes.write(self.upstream.transport, data)

    def body_sent(self) -> None:
        self.request_sent = True
        if self.upstream is not None and self.upstream.buffer:
            self._read_head()  # the upstream answered before the body was all sent

    # -- the response ---------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.framing is not None:
            self._relay(data)
        else:
            assert self.upstream is not None
            self.upstream.buffer += data
            if self.request_sent:  # as before: the whole request first, then its answer
                self._read_head()

    def upstream_eof(self) -> bool:
        return False  # the transport closes, and upstream_closed tells what that means

    def _read_head(self) -> None:
        connection = self.upstream
        assert connection is not None
        while True:
            try:
                head = take_head(connection.buffer)
                if head is None:
                    return
                response = parse_response_head(head, self.request.method)
            except ProtocolError as exc:
                self._upstream_failed(f"invalid response from the upstream: {exc}")
                return
            if response.status >= 200 or response.status == 101:
                break  # interim 1xx answers are ours to drop: we sent no Expect
        exchange = self.exchange
        exchange.upstream_seconds = time.monotonic() - self.sent_at
        if response.status == 101:
            if self.request.header(b"upgrade") is None:
                # A switch the client did not ask for (RFC 9110 §15.2.2): what follows is in
                # no protocol the client speaks.
                self._upstream_failed("the upstream switched protocols unasked")
                return
            self._switch_to_tunnel(response)
            return
        exchange.status = response.status
        assert self.replica is not None
        self.replica.state.seen = seen_in(response.status)
        # An HTTP/1.0 client cannot read chunked framing: it gets the bare content, ended by
        # the connection closing.
        dechunk = response.length == CHUNKED and self.request.http_minor == 0
        keep_alive = self.client.decide_keep_alive(
            response_closes=response.length == UNTIL_CLOSE or dechunk
        )
        timing = None
        if self.config.server_timing:
            waiter = self.admission.waiter
            queued = None if waiter is None else waiter.waited
            timing = server_timing(queued, exchange.connect_seconds, exchange.upstream_seconds)
        self.client_head = client_response_head(
            response, exchange.request_id, keep_alive, dechunk, timing
        )
        self.framing = Framing(response.length)
        self.payload = [] if dechunk else None
        self.upstream_keep_alive = response.keep_alive
        rest = bytes(connection.buffer)
        connection.buffer.clear()
        self._relay(rest)

    def _relay(self, data: bytes) -> None:
        """Send the response on: raw framing, or only the content when de-chunking."""
        framing = self.framing
        assert framing is not None and self.upstream is not None
        try:
            end = framing.feed(data, self.payload)
        except ProtocolError as exc:
            self._cut_off(exc)
            return
        if end < len(data):
            self.upstream.buffer += data[end:]  # bytes beyond the response: never reused
            data = data[:end]
        if self.payload is not None:
            data = b"".join(self.payload)
            self.payload.clear()
        self.exchange.bytes_out += len(data)
        if self.client_head:
            # The head goes out with the body bytes that came with it, in one write.
            data = self.client_head + data
            self.client_head = b""
        if data:
            self.client.write(data)
        if framing.done:
            self._complete()

    def upstream_closed(self, exc: Exception | None) -> None:
        connection = self.upstream
        assert connection is not None
        if not self.request_sent:
            # The upstream stopped taking the body: it may have answered early (its own 413,
            # say). Whatever the client still sends is unread, so its connection cannot last.
            self.request_sent = True
            self.client.stop_reading_body()
        if self.framing is None and connection.buffer:
            self._read_head()
            if self.ended:
                return
        if self.framing is not None:
            if self.framing.length == UNTIL_CLOSE:
                self._complete()
            else:
                self._cut_off(ProtocolError(502, "the upstream closed the connection mid-body"))
        elif connection.buffer:
            self._upstream_failed(
                "invalid response from the upstream: connection closed inside a message head"
            )
        elif isinstance(exc, ConnectionError):
            self._upstream_failed(f"the upstream reset the connection: {exc}", replayable=True)
        else:
            self._upstream_failed(
                "the upstream closed the connection without answering", replayable=True
            )

    def _upstream_failed(self, message: str, *, replayable: bool = False) -> None:
        self._drop_upstream()
        # A reused connection the upstream closed as the request went out: the upstream may
        # or may not have processed it, so it goes again only if doing it twice is harmless
        # (RFC 9110 §9.2.2), once. A body that streamed from the client is gone once sent, so
        # only a buffered or empty one can be.
        if (
            replayable
            and self.reused
            and not self.replayed
            and may_send_again(self.request)
            and (self.body is not None or self.request.length == 0)
        ):
            self.replayed = True
            self._attempt()
            return
        self.exchange.upstream_failure = "protocol"
        self._no_response(HTTPError(502, message, "upstream_error"))

    # -- the ends -------------------------------------------------------------------------------

    def _complete(self) -> None:
        connection = self.upstream
        assert connection is not None
        self.upstream = None
        if self.upstream_keep_alive and not connection.buffer:
            assert self.replica is not None
            pool = self.client.router.pool
            pool.release(self.replica.upstream, connection, self.model.upstream_idle_timeout)
        else:
            connection.handler = None
            connection.close()
        self._release()
        self.client.response_complete()

    def _cut_off(self, error: ProtocolError) -> None:
        # Never pass a cut-off body off as complete: closing the client connection tells.
        log(f"upstream of model {self.exchange.model} broke its response: {error}")
        self.exchange.upstream_failure = "protocol"
        self._drop_upstream()
        self._release()
        self.client.response_cut_off()

    def _no_response(self, error: HTTPError) -> None:
        self._release()
        self.client.upstream_failed(error)

    def _switch_to_tunnel(self, response: Response) -> None:
        client = self.client
        client.write(switching_protocols_head(response))
        connection = self.upstream
        assert connection is not None
        self.upstream = None
        self._leave_replica()
        self.ended = True  # the slot is the tunnel's now
        tunnel = Tunnel(client, connection, self.admission)
        connection.handler = tunnel
        client.switch_to_tunnel(tunnel)
        if connection.buffer:
            client.write(bytes(connection.buffer))
            connection.buffer.clear()


# ---------------------------------------------------------------------------------------------
# 11. The server: listeners, sd_notify, reload, drain
# ---------------------------------------------------------------------------------------------


def format_address(sockname: Any) -> str:
    if isinstance(sockname, str | bytes):
        return f"unix:{os.fsdecode(sockname) or '(unnamed)'}"
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ActivationError(Exception):
    pass


SD_LISTEN_FDS_START = 3


def activated_sockets(
    environ: MutableMapping[str, str],
) -> list[tuple[socket.socket, str]]:
    """The listening sockets systemd passed (sd_listen_fds), with their names.

    The activation variables are removed afterwards, so nothing started later mistakes them
    for its own.
    """
    try:
        if environ.get("LISTEN_PID", "") != str(os.getpid()):
            return []
        count_text = environ.get("LISTEN_FDS", "")
        if not count_text.isdigit():
            raise ActivationError(f"LISTEN_FDS must be a non-negative integer, got {count_text!r}")
        count = int(count_text)
        names = environ.get("LISTEN_FDNAMES", "").split(":")
        sockets: list[tuple[socket.socket, str]] = []
        for index in range(count):
            fd = SD_LISTEN_FDS_START + index
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                for opened, _ in sockets:
                    opened.close()
                raise ActivationError(f"fd {fd} is not a socket: {exc.strerror}") from None
            if sock.type != socket.SOCK_STREAM:
                raise ActivationError(f"fd {fd} is not a stream socket")
            sock.set_inheritable(False)
            name = names[index] if index < len(names) and names[index] else f"fd{fd}"
            sockets.append((sock, name))
        return sockets
    finally:
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(variable, None)


class NotifyError(Exception):
    """systemd's notification socket is unreachable, so the service could never become ready."""


class Notifier:
    """sd_notify(3): readiness and status for systemd; silent when not run by it."""

    def __init__(self, environ: MutableMapping[str, str]):
        self.name = address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket: socket.socket | None = None
        if self.address:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, *fields: str) -> bool:
        if self.socket is None:
            return True
        try:
            self.socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log(f"cannot notify systemd at {self.name}: {exc.strerror}")
            return False
        return True


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Half the watchdog timeout systemd asks for, in seconds, or None without a watchdog."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


STATUS_INTERVAL = 5.0


class Server:
    """Listeners, signals and the service's lifecycle around the router state."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        *,
        activated: list[tuple[socket.socket, str]] | None = None,
        environ: MutableMapping[str, str] | None = None,
    ):
        environ = os.environ if environ is None else environ
        self.config_path = config_path
        self.router = RouterState(RoutingTable(config))
        self.activated = activated or []
        self.notifier = Notifier(environ)
        self.watchdog_interval = watchdog_interval(environ)
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.stopping = asyncio.Event()
        self.reload_note = ""

    async def start(self) -> None:
        await self._listen()
        self.router.probes.start(self.router.table)
        config = self.router.table.config
        hosts = [
            sock.getsockname()[0]
            for server in self.servers
            for sock in server.sockets
            if sock.family != socket.AF_UNIX
        ]
        for path, message in (*config.warnings, *open_proxy_warnings(config, hosts)):
            log(f"warning: config: {path}: {message}")

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        factory = self.router.new_connection
        if self.activated:
            for sock, name in self.activated:
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(factory, sock=sock)
                else:
                    server = await loop.create_server(factory, sock=sock)
                self._listening(server, f" ({name})")
            return
        listener = self.router.table.config.listener
        server = await loop.create_server(
            factory, host=listener.host or None, port=listener.port, reuse_address=True
        )
        self._listening(server, "")

    def _listening(self, server: asyncio.Server, note: str) -> None:
        self.servers.append(server)
        count = len(self.router.table.models)
        for sock in server.sockets:
            address = format_address(sock.getsockname())
            self.addresses.append(address)
            log(f"listening on {address}{note} with {count} model(s)")

    def status(self) -> str:
        router = self.router
        queued = router.queued
        text = (
            f"{len(router.table.models)} model(s) on {', '.join(self.addresses)}; "
            f"{router.in_flight - queued} request(s) in flight"
        )
        if queued:
            text = f"{text}, {queued} queued"
        return f"{text}; {self.reload_note}" if self.reload_note else text

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if not self.notifier.send("READY=1", f"STATUS={self.status()}"):
            # Left running, the service would wait out its start timeout and be restarted.
            await self.shutdown()
            raise NotifyError(
                f"systemd cannot be told the router is ready (NOTIFY_SOCKET={self.notifier.name})"
            )
        background = [loop.create_task(self._report_status())]
        if self.watchdog_interval is not None:
            background.append(loop.create_task(self._pet_watchdog(self.watchdog_interval)))
        await self.stopping.wait()
        self.stop_accepting()
        self.notifier.send("STOPPING=1", f"STATUS=draining {self.router.in_flight} request(s)")
        for task in background:
            task.cancel()
        await self.shutdown()

    def reload(self) -> None:
        """Re-read the config; swap the routing table whole, or keep the old one on error."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        metrics = self.router.metrics
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                log(f"reload failed, the running config stays: {line}")
            metrics.reloads["failure"] += 1
            self.reload_note = f"last reload failed ({len(exc.problems)} problem(s))"
        else:
            if config.listener != self.router.table.config.listener and not self.activated:
                log("the listen address changed: that takes effect on restart")
            self.router.replace_table(RoutingTable(config))
            metrics.reloads["success"] += 1
            self.reload_note = ""
            log(f"reloaded {self.config_path}: {len(config.models)} model(s)")
        self.notifier.send("READY=1", f"STATUS={self.status()}")

    async def _report_status(self) -> None:
        last = self.status()
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if (current := self.status()) != last:
                self.notifier.send(f"STATUS={current}")
                last = current

    async def _pet_watchdog(self, interval: float) -> None:
        # Sent from the event loop itself, so a stuck loop starves the watchdog, as it should.
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def stop_accepting(self) -> None:
        self.router.draining = True
        for server in self.servers:
            server.close()

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish within the drain timeout, then close."""
        router = self.router
        self.stop_accepting()
        for connection in list(router.connections):
            if not connection.busy:
                connection.close_gracefully()
        timeout = router.table.config.shutdown_timeout
        try:
            async with asyncio.timeout(timeout):
                if router.busy_connections:
                    await router.drained.wait()
        except TimeoutError:
            busy = sum(c.busy for c in router.connections)
            log(f"drain timeout ({timeout:g}s): cutting {busy} request(s) still in flight")
        for connection in list(router.connections):
            connection.close()
        router.probes.stop()
        router.pool.close()
        # Let the connection tasks see their closed transports and end by themselves: at exit,
        # asyncio would cancel them and log each one.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await router.no_connections.wait()
        router.access_log.flush()


# ---------------------------------------------------------------------------------------------
# 12. llmhop-notify: readiness for workers that do not speak sd_notify
# ---------------------------------------------------------------------------------------------


NOTIFY_USAGE = (
    "usage: llmhop-notify -url <http://host:port | unix:///path.sock> [-health-path /health]"
    " [--] COMMAND [ARG...]"
)

HEALTH_POLL_INTERVAL = 1.0

HEALTH_PROBE_TIMEOUT = 10.0


class UsageError(Exception):
    pass


def parse_notify_arguments(argv: list[str]) -> tuple[Upstream, str, list[str]]:
    """Go-style flags (``-url x``, ``--url=x``) up to ``--`` or the first non-flag argument."""
    options = {"url": "", "health-path": "/health"}
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            index += 1
            break
        if not argument.startswith("-") or argument == "-":
            break
        name, equals, value = argument.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise UsageError("")
        if name not in options:
            raise UsageError(f"unknown flag {argument}")
        if not equals:
            index += 1
            if index == len(argv):
                raise UsageError(f"flag {argument} needs a value")
            value = argv[index]
        options[name] = value
        index += 1
    command = argv[index:]
    if not options["url"]:
        raise UsageError("-url is required")
    if not command:
        raise UsageError("a command to run is required")
    if not options["health-path"].startswith("/"):
        raise UsageError("-health-path must start with /")
    try:
        upstream = parse_upstream_url(options["url"])
    except ValueError as exc:
        raise UsageError(f"-url {options['url']}: {exc}") from None
    return upstream, options["health-path"], command


def is_healthy(upstream: Upstream, health_path: str, timeout: float = HEALTH_PROBE_TIMEOUT) -> bool:
    """Whether GET health_path answers 200; redirects are not followed."""
    request = b"GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        upstream.path_prefix,
        health_path.encode(),
        upstream.host_header,
    )
    status = None
    try:
        if upstream.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(upstream.host)
        else:
            sock = socket.create_connection((upstream.host, upstream.port), timeout=timeout)
            if upstream.scheme == "https":
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=upstream.host)
        with sock:
            sock.sendall(request)
            received = b""
            while b"\r\n\r\n" not in received and len(received) < MAX_HEAD_BYTES:
                if not (data := sock.recv(4096)):
                    break
                received += data
            head, _, body = received.partition(b"\r\n\r\n")
            response = parse_response_head(head, b"GET")
            status = response.status
            # Read (at most 4 KiB of) the body before closing: a server still writing it
            # would otherwise meet a broken pipe.
            wanted = min(response.length, 4096) if response.length >= 0 else 4096
            while len(body) < wanted and (data := sock.recv(4096)):
                body += data
    except (OSError, ssl.SSLError, ProtocolError):
        pass
    return status == 200


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + the signal for a signal death."""
    return 128 - returncode if returncode < 0 else returncode


def notify_main(argv: list[str]) -> int:
    try:
        upstream, health_path, command = parse_notify_arguments(argv)
    except UsageError as exc:
        if str(exc):
            print(f"llmhop-notify: {exc}", file=sys.stderr)
        print(NOTIFY_USAGE, file=sys.stderr)
        return 0 if not str(exc) else 1
    import subprocess  # only this command starts processes: the router need not load it

    notifier = Notifier(os.environ)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"llmhop-notify: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    while True:
        returncode = child.poll()
        if returncode is not None:
            print(f"llmhop-notify: {command[0]} exited before it was ready", file=sys.stderr)
            return exit_status(returncode)
        if is_healthy(upstream, health_path):
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(HEALTH_POLL_INTERVAL)
    name = os.path.basename(command[0])
    if not notifier.send("READY=1", f"STATUS={name} is healthy at {upstream}{health_path}"):
        child.kill()
        child.wait()
        return 1
    return exit_status(child.wait())


# ---------------------------------------------------------------------------------------------
# 13. Command line
# ---------------------------------------------------------------------------------------------


_EPILOG = """\
signals:
  SIGHUP           re-read the config; requests in flight finish on the old one, and a
                   config with errors is logged and ignored
  SIGTERM, SIGINT  stop: listeners close, requests in flight get shutdownTimeout seconds

exit status:
  0  stopped by a signal, or --check found the config valid (warnings may be printed)
  1  the config is invalid (one "config: <key path>: <message>" line per problem), a
     listener could not be opened, or systemd could not be told the router is ready

other commands:
  llmhop hash-token [--allow-short] < TOKEN-FILE
      print a token's sha256, for a named key in authTokens (at least 16 bytes)
  llmhop notify -url URL [-health-path PATH] [--] COMMAND...
      run a server and tell systemd it is ready once URL answers (also as llmhop-notify)

documentation: the README and docs/ of the llmhop repository
"""


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmhop",
        description="One OpenAI-compatible endpoint in front of many LLM servers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        "-config",
        default="config.json",
        metavar="PATH",
        help="the JSON config (default: config.json in the working directory)",
    )
    parser.add_argument(
        "--check",
        "-check",
        action="store_true",
        help="validate the config (secrets by syntax only), print any warnings, and exit",
    )
    parser.add_argument("--version", "-version", action="version", version=f"llmhop {VERSION}")
    return parser


MIN_TOKEN_BYTES = 16
_HASH_TOKEN_USAGE = (
    "usage: llmhop hash-token [--allow-short] < TOKEN-FILE   "
    "(or: printf %s TOKEN | llmhop hash-token)"
)


def hash_token_main(argv: list[str], stdin: Any = None) -> int:
    """Print the ``sha256`` value of the token on standard input, for an ``authTokens`` key.

    The digest is unsalted and may sit in a world-readable Nix store: it keeps a random token
    secret, not a short or chosen one, which a dictionary finds. Short tokens are refused
    unless ``--allow-short`` insists."""
    allow_short = argv == ["--allow-short"]
    if argv and not allow_short:
        print(_HASH_TOKEN_USAGE)
        return 0 if argv[0] in ("-h", "--help") else 1
    text = (stdin or sys.stdin.buffer).read()
    # One line terminator is the echo's or the file's, not the token's, as with ${file:...}.
    token = text.removesuffix(b"\n").removesuffix(b"\r")
    if not token or not is_valid_field_value(token) or token != token.strip():
        print(
            "llmhop hash-token: the token on standard input is empty or not a valid header "
            "value (no control characters, no leading or trailing spaces)",
            file=sys.stderr,
        )
        return 1
    if len(token) < MIN_TOKEN_BYTES and not allow_short:
        print(
            f"llmhop hash-token: the token is {len(token)} bytes; under {MIN_TOKEN_BYTES} its "
            "unsalted hash can be reversed by trying tokens. Make a random one (openssl rand "
            "-hex 32), or insist with --allow-short",
            file=sys.stderr,
        )
        return 1
    print(token_digest(token).hex())
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]) == "llmhop-notify":
            return notify_main(argv)
    if argv[:1] == ["notify"]:
        return notify_main(argv[1:])
    if argv[:1] == ["hash-token"]:
        return hash_token_main(argv[1:])
    args = _argument_parser().parse_args(argv)
    try:
        config = load_config(args.config, check_only=args.check)
        RoutingTable(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        warnings = (*config.warnings, *open_proxy_warnings(config, [config.listener.host]))
        for path, message in warnings:
            print(f"config: warning: {path}: {message}", file=sys.stderr)
        print(f"config ok: {len(config.models)} model(s)", file=sys.stderr)
        return 0
    try:
        activated = activated_sockets(os.environ)
    except ActivationError as exc:
        log(f"socket activation: {exc}")
        return 1
    server = Server(args.config, config, activated=activated)
    try:
        asyncio.run(server.run())
    except OSError as exc:
        log(f"cannot listen: {exc}")
        return 1
    except NotifyError as exc:
        log(f"exiting: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
