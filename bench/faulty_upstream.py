"""An upstream that fails at random, for the soak: most requests get 200, the rest meet one of
the faults a real server shows — a close or a reset with no answer, a response cut inside its
head or its body, a 503, a slow answer.

    python3 bench/faulty_upstream.py [--port 0] [--seed 1]

Prints `listening on HOST:PORT` once it serves. Requests are framed by `Content-Length` only
(what wrk and the router send).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

# Run as a script from bench/, like its sibling whose serving loop it shares.
from sse_upstream import serve_until_stopped

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
CUT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Le"
CUT_BODY = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok":'
SLOW_SECONDS = 0.02

# What happens to a request, and how often (weights out of 1,000).
FAULTS = {
    "answer": 900,
    "close": 20,
    "reset": 20,
    "cut_head": 15,
    "cut_body": 15,
    "busy": 20,
    "slow": 10,
}


class FaultyProtocol(asyncio.Protocol):
    def __init__(self, chooser: random.Random) -> None:
        self.choose = chooser
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            marker = head.find(b"content-length:")
            length = int(head[marker + 15 :].split(b"\r\n", 1)[0]) if marker >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self._answer()

    def _answer(self) -> None:
        transport = self.transport
        assert transport is not None
        fault = self.choose.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
        if fault == "answer":
            transport.write(OK)
        elif fault == "busy":
            transport.write(BUSY)
        elif fault == "slow":
            asyncio.get_running_loop().call_later(SLOW_SECONDS, self._late, OK)
        elif fault == "reset":
            transport.abort()
        else:
            transport.write({"close": b"", "cut_head": CUT_HEAD, "cut_body": CUT_BODY}[fault])
            transport.close()

    def _late(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    chooser = random.Random(args.seed)
    asyncio.run(serve_until_stopped(lambda: FaultyProtocol(chooser), args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
