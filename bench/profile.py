"""Where a small request's Python time goes, for one or more copies of the router.

    .venv/bin/python -m bench.profile ROUTER.py [ROUTER.py ...] [--top 15]

For each copy, on the in-process exchange of ``bench/python_path.py`` (a keep-alive client and
a pooled upstream on transports that make no system calls): the time per request without a
profiler, split into the request's side (the client's bytes in to the upstream write) and
the response's side (the upstream's bytes in to the next request being looked for); the
Python calls per request and the functions that take the most of it under cProfile; and from
tracemalloc, the most memory one exchange holds at once and what stays behind per request.
The sampling profiler's view of a real run is ``py-spy record --pid`` beside a wrk run: see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import pstats
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from bench.python_path import REQUEST, RESPONSE, load, microseconds_per_request, wired

WARM_UP = 2_000
TIMED = 20_000
RUNS = 7


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with open("/dev/null", "w") as null, contextlib.redirect_stderr(null):
        yield


async def sides(routers: list[ModuleType]) -> list[tuple[float, float]]:
    """Microseconds per request on either side of the exchange, for each router: medians of
    RUNS runs, the routers taking turns so that they meet the same machine."""
    measured: list[tuple[list[float], list[float]]] = [([], []) for _ in routers]
    clock = time.perf_counter
    async with contextlib.AsyncExitStack() as stack:
        wirings = [await stack.enter_async_context(wired(router)) for router in routers]
        with _quiet():
            for _ in range(RUNS):
                for (client, upstream, flush), (request_side, response_side) in zip(
                    wirings, measured, strict=True
                ):
                    spent_in, spent_out = 0.0, 0.0
                    gc.collect()
                    gc.disable()
                    for _ in range(TIMED):
                        started = clock()
                        client.data_received(REQUEST)
                        sent = clock()
                        upstream.data_received(RESPONSE)
                        spent_in += sent - started
                        spent_out += clock() - sent
                    gc.enable()
                    flush()
                    request_side.append(spent_in / TIMED * 1e6)
                    response_side.append(spent_out / TIMED * 1e6)
    return [(statistics.median(a), statistics.median(b)) for a, b in measured]


async def profiled(router: ModuleType) -> pstats.Stats:
    await microseconds_per_request(router, WARM_UP, 1)
    profile = cProfile.Profile()
    profile.enable()
    await microseconds_per_request(router, TIMED, 1)
    profile.disable()
    return pstats.Stats(profile)


async def memory(router: ModuleType) -> tuple[int, float]:
    """(the most bytes one exchange holds at once, bytes left behind per request)."""
    async with wired(router) as (client, upstream, flush):
        with _quiet():
            for _ in range(WARM_UP):
                client.data_received(REQUEST)
                upstream.data_received(RESPONSE)
            flush()
            gc.collect()
            tracemalloc.start()
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            client.data_received(REQUEST)
            upstream.data_received(RESPONSE)
            _, peak = tracemalloc.get_traced_memory()
            for _ in range(TIMED):
                client.data_received(REQUEST)
                upstream.data_received(RESPONSE)
            flush()
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    return peak - before, (after - before) / (TIMED + 1)


def report(path: Path, router: ModuleType, split: tuple[float, float], top: int) -> None:
    request_side, response_side = split
    stats = asyncio.run(profiled(router))
    held, left = asyncio.run(memory(router))
    print(f"== {path}")
    print(
        f"{request_side + response_side:.2f} µs per request: request side {request_side:.2f}, "
        f"response side {response_side:.2f}"
    )
    print(f"{stats.total_calls / TIMED:.0f} Python calls per request (cProfile)")
    print(f"tracemalloc: {held:,} bytes held at most during one exchange, {left:+.1f} B/request")
    print(f"top {top} by own time under cProfile (µs per request, profiler included):")
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).name}:{line}({name})" if line else name
        rows.append((own / TIMED * 1e6, calls / TIMED, where))
    for own, calls, where in sorted(rows, reverse=True)[:top]:
        print(f"  {own:6.2f}  {calls:4.1f}x  {where}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("routers", nargs="+", type=Path, metavar="ROUTER.py")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    routers = [load(path, f"router_{index}") for index, path in enumerate(args.routers)]
    splits = asyncio.run(sides(routers))
    for path, router, split in zip(args.routers, routers, splits, strict=True):
        report(path, router, split, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
