"""The router's Python work per request, two copies of the router side by side.

    .venv/bin/python -m bench.python_path OLD.py NEW.py [--runs 15] [--requests 20000]
    .venv/bin/python -m bench.python_path R.py R.py --replicas 1,2   # one upstream against two

One keep-alive client connection and one pooled upstream connection, on transports that make
no system calls: each small POST is parsed, routed, rewritten, forwarded, answered and logged
(to /dev/null) as in the real router, and nothing else is timed. Both copies run in turns in
one process, so they meet the same machine; the fastest and the median run of each are
printed. Steadier than the wrk runs for comparing two versions of the code, which is what it
is for; it says nothing of system calls, the kernel or the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: router.test:8080\r\nUser-Agent: wrk\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
ANSWER = b'{"id":"x","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(ANSWER)
) + ANSWER


class NullTransport(asyncio.Transport):
    """Takes writes and forgets them (counting), as a socket with room to spare would."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def wired(
    router: ModuleType, replicas: int = 1
) -> AsyncIterator[tuple[Any, Any, Callable[[], None]]]:
    """A client connection and a pooled upstream connection of a router for model ``m``:
    (client, upstream, flush), flush writing out the access log. The client's connection
    must have answered every request, and still be open, when the block ends."""
    url = "http://127.0.0.1:9"
    model = {"url": url} if replicas == 1 else {"urls": [url] * replicas}
    text = json.dumps({"models": {"m": model}})
    config = router.parse_config(text, router.SecretResolver({}))
    # Copies older than the restructure call the shared state Router, with flush_log.
    state = getattr(router, "RouterState", getattr(router, "Router", None))(
        router.RoutingTable(config)
    )
    flush = getattr(state, "flush_log", None) or state.access_log.flush
    client = state.new_connection()
    client_side = NullTransport()
    client.connection_made(client_side)
    upstream = router.UpstreamConnection()
    upstream.connection_made(NullTransport())
    # Every replica is the same address, so the one pooled connection serves them all.
    model = config.models["m"]
    address = model.replicas[0].upstream if hasattr(model, "replicas") else model.upstream
    state.pool.idle[address.pool_key] = [upstream]
    yield client, upstream, flush
    if client_side.closing:
        raise SystemExit(f"{router.__name__}: the client connection closed")


async def microseconds_per_request(router: ModuleType, requests: int, replicas: int) -> float:
    async with wired(router, replicas) as (client, upstream, flush):
        writes_before = client.transport.writes
        with open("/dev/null", "w") as null, contextlib.redirect_stderr(null):
            gc.collect()
            gc.disable()
            started = time.perf_counter()
            for _ in range(requests):
                client.data_received(REQUEST)
                upstream.data_received(RESPONSE)
            elapsed = time.perf_counter() - started
            gc.enable()
            flush()
        if client.transport.writes - writes_before != requests:
            raise SystemExit(f"{router.__name__}: the connection did not answer every request")
    return elapsed / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.python_path")
    parser.add_argument("routers", nargs=2, type=Path, metavar="ROUTER.py")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument(
        "--replicas", default="1,1", help="upstream URLs of the model, per copy (default 1,1)"
    )
    args = parser.parse_args()
    replica_counts = [int(count) for count in args.replicas.split(",")]
    routers = [load(path, f"router_{i}") for i, path in enumerate(args.routers)]
    timings: list[list[float]] = [[] for _ in routers]
    for _ in range(args.runs):
        for router, runs, count in zip(routers, timings, replica_counts, strict=True):
            runs.append(asyncio.run(microseconds_per_request(router, args.requests, count)))
    for path, runs, count in zip(args.routers, timings, replica_counts, strict=True):
        fastest, median = min(runs), statistics.median(runs)
        print(f"{path} ({count} upstream(s)): fastest {fastest:.2f} µs, median {median:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
