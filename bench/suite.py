"""The benchmark run: services up, each phase measured against direct, nginx and llmhop.

`python -m bench --help` lists the options; `bench/run` installs what is missing first.
Every phase is bounded (wrk runs for a fixed time, streams have deadlines) and every process
started here is stopped at the end, or killed with us (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import harness, sse_client
from bench.harness import Pinning, Service, WrkResult
from bench.report import Results, Target, markdown, svg_plot, text_table, write_document

PHASES = (
    "small",
    "large",
    "models",
    "replicas",
    "sse",
    "streams",
    "llama",
    "baseline",
    "reference",
    "soak",
)
SMALL_CONCURRENCIES = (1, 16, 64)
LARGE_BODY_BYTES = 1024 * 1024
LARGE_CONCURRENCY = 4
MODELS_CONCURRENCY = 16
MANY_MODELS = 10_000
MODELS_ROUNDS = 2  # alternating 1-model and 10,000-model runs, to spread drift over both
REPLICAS_ROUNDS = 4  # one run varies by a quarter on a busy machine: the median of four
BASELINE_ROUNDS = 6  # this router against another revision: each goes first in half the rounds
SOAK_REQUESTS = 100_000
SOAK_CONNECTIONS = 16
SOAK_RUN_SECONDS = 5  # wrk runs this long, again and again until the requests are sent
SOAK_MAX_RUNS = 60
SOAK_RSS_GROWTH = 1.10  # RSS after the last run over after the first: flat, give or take
SOAK_SETTLE_SECONDS = 5.0
WARMUP_SECONDS = 1
STEADY_MARGIN = 0.1  # share of each wrk run left out at either end

SSE_STREAMS = 20
SSE_CHUNKS = 200
SSE_INTERVAL_MS = 5.0
SSE_START_SPACING = SSE_INTERVAL_MS / 1000 / SSE_STREAMS  # spread sends over the interval
SSE_TIMEOUT = 15.0

IDLE_STREAMS = 1000
IDLE_CHUNKS = 10
IDLE_INTERVAL_MS = 1000.0
IDLE_START_SPACING = 0.001  # a one-second ramp keeps the accept queues short
STALL_SLACK = 0.5  # a gap longer than the interval plus this is a stall
RSS_SAMPLE_INTERVAL = 0.1

LLAMA_MODEL = "tiny"
LLAMA_TOKENS = 64
LLAMA_WARMUP_ROUNDS = 2
LLAMA_TIMEOUT = 30.0

DOCUMENT = harness.REPO_ROOT / "docs" / "benchmarks.md"
PLOT = harness.REPO_ROOT / "docs" / "benchmarks.svg"
RESULTS_DIR = harness.BENCH_DIR / "results"
SHARED_MACHINE_BUSY = 0.05  # others' load above this share of all cores is noted
OTHERS_LOAD_SAMPLE = 0.5  # seconds of /proc/stat before each phase

CHAT_PATH = "/v1/chat/completions"
STARTUP_SECTION = "Startup and idle memory (3 models: fast, sse, tiny)"
LARGE_SECTION = f"1 MiB POST, concurrency {LARGE_CONCURRENCY}"
MODELS_SECTION = f"{MANY_MODELS:,} models in the config (concurrency {MODELS_CONCURRENCY})"
REPLICAS_SECTION = f"A model with 2 upstreams against 1 (concurrency {MODELS_CONCURRENCY})"
BASELINE_SECTION = "This router against another revision of it (medians of alternating runs)"
REFERENCE_SECTION = "Beside the Go reference and nginx (medians of alternating runs)"
SOAK_SECTION = (
    f"Soak: {SOAK_REQUESTS:,} requests to an upstream that fails one in ten at random, "
    "beside a replica that refuses"
)
SSE_SECTION = f"SSE: {SSE_STREAMS} streams x {SSE_CHUNKS} chunks, {SSE_INTERVAL_MS:g} ms apart"
STREAMS_SECTION = f"{IDLE_STREAMS:,} concurrent SSE streams, one chunk a second for {IDLE_CHUNKS} s"
LLAMA_SECTION = f"llama.cpp (tiny GGUF): streamed chat, {LLAMA_TOKENS} tokens"


def small_section(concurrency: int) -> str:
    return f"Small POST, concurrency {concurrency}"


MIB = 1024 * 1024


@dataclass(frozen=True)
class Options:
    seconds: int  # of each wrk run
    phases: frozenset[str]
    write: bool
    work_dir: Path
    baseline: Path | None = None  # another revision's router, for the baseline phase
    reference: Path | None = None  # the Go reference's binary, for the reference phase
    rounds: int = BASELINE_ROUNDS  # of the baseline and reference phases
    soak_requests: int = SOAK_REQUESTS


@dataclass
class Endpoint:
    """Where one target listens for each kind of upstream, and the process that proxies."""

    name: str
    host: str
    ports: dict[str, int]  # "fast", "sse", "llama" → port
    proxy_pid: int | None  # None for direct

    def url(self, kind: str, path: str = CHAT_PATH) -> str:
        return f"http://{self.host}:{self.ports[kind]}{path}"

    def cpu_seconds(self) -> float | None:
        return None if self.proxy_pid is None else harness.tree_cpu_seconds(self.proxy_pid)

    def rss_bytes(self) -> int | None:
        return None if self.proxy_pid is None else harness.tree_rss_bytes(self.proxy_pid)


@dataclass(frozen=True)
class Counters:
    at: float
    cpu_seconds: float | None  # the proxy's
    upstream_connections: int  # opened since start


@dataclass
class LoadRun:
    """A wrk run against one endpoint; CPU and connections are over its steady window."""

    wrk: WrkResult
    window_requests: float  # wrk's rate times the window's length
    proxy_cpu_seconds: float | None
    upstream_connections: int

    def cpu_us_per_request(self) -> float | None:
        if self.proxy_cpu_seconds is None or not self.window_requests:
            return None
        return self.proxy_cpu_seconds / self.window_requests * 1e6

    def connections_per_thousand(self) -> float:
        return self.upstream_connections / max(self.window_requests, 1) * 1000


@dataclass
class Bench:
    options: Options
    pinning: Pinning
    results: Results = field(default_factory=Results)
    services: list[Service] = field(default_factory=list)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    fast: Service | None = None
    llmhop: Service | None = None
    nginx: Service | None = None
    idle_rss: dict[str, float | None] = field(default_factory=dict)
    startup: dict[str, float | None] = field(default_factory=dict)
    raw: dict[str, object] = field(default_factory=dict)
    others_load: list[float] = field(default_factory=list)  # busy share between phases

    # -- services ----------------------------------------------------------------------------

    def start(self) -> None:
        work, load = self.options.work_dir, self.pinning.load_cores
        self.fast = self._keep(harness.start_fast_upstream(work, load))
        sse = self._keep(harness.start_sse_upstream(work, load))
        upstreams = {"fast": self.fast, "sse": sse}
        if "llama" in self.options.phases:
            llama = self._start_llama()
            if llama is not None:
                upstreams["llama"] = llama
        direct_ports = {kind: service.port for kind, service in upstreams.items()}
        self.endpoints["direct"] = Endpoint("direct", harness.LOOPBACK, direct_ports, None)

        proxy_cores = self.pinning.proxy_cores
        addresses = {kind: f"{s.host}:{s.port}" for kind, s in upstreams.items()}
        self.nginx, nginx_ports = harness.start_nginx_proxy(addresses, work, proxy_cores)
        self._keep(self.nginx)
        self.endpoints["nginx"] = Endpoint("nginx", harness.LOOPBACK, nginx_ports, self.nginx.pid)

        models = {"fast": self.fast.url, "sse": sse.url}
        if "llama" in upstreams:
            models[LLAMA_MODEL] = upstreams["llama"].url
        config = harness.llmhop_config(models)
        self.llmhop = self._keep(harness.start_llmhop("llmhop", config, work, proxy_cores))
        same_port = dict.fromkeys(upstreams, self.llmhop.port)
        self.endpoints["llmhop"] = Endpoint("llmhop", harness.LOOPBACK, same_port, self.llmhop.pid)
        time.sleep(0.5)  # let both proxies settle before their idle memory is read
        self.idle_rss = {name: _mib(e.rss_bytes()) for name, e in self.endpoints.items()}
        self.startup = {"nginx": self.nginx.startup_seconds, "llmhop": self.llmhop.startup_seconds}
        self.results.add(STARTUP_SECTION, "startup to listening", "s", dict(self.startup), 3)
        self.results.add(STARTUP_SECTION, "proxy RSS, idle after start", "MiB", self.idle_rss, 1)

    def _keep(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def _start_llama(self) -> Service | None:
        try:
            from tests.e2e.e2e_support import missing_backend_reason, start_llama_server
            from tests.e2e.tiny_model import write_tiny_llama_gguf
        except ImportError as error:
            self.results.notes.append(f"llama.cpp phase skipped: {error}")
            return None
        reason = missing_backend_reason()
        if reason is not None:
            self.results.notes.append(f"llama.cpp phase skipped: {reason}")
            return None
        model_path = self.options.work_dir / "tiny.gguf"
        write_tiny_llama_gguf(model_path)
        log_dir = self.options.work_dir / "llama"
        log_dir.mkdir(exist_ok=True)
        started = time.monotonic()
        try:
            server = start_llama_server(model_path, LLAMA_MODEL, log_dir)
        except BaseException as error:  # start_llama_server reports with pytest.fail
            if isinstance(error, KeyboardInterrupt | SystemExit):
                raise
            self.results.notes.append(f"llama.cpp phase skipped: {error}")
            return None
        Pinning.move(server.pid, self.pinning.load_cores)
        service = Service(server.managed, harness.LOOPBACK, server.port, time.monotonic() - started)
        return self._keep(service)

    def stop(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()

    # -- measuring ---------------------------------------------------------------------------

    def upstream_connections(self, endpoint: Endpoint) -> int:
        """Connections opened to the fast upstream so far, as far as the endpoint can tell."""
        assert self.fast is not None and self.llmhop is not None
        if endpoint.name == "llmhop":
            return harness.llmhop_upstream_connections(self.llmhop)
        # stub_status counts its own request's connection too: one per reading.
        return harness.nginx_accepted_connections(self.fast) - 1

    def load(self, endpoint: Endpoint, connections: int, body_bytes: int = 0) -> LoadRun:
        """A wrk run, with the proxy's CPU and upstream connections read over its steady part.

        The first and last moments are left out: when wrk stops, requests in flight are cut
        off and a proxy rightly drops their upstream connections (that is how a generation is
        cancelled), so the next run opens fresh ones; those are not the steady state.
        """
        seconds = self.options.seconds
        process = harness.start_wrk(
            endpoint.url("fast"),
            connections,
            seconds,
            self.pinning.load_cores,
            body_bytes=body_bytes,
        )
        try:
            time.sleep(seconds * STEADY_MARGIN)
            before = self._counters(endpoint)
            time.sleep(seconds * (1 - 2 * STEADY_MARGIN))
            after = self._counters(endpoint)
        finally:
            wrk = harness.finish_wrk(process, seconds)
        window_requests = wrk.requests_per_second * (after.at - before.at)
        cpu = None
        if before.cpu_seconds is not None and after.cpu_seconds is not None:
            cpu = after.cpu_seconds - before.cpu_seconds
        opened = after.upstream_connections - before.upstream_connections
        return LoadRun(wrk, window_requests, cpu, opened)

    def _counters(self, endpoint: Endpoint) -> Counters:
        return Counters(
            time.monotonic(), endpoint.cpu_seconds(), self.upstream_connections(endpoint)
        )

    def warm_up(self) -> None:
        for endpoint in self.endpoints.values():
            harness.run_wrk(endpoint.url("fast"), 16, WARMUP_SECONDS, self.pinning.load_cores)

    @contextlib.contextmanager
    def router_for_one_run(
        self, name: str, config: dict[str, object], script: Path = harness.ROUTER_SCRIPT
    ) -> Iterator[Service]:
        """A router started on the proxy's cores for one measurement, stopped after it."""
        work, cores = self.options.work_dir, self.pinning.proxy_cores
        router = harness.start_llmhop(name, config, work, cores, script)
        try:
            yield router
        finally:
            router.stop()

    def log(self, message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    # -- phases ------------------------------------------------------------------------------

    def phase_small(self) -> None:
        self.warm_up()
        for concurrency in SMALL_CONCURRENCIES:
            runs = {}
            for name, endpoint in self.endpoints.items():
                self.log(f"small POST, concurrency {concurrency}: {name}")
                runs[name] = self.load(endpoint, concurrency)
            self._load_figures(small_section(concurrency), runs)
            self.raw[f"small_c{concurrency}"] = {n: _plain(r) for n, r in runs.items()}

    def phase_large(self) -> None:
        runs = {}
        for name, endpoint in self.endpoints.items():
            self.log(f"1 MiB POST, concurrency {LARGE_CONCURRENCY}: {name}")
            runs[name] = self.load(endpoint, LARGE_CONCURRENCY, body_bytes=LARGE_BODY_BYTES)
        self._load_figures(LARGE_SECTION, runs)
        self.raw["large"] = {n: _plain(r) for n, r in runs.items()}

    def _load_figures(self, section: str, runs: dict[str, LoadRun]) -> None:
        add = self.results.add
        add(
            section,
            "requests/s",
            "req/s",
            {n: r.wrk.requests_per_second for n, r in runs.items()},
            0,
        )
        for label, attribute in (("p50", "p50_us"), ("p99", "p99_us")):
            values: dict[str, float | None] = {
                n: float(getattr(r.wrk, attribute)) for n, r in runs.items()
            }
            add(section, f"latency {label}", "µs", values, 0)
            add(section, f"added latency {label}", "µs", _added(values), 0)
        cpu = {n: r.cpu_us_per_request() for n, r in runs.items()}
        add(section, "proxy CPU per request", "µs", cpu, 1)
        per_thousand = {n: None if v is None else v / 1000 for n, v in cpu.items()}
        add(section, "proxy CPU per 1,000 requests", "CPU-s", per_thousand, 4)
        connections = {n: r.connections_per_thousand() for n, r in runs.items()}
        add(section, "upstream connections opened per 1,000 requests", "conn", connections, 2)
        errors = {n: float(r.wrk.errors) for n, r in runs.items()}
        add(section, "errors (socket, non-2xx, timeouts)", "count", errors, 0)

    def phase_models(self) -> None:
        assert self.fast is not None
        name = f"model-{MANY_MODELS // 2:05d}"
        configs = {
            "1 model": harness.llmhop_config({name: self.fast.url}),
            f"{MANY_MODELS:,} models": harness.llmhop_config(
                {f"model-{i:05d}": self.fast.url for i in range(MANY_MODELS)}
            ),
        }
        rates: dict[str, list[float]] = {label: [] for label in configs}
        startups: dict[str, float] = {}
        for round_number in range(MODELS_ROUNDS):
            for label, config in configs.items():
                self.log(f"{label}, concurrency {MODELS_CONCURRENCY}, round {round_number + 1}")
                run_name = f"llmhop-{label.split()[0].replace(',', '')}-models"
                with self.router_for_one_run(run_name, config) as router:
                    startups[label] = min(startups.get(label, 1e9), router.startup_seconds)
                    wrk = harness.run_wrk(
                        f"{router.url}{CHAT_PATH}",
                        MODELS_CONCURRENCY,
                        self.options.seconds,
                        self.pinning.load_cores,
                        model=name,
                    )
                    rates[label].append(wrk.requests_per_second)
        reference = self.results.find(small_section(MODELS_CONCURRENCY), "requests/s")
        others = {n: reference.value(n) if reference else None for n in ("direct", "nginx")}
        section = MODELS_SECTION
        for label, values in rates.items():
            self.results.add(
                section,
                f"requests/s, {label}",
                "req/s",
                {**others, "llmhop": statistics.mean(values)},
                0,
            )
        for label, seconds in startups.items():
            values = {"direct": None, "nginx": self.startup.get("nginx"), "llmhop": seconds}
            self.results.add(section, f"startup to listening, {label}", "s", values, 3)
        self.raw["models"] = {"rates": rates, "startups": startups}

    def phase_replicas(self) -> None:
        """The fast upstream given once, and twice as two replicas: what choosing costs."""
        assert self.fast is not None
        url = self.fast.url
        one = harness.llmhop_config({"fast": url})
        two = {**one, "models": {"fast": {"urls": [url, url]}}}
        cpu: dict[str, list[float]] = {"1 upstream": [], "2 upstreams": []}
        order = [("1 upstream", one), ("2 upstreams", two)]
        for round_number in range(REPLICAS_ROUNDS):
            # Each goes first in one round: whatever drifts between runs is shared out evenly.
            for label, config in order if round_number % 2 == 0 else order[::-1]:
                self.log(f"{label}, concurrency {MODELS_CONCURRENCY}, round {round_number + 1}")
                with self.router_for_one_run(
                    f"llmhop-replicas-{label.split()[0]}", config
                ) as router:
                    endpoint = Endpoint(label, router.host, {"fast": router.port}, router.pid)
                    run = self.load(endpoint, MODELS_CONCURRENCY)
                    if (value := run.cpu_us_per_request()) is not None:
                        cpu[label].append(value)
        for label, values in cpu.items():
            figures = {"direct": None, "nginx": None, "llmhop": _median(values)}
            self.results.add(REPLICAS_SECTION, f"proxy CPU per request, {label}", "µs", figures, 1)
        self.raw["replicas"] = cpu

    def phase_baseline(self) -> None:
        """The router against another revision of itself (``--baseline``)."""
        baseline = self.options.baseline
        if baseline is None:
            self.results.notes.append("baseline phase skipped: no --baseline router given")
            return
        self._alternate(
            BASELINE_SECTION,
            "baseline",
            {
                "before": self._router_endpoint("before", baseline),
                "now": self._router_endpoint("now"),
            },
        )

    def phase_reference(self) -> None:
        """The router beside the Go reference (``--reference``) and nginx."""
        reference = self.options.reference
        if reference is None:
            self.results.notes.append("reference phase skipped: no --reference binary given")
            return
        assert self.nginx is not None
        nginx = self.endpoints["nginx"]
        self._alternate(
            REFERENCE_SECTION,
            "reference",
            {
                "nginx": lambda: contextlib.nullcontext(nginx),
                "Go reference": self._reference_endpoint(reference),
                "llmhop": self._router_endpoint("llmhop"),
            },
        )

    def _router_endpoint(
        self, label: str, script: Path = harness.ROUTER_SCRIPT
    ) -> Callable[[], contextlib.AbstractContextManager[Endpoint]]:
        assert self.fast is not None
        config = harness.llmhop_config({"fast": self.fast.url})

        @contextlib.contextmanager
        def started() -> Iterator[Endpoint]:
            with self.router_for_one_run(f"llmhop-{label}", config, script) as router:
                yield Endpoint(label, router.host, {"fast": router.port}, router.pid)

        return started

    def _reference_endpoint(
        self, binary: Path
    ) -> Callable[[], contextlib.AbstractContextManager[Endpoint]]:
        assert self.fast is not None
        work, cores, upstream = self.options.work_dir, self.pinning.proxy_cores, self.fast.url

        @contextlib.contextmanager
        def started() -> Iterator[Endpoint]:
            service = harness.start_reference(binary, {"fast": upstream}, work, cores)
            try:
                yield Endpoint("reference", service.host, {"fast": service.port}, service.pid)
            finally:
                service.stop()

        return started

    def _direct_p50(self) -> float | None:
        """The direct connection's p50 at concurrency 1, what "added" latency is counted
        from: the small phase's, or measured now when that phase did not run."""
        small = self.results.find(small_section(1), "latency p50")
        if small is not None and small.value("direct") is not None:
            return small.value("direct")
        self.log("direct, concurrency 1, for the added latency")
        return float(self.load(self.endpoints["direct"], 1).wrk.p50_us)

    def _alternate(
        self,
        section: str,
        key: str,
        contenders: dict[str, Callable[[], contextlib.AbstractContextManager[Endpoint]]],
    ) -> None:
        """Each contender measured in turn on the same cores, round after round, each round
        starting one further along: CPU per request at concurrency 16 and p50 latency at 1.
        Drift on a shared machine then falls on every contender alike."""
        labels = list(contenders)
        figures: dict[str, dict[str, list[float]]] = {
            label: {"cpu": [], "p50": [], "rss": []} for label in labels
        }
        for round_number in range(self.options.rounds):
            shift = round_number % len(labels)
            for label in labels[shift:] + labels[:shift]:
                self.log(f"{key}: {label}, round {round_number + 1}")
                with contenders[label]() as endpoint:
                    harness.run_wrk(
                        endpoint.url("fast"), 16, WARMUP_SECONDS, self.pinning.load_cores
                    )
                    if (cpu := self.load(endpoint, 16).cpu_us_per_request()) is not None:
                        figures[label]["cpu"].append(cpu)
                    figures[label]["p50"].append(float(self.load(endpoint, 1).wrk.p50_us))
                    if (rss := _mib(endpoint.rss_bytes())) is not None:
                        figures[label]["rss"].append(rss)
        direct_p50 = self._direct_p50()
        add = self.results.add
        for label, measured in figures.items():
            cpu = _median(measured["cpu"])
            p50 = _median(measured["p50"])
            added = None if p50 is None or direct_p50 is None else p50 - direct_p50
            add(section, f"proxy CPU per request (c=16), {label}", "µs", {"llmhop": cpu}, 1)
            add(section, f"latency p50 (c=1), {label}", "µs", {"llmhop": p50}, 0)
            add(section, f"added latency p50 (c=1), {label}", "µs", {"llmhop": added}, 0)
            rss = _median(measured["rss"])
            add(section, f"proxy RSS after the runs, {label}", "MiB", {"llmhop": rss}, 1)
        self.raw[key] = figures

    def phase_soak(self) -> None:
        """Many requests against random faults: memory stays flat, every gauge ends at 0, and
        the log has no error the router did not handle."""
        work, load = self.options.work_dir, self.pinning.load_cores
        faulty = harness.start_faulty_upstream(work, load)
        try:
            config = harness.llmhop_config({})
            config["models"] = {"fast": {"urls": [faulty.url, _refused_url()]}}
            with self.router_for_one_run("llmhop-soak", config) as router:
                endpoint = Endpoint("soak", router.host, {"fast": router.port}, router.pid)
                sent, rss = 0, []
                for run in range(SOAK_MAX_RUNS):
                    if sent >= self.options.soak_requests:
                        break
                    self.log(f"soak: run {run + 1}, {sent:,} requests so far")
                    url = endpoint.url("fast")
                    sent += harness.run_wrk(url, SOAK_CONNECTIONS, SOAK_RUN_SECONDS, load).requests
                    rss.append(_mib(endpoint.rss_bytes()))
                gauges = _gauges_in_flight(router)
                log = router.managed.log_path.read_text(errors="replace")
        finally:
            faulty.stop()
        unhandled = log.count("never retrieved") + log.count("internal error")
        add = self.results.add
        add(SOAK_SECTION, "requests sent", "count", {"llmhop": float(sent)}, 0)
        add(SOAK_SECTION, "proxy RSS after the first run", "MiB", {"llmhop": rss[0]}, 1)
        add(SOAK_SECTION, "proxy RSS after the last run", "MiB", {"llmhop": rss[-1]}, 1)
        add(SOAK_SECTION, "requests in flight after the soak", "count", {"llmhop": gauges}, 0)
        add(SOAK_SECTION, "unhandled errors in the log", "count", {"llmhop": unhandled}, 0)
        self.raw["soak"] = {"sent": sent, "rss_mib": rss, "in_flight": gauges}

    def phase_sse(self) -> None:
        records = {}
        for name, endpoint in self.endpoints.items():
            # Untimed: fills the proxies' upstream pools, as in steady service.
            self._streams(endpoint, "sse", SSE_STREAMS, 0, SSE_TIMEOUT, chunks=2, interval_ms=1)
            self.log(f"SSE, {SSE_STREAMS} streams of {SSE_CHUNKS} chunks: {name}")
            records[name] = self._streams(
                endpoint, "sse", SSE_STREAMS, SSE_START_SPACING, SSE_TIMEOUT
            )
        section = SSE_SECTION
        add = self.results.add
        first_bytes = {n: _median_us(sse_client.first_byte_times_ns(r)) for n, r in records.items()}
        add(section, "time to first byte, median", "µs", first_bytes, 0)
        add(section, "added time to first byte, median", "µs", _added(first_bytes), 0)
        transits = {n: sse_client.transit_times_ns(r) for n, r in records.items()}
        medians = {n: _median_us(t) for n, t in transits.items()}
        maxima = {n: max(t) / 1e3 if t else None for n, t in transits.items()}
        add(section, "chunk transit (upstream send → client), median", "µs", medians, 0)
        add(
            section,
            "chunk transit, p99",
            "µs",
            {n: _percentile_us(t, 99) for n, t in transits.items()},
            0,
        )
        add(section, "chunk transit, max", "µs", maxima, 0)
        add(section, "added delay per chunk, median", "µs", _added(medians), 0)
        add(section, "added delay per chunk, max", "µs", _added(maxima), 0)
        coalesced = {n: sse_client.coalesced_fraction(r) * 100 for n, r in records.items()}
        add(section, "chunks coalesced with an earlier one", "%", coalesced, 2)
        incomplete = {n: float(sum(not s.complete for s in r)) for n, r in records.items()}
        add(section, "streams not completed", "count", incomplete, 0)

    def phase_streams(self) -> None:
        section = STREAMS_SECTION
        peak_rss: dict[str, float | None] = {"direct": None}
        cpu: dict[str, float | None] = {"direct": None}
        stalls: dict[str, float | None] = {}
        gaps: dict[str, float | None] = {}
        for name, endpoint in self.endpoints.items():
            if endpoint.proxy_pid is None:
                continue  # a thousand streams straight to the upstream measure no proxy
            self.log(f"{IDLE_STREAMS} idle-ish SSE streams: {name}")
            cpu_before = endpoint.cpu_seconds() or 0.0
            samples: list[int] = []
            records = self._streams(
                endpoint,
                "sse",
                IDLE_STREAMS,
                IDLE_START_SPACING,
                IDLE_CHUNKS * IDLE_INTERVAL_MS / 1000 + 10,
                chunks=IDLE_CHUNKS,
                interval_ms=IDLE_INTERVAL_MS,
                sample=lambda e=endpoint, s=samples: s.append(e.rss_bytes() or 0),
            )
            cpu[name] = (endpoint.cpu_seconds() or 0.0) - cpu_before
            peak_rss[name] = _mib(max(samples, default=0))
            interval = IDLE_INTERVAL_MS / 1000
            stalls[name] = float(sum(sse_client.stalled(r, interval, STALL_SLACK) for r in records))
            gaps[name] = max(sse_client.longest_gap_ns(r) for r in records) / 1e6
        add = self.results.add
        add(section, "proxy RSS, peak with the streams open", "MiB", peak_rss, 1)
        add(section, "proxy CPU for the whole phase", "CPU-s", cpu, 2)
        add(section, "streams stalled or unfinished", "count", stalls, 0)
        add(section, "longest gap between chunks", "ms", gaps, 0)

    def phase_llama(self) -> None:
        if "llama" not in self.endpoints["direct"].ports:
            return
        rounds = max(5, self.options.seconds * 4)
        timings: dict[str, list[sse_client.GenerationTiming]] = {n: [] for n in self.endpoints}
        self.log(f"llama.cpp: {rounds} streamed chats of {LLAMA_TOKENS} tokens per target")
        assert self.llmhop is not None
        opened_before = harness.llmhop_upstream_connections(self.llmhop)
        for round_number in range(LLAMA_WARMUP_ROUNDS + rounds):
            for name, endpoint in self.endpoints.items():
                (record,) = self._streams(
                    endpoint, "llama", 1, 0, LLAMA_TIMEOUT, body=self._llama_body()
                )
                timing = sse_client.generation_timing(record)
                if timing is not None and round_number >= LLAMA_WARMUP_ROUNDS:
                    timings[name].append(timing)
        # Whether llmhop kept its connection to llama.cpp (uvicorn) between streams.
        opened = harness.llmhop_upstream_connections(self.llmhop) - opened_before
        section = LLAMA_SECTION
        add = self.results.add
        first = {n: _median_ms([t.first_token_s for t in ts]) for n, ts in timings.items()}
        total = {n: _median_ms([t.total_s for t in ts]) for n, ts in timings.items()}
        add(section, "time to first token, median", "ms", first, 3)
        add(section, "added time to first token, median", "ms", _added(first), 3)
        add(section, "total, median", "ms", total, 3)
        add(section, "added total, median", "ms", _added(total), 3)
        tokens = {
            n: float(statistics.median([t.tokens for t in ts])) if ts else None
            for n, ts in timings.items()
        }
        add(section, "content tokens per stream, median", "tokens", tokens, 0)
        streams = (LLAMA_WARMUP_ROUNDS + rounds) or 1
        add(
            section,
            "upstream connections opened per stream",
            "conn",
            {"llmhop": opened / streams},
            2,
        )
        add(
            section,
            "completed streams",
            "count",
            {n: float(len(ts)) for n, ts in timings.items()},
            0,
        )

    @staticmethod
    def _llama_body() -> dict[str, object]:
        return {
            "model": LLAMA_MODEL,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": LLAMA_TOKENS,
            "temperature": 0,
            "stream": True,
        }

    def _streams(
        self,
        endpoint: Endpoint,
        kind: str,
        count: int,
        spacing: float,
        timeout: float,
        *,
        chunks: int = SSE_CHUNKS,
        interval_ms: float = SSE_INTERVAL_MS,
        body: dict[str, object] | None = None,
        sample: Callable[[], None] | None = None,
    ) -> list[sse_client.StreamRecord]:
        """Run `count` streams against the endpoint; `sample` is called every 100 ms meanwhile."""
        path = (
            CHAT_PATH
            if kind == "llama"
            else f"{CHAT_PATH}?chunks={chunks}&interval_ms={interval_ms:g}"
        )
        body = body or {
            "model": kind,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        request = sse_client.stream_request(endpoint.host, endpoint.ports[kind], path, body)

        async def run() -> list[sse_client.StreamRecord]:
            streams = asyncio.create_task(
                sse_client.run_streams(
                    endpoint.host, endpoint.ports[kind], request, count, spacing, timeout
                )
            )
            while sample is not None and not streams.done():
                sample()
                await asyncio.sleep(RSS_SAMPLE_INTERVAL)
            return await streams

        # The client stamps each read: a collection of the harness' garbage in the middle would
        # be counted as the proxy's delay (and as coalesced chunks).
        gc.collect()
        gc.disable()
        try:
            return asyncio.run(run())
        finally:
            gc.enable()

    # -- targets -----------------------------------------------------------------------------

    def evaluate_targets(self) -> None:
        """The performance targets against this run's figures (met, missed, or not measured)."""
        results = self.results

        def check(goal: str, section: str, name: str, limit: float, versus_nginx: bool) -> None:
            figure = results.find(section, name)
            value = None if figure is None else figure.value("llmhop")
            if figure is None or value is None:
                results.targets.append(Target(goal, "not measured", None))
                return
            measured = f"{figure.formatted('llmhop')} {figure.unit}"
            if versus_nginx:
                ratio = figure.ratio("llmhop", "nginx")
                measured += f" vs nginx {figure.formatted('nginx')} {figure.unit}"
                measured += f" = {ratio:.2f}x" if ratio is not None else ""
                met = ratio is not None and ratio <= limit
            else:
                met = value <= limit
            results.targets.append(Target(goal, measured, met))

        cpu, added_p50 = "proxy CPU per request", "added latency p50"
        check("CPU per request at concurrency 16 <= 4x nginx's", small_section(16), cpu, 4, True)
        check(
            "<= 1 new upstream connection per 1,000 requests (concurrency 16)",
            small_section(16),
            "upstream connections opened per 1,000 requests",
            1,
            False,
        )
        check("added p50 at concurrency 1 <= 2x nginx's", small_section(1), added_p50, 2, True)
        first, last = (
            results.find(SOAK_SECTION, f"proxy RSS after the {which} run")
            for which in ("first", "last")
        )
        if (
            first is not None
            and last is not None
            and first.value("llmhop")
            and last.value("llmhop")
        ):
            growth = last.value("llmhop") / first.value("llmhop")
            results.targets.append(
                Target(
                    f"soak: RSS after the last run <= {SOAK_RSS_GROWTH:.2f}x after the first",
                    f"{growth:.3f}x",
                    growth <= SOAK_RSS_GROWTH,
                )
            )
        else:
            results.targets.append(Target("soak: RSS flat", "not measured", None))
        check(
            "soak: no request left in flight",
            SOAK_SECTION,
            "requests in flight after the soak",
            0,
            False,
        )
        check(
            "soak: no unhandled error in the log",
            SOAK_SECTION,
            "unhandled errors in the log",
            0,
            False,
        )
        check("p99 at concurrency 1 <= 1 ms", small_section(1), "latency p99", 1000, False)
        check(
            "SSE: added transit per chunk <= 0.1 ms p50",
            SSE_SECTION,
            "added delay per chunk, median",
            100,
            False,
        )
        check(
            "SSE: <= 1 % of chunks coalesced",
            SSE_SECTION,
            "chunks coalesced with an earlier one",
            1,
            False,
        )
        check(
            "SSE: TTFB added <= 1 ms",
            SSE_SECTION,
            "added time to first byte, median",
            1000,
            False,
        )
        check("1 MiB bodies: CPU per request <= 4x nginx's", LARGE_SECTION, cpu, 4, True)
        check(
            "llama.cpp: TTFT added <= 0.5 ms median",
            LLAMA_SECTION,
            "added time to first token, median",
            0.5,
            False,
        )
        self._check_many_models()
        self._check_replicas()
        self._check_reference()
        check(
            "10,000 models: startup <= 0.5 s",
            MODELS_SECTION,
            f"startup to listening, {MANY_MODELS:,} models",
            0.5,
            False,
        )
        check(
            "1,000 SSE streams: RSS <= 64 MiB",
            STREAMS_SECTION,
            "proxy RSS, peak with the streams open",
            64,
            False,
        )
        check(
            "1,000 SSE streams: none stalls",
            STREAMS_SECTION,
            "streams stalled or unfinished",
            0,
            False,
        )
        check("idle RSS <= 25 MiB", STARTUP_SECTION, "proxy RSS, idle after start", 25, False)

    def _check_many_models(self) -> None:
        goal = "10,000 models: req/s within 5 % of one model"
        one = self.results.find(MODELS_SECTION, "requests/s, 1 model")
        many = self.results.find(MODELS_SECTION, f"requests/s, {MANY_MODELS:,} models")
        one_rate = None if one is None else one.value("llmhop")
        many_rate = None if many is None else many.value("llmhop")
        if not one_rate or many_rate is None:
            self.results.targets.append(Target(goal, "not measured", None))
            return
        change = many_rate / one_rate - 1
        measured = f"{many_rate:,.0f} vs {one_rate:,.0f} req/s ({change:+.1%})"
        self.results.targets.append(Target(goal, measured, abs(change) <= 0.05))

    def _check_reference(self) -> None:
        """Measured side by side, in alternating runs: the issue's two goals for the hot path."""
        if self.options.reference is None:
            return
        for goal, name, rival, limit in (
            (
                "CPU per request at concurrency 16 <= 0.8x the Go reference's (alternating)",
                "proxy CPU per request (c=16)",
                "Go reference",
                0.8,
            ),
            (
                "added p50 at concurrency 1 <= 1.5x nginx's (alternating)",
                "added latency p50 (c=1)",
                "nginx",
                1.5,
            ),
        ):
            ours, theirs = (
                self.results.find(REFERENCE_SECTION, f"{name}, {label}")
                for label in ("llmhop", rival)
            )
            mine = None if ours is None else ours.value("llmhop")
            other = None if theirs is None else theirs.value("llmhop")
            if mine is None or not other:
                self.results.targets.append(Target(goal, "not measured", None))
                continue
            measured = f"{mine:.1f} vs {other:.1f} µs = {mine / other:.2f}x"
            self.results.targets.append(Target(goal, measured, mine / other <= limit))

    def _check_replicas(self) -> None:
        goal = "2 replicas: CPU per request within 5 % of one upstream's"
        figures = [
            self.results.find(REPLICAS_SECTION, f"proxy CPU per request, {label}")
            for label in ("1 upstream", "2 upstreams")
        ]
        one, two = (None if f is None else f.value("llmhop") for f in figures)
        if not one or two is None:
            self.results.targets.append(Target(goal, "not measured", None))
            return
        ratio = two / one
        measured = f"{two:.1f} vs {one:.1f} µs ({ratio:.3f}x)"
        self.results.targets.append(Target(goal, measured, ratio <= 1.05))


# -- helpers ---------------------------------------------------------------------------------


def _refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind((harness.LOOPBACK, 0))
        return f"http://{harness.LOOPBACK}:{sock.getsockname()[1]}"


def _gauges_in_flight(router: Service, settle: float = SOAK_SETTLE_SECONDS) -> float | None:
    """The sum of the router's in-flight gauges (by model and by key), read from /metrics
    until it is 0 or ``settle`` seconds have passed: when wrk stops, the requests it cut off
    end as the router notices their clients gone, and slow answers finish."""
    url = f"http://{router.host}:{router.port}/metrics"
    deadline = time.monotonic() + settle
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        pattern = r"^llmhop_(?:key_)?requests_in_flight\{[^}]*\} (\S+)$"
        total = sum(float(value) for value in re.findall(pattern, text, re.M))
        if not total or time.monotonic() > deadline:
            return total
        time.sleep(0.05)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


def _median_us(nanoseconds: list[int]) -> float | None:
    return statistics.median(nanoseconds) / 1e3 if nanoseconds else None


def _median_ms(seconds: list[float]) -> float | None:
    return statistics.median(seconds) * 1e3 if seconds else None


def _percentile_us(nanoseconds: list[int], percent: int) -> float | None:
    if len(nanoseconds) < 2:
        return None
    return statistics.quantiles(nanoseconds, n=100)[percent - 1] / 1e3


def _added(values: dict[str, float | None]) -> dict[str, float | None]:
    """What each proxy adds to the direct figure."""
    direct = values.get("direct")
    return {
        name: None if direct is None or value is None else value - direct
        for name, value in values.items()
        if name != "direct"
    }


def _plain(run: LoadRun) -> dict[str, object]:
    return {**asdict(run), "cpu_us_per_request": run.cpu_us_per_request()}


# -- the run ---------------------------------------------------------------------------------


def _command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (completed.stdout + completed.stderr).strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _cpu_family(model: str) -> str:
    """The CPU as users name it: "Intel Xeon", "AMD EPYC", not its model string."""
    for family in ("Intel Xeon", "AMD EPYC", "AMD Ryzen", "Intel Core"):
        if all(word in model for word in family.split()):
            return family
    words = re.sub(r"\((R|TM)\)|CPU|@.*|Processor|\d+-Core", " ", model, flags=re.I).split()
    return " ".join(words) or "unknown CPU"


def _virtual_machine() -> bool:
    # The "hypervisor" CPU flag: set when the kernel runs under one.
    with contextlib.suppress(OSError):
        return " hypervisor" in Path("/proc/cpuinfo").read_text()
    return False


def _llmhop_version() -> str:
    match = re.search(r'^VERSION = "([^"]+)"', harness.ROUTER_SCRIPT.read_text(), re.M)
    return match[1] if match else "?"


def machine_description(others_load: list[float]) -> list[tuple[str, str]]:
    """The machine and the programs, in the words of the people who read the results."""
    wrk_version = _command_output(["wrk", "-v"]).splitlines()[0]
    nginx_version = _command_output([harness.nginx_binary(), "-v"])
    kind = "VM" if _virtual_machine() else "machine"
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")),
        ("machine", f"a {os.cpu_count()}-core {_cpu_family(_cpu_model())} {kind}"),
        ("Python (llmhop)", platform.python_version()),
        ("nginx", nginx_version.removeprefix("nginx version: ")),
        ("wrk", wrk_version.split(" [")[0]),
        ("llmhop", _llmhop_version()),
        (
            "other load on the machine",
            f"up to {max(others_load):.0%} of all cores busy with other work, sampled before, "
            f"between and after the phases ({', '.join(f'{share:.0%}' for share in others_load)})",
        ),
    ]


def setup_description(options: Options, pinning: Pinning) -> list[str]:
    reference = []
    if options.reference is not None and "reference" in options.phases:
        reference.append(
            f"Go reference: the binary given with `--reference` ({options.reference.name}), "
            f"pinned to core {pinning.proxy_cores} like the others (Go's scheduler then runs "
            "one thread of Go code), from a config of its own with the same upstream. It "
            "writes no access log; llmhop and nginx write one line per request. Each contender "
            f"of the alternating phases runs {options.rounds} rounds, each round in a turned "
            "order, and the medians are shown."
        )
    return [
        *reference,
        f"Pinned with `taskset`: wrk (one thread), the SSE client, this harness and all upstreams "
        f"on core {pinning.load_cores}; the proxy under test (nginx or llmhop, one process "
        f"each) alone on core {pinning.proxy_cores}. Direct runs leave core "
        f"{pinning.proxy_cores} idle.",
        "Fast upstream: nginx `return 200` with a fixed 300-byte chat completion. SSE upstream: "
        "`bench/sse_upstream.py` (asyncio protocol, one timer per stream), 200 chunks 5 ms apart "
        "by default, each stamped with its send time. llama.cpp: `llama_cpp.server` with the "
        "e2e suite's tiny GGUF, one thread.",
        "nginx as the reference proxy: one process (`master_process off`, i.e. one worker "
        "without its idle master), `proxy_buffering off`, `proxy_http_version "
        "1.1`, upstream `keepalive 64`, bodies buffered in memory (`client_body_buffer_size "
        "2m`). Both proxies write one access-log line per request to a file.",
        "llmhop started as `pkgs/llmhop/package.nix` installs it: by import, from bytecode "
        "compiled once (`bench/harness.py` `install_router`).",
        f"llmhop: `maxConcurrentRequests: 0`, body routing on `model`. Each wrk run lasts "
        f"{options.seconds:g} s after a {WARMUP_SECONDS:g} s warm-up per target; latency and "
        "req/s are wrk's, over the whole run. Proxy CPU is utime + stime of the proxy's process "
        "tree from `/proc/<pid>/stat`, read over the run's steady part (10 % cut at each end), "
        "divided by wrk's rate times that window.",
        "Upstream connections, over the same window: the fast upstream's `stub_status` accepts "
        "for direct and nginx, llmhop's own `llmhop_upstream_connections_opened_total`. The "
        "window leaves out the start, where a proxy replaces the upstream connections it "
        "dropped when the previous run's requests were cut off.",
        "SSE transit is the client's receive time minus the upstream's send stamp (both "
        "CLOCK_MONOTONIC); added delay is that minus the direct figure. A chunk counts as "
        "coalesced when it arrived in the same read as the chunk before it.",
        "Figures are from one run on a small shared VM: treat differences under ~10 % as noise.",
    ]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Benchmark llmhop against direct and nginx."
    )
    parser.add_argument(
        "--seconds", type=int, default=5, help="length of each wrk run, whole (default 5)"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone"
    )
    parser.add_argument("--work-dir", type=Path, help="keep configs and logs here")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another revision's router script, measured against this one "
        "(e.g. git show REV:pkgs/llmhop/llmhop.py > before.py)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="the Go reference's binary (go build ./cmd/llmhop in mirkolenz/llmhop), measured "
        "beside this router and nginx",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=BASELINE_ROUNDS,
        help=f"rounds of the baseline and reference phases (default {BASELINE_ROUNDS})",
    )
    arguments = parser.parse_args(argv)
    unknown = set(arguments.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    return arguments


def _raise_file_limit() -> None:
    """A thousand streams need two thousand sockets in the proxy; children inherit this."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def _work_dir(requested: Path | None) -> Iterator[Path]:
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="llmhop-bench-") as directory:
        yield Path(directory)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _raise_file_limit()
    pinning = Pinning.for_this_machine()
    pinning.pin_self_to_load()
    busy_before = harness.machine_busy_fraction(1.0)
    with _work_dir(arguments.work_dir) as work_dir:
        options = Options(
            arguments.seconds,
            frozenset(arguments.phases.split(",")),
            not arguments.no_write,
            work_dir,
            arguments.baseline.resolve() if arguments.baseline else None,
            reference=arguments.reference.resolve() if arguments.reference else None,
            rounds=arguments.rounds,
        )
        bench = Bench(options, pinning)
        try:
            bench.start()
            for phase in PHASES:
                if phase in options.phases:
                    # Between phases our own processes idle: what is busy now is others' work.
                    bench.others_load.append(harness.machine_busy_fraction(OTHERS_LOAD_SAMPLE))
                    getattr(bench, f"phase_{phase}")()
        finally:
            bench.stop()
    busy_after = harness.machine_busy_fraction(1.0)
    results = bench.results
    others = [busy_before, *bench.others_load, busy_after]
    if max(others) > SHARED_MACHINE_BUSY:
        results.notes.append(
            f"The machine was shared: other work kept up to {max(others):.0%} of the cores busy "
            "around the phases, so this run's figures are noisier than usual."
        )
    bench.evaluate_targets()
    print(text_table(results))
    if options.write:
        machine = machine_description(others)
        generated = markdown(results, machine, setup_description(options, pinning))
        write_document(DOCUMENT, generated)
        plot = svg_plot(results, [small_section(c) for c in SMALL_CONCURRENCIES])
        if plot is not None:
            PLOT.write_text(plot)
        RESULTS_DIR.mkdir(exist_ok=True)
        raw = {
            "machine": dict(machine),
            "figures": [asdict(f) for f in results.figures],
            "raw": bench.raw,
        }
        (RESULTS_DIR / "latest.json").write_text(json.dumps(raw, indent=2, default=str))
        print(f"\nbench: wrote {DOCUMENT.relative_to(harness.REPO_ROOT)}", file=sys.stderr)
    return 0
