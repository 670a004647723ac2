"""Processes and measurements for the real end-to-end suite: llama.cpp servers, the router.

Nothing here imports llama_cpp, openai or gguf at module level, so that a machine without the
backend can still collect the suite and be told why it skips (or, in CI, why it fails).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import Process, cpu_seconds, free_port, wait_until
from tests.support.router import RouterProcess

__all__ = ["RouterProcess", "cpu_seconds", "free_port", "wait_until"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# LLMHOP_E2E_ROUTER runs the suite against another copy of the router script.
ROUTER_SCRIPT = Path(
    os.environ.get("LLMHOP_E2E_ROUTER", REPO_ROOT / "pkgs" / "llmhop" / "llmhop.py")
)
SETUP_SCRIPT = REPO_ROOT / "tests" / "e2e" / "setup.sh"

# What the suite imports or runs: the compiled library, the server extra and the clients.
REQUIRED_MODULES = ("llama_cpp", "llama_cpp.server.app", "openai", "gguf", "numpy")

# Context of each llama.cpp server: room for a generation that outlasts the cancellation test
# by far (about 2 ms a token here, so ~16 s), with a KV cache of a few megabytes.
BACKEND_CONTEXT_TOKENS = 8192
BACKEND_START_TIMEOUT = 60.0
# CPU time is counted in 10 ms ticks; sampling a little slower than that resolves it.
CPU_POLL_INTERVAL = 0.02


# The router's own client token, and the key that only the router knows for backend "alpha".
ROUTER_TOKEN = "router-token-for-clients"
BACKEND_KEY = "backend-key-only-the-router-knows"

# Two servers under different names, each with its own random weights, so that a greedy
# answer tells which backend produced it. Only alpha demands a key.
ALPHA = "tiny-alpha"
BETA = "tiny-beta"
MODEL_SEEDS = {ALPHA: 1001, BETA: 2002}
# A router entry for alpha's server without the injected key: the backend must refuse it.
ALPHA_WITHOUT_KEY = "tiny-alpha-without-key"


def backend_is_required() -> bool:
    """In CI (or when asked) a missing backend is a failure, never a skip."""
    return os.environ.get("CI") == "true" or os.environ.get("LLMHOP_REQUIRE_E2E") == "1"


@functools.cache
def missing_backend_reason() -> str | None:
    problems: list[str] = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or an OSError from a broken libllama.so
            problems.append(f"{name} ({type(error).__name__}: {error})")
    if not problems:
        return None
    return (
        "the real llama.cpp backend is not installed: cannot import "
        + "; ".join(problems)
        + f"; install it with `bash {SETUP_SCRIPT.relative_to(REPO_ROOT)}`"
    )


def require_e2e_backend() -> None:
    """Call at the top of each e2e test module, before importing the backend's packages."""
    reason = missing_backend_reason()
    if reason is None:
        return
    if backend_is_required():
        pytest.fail(f"{reason} (CI=true or LLMHOP_REQUIRE_E2E=1: failing, not skipping)", False)
    pytest.skip(reason, allow_module_level=True)


@dataclass
class LlamaServer:
    """A real `python -m llama_cpp.server` serving one model under one name."""

    model_name: str
    port: int
    api_key: str | None
    managed: Process

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.managed.pid

    def is_ready(self) -> bool:
        try:
            self.managed.check_running()
        except RuntimeError as exited:
            pytest.fail(str(exited), False)
        request = urllib.request.Request(f"{self.base_url}/v1/models")
        if self.api_key is not None:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def start_llama_server(
    model_path: Path,
    model_name: str,
    log_dir: Path,
    api_key: str | None = None,
    port: int | None = None,
) -> LlamaServer:
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(BACKEND_CONTEXT_TOKENS),
        # One generation thread: the CPU-time measurement then sees one busy core, and the
        # other core stays for the router and the client.
        "--n_threads",
        "1",
        "--embedding",
        "true",
        # Only a disconnect may stop a stream (by default a newer request interrupts it).
        "--interrupt_requests",
        "false",
        "--verbose",
        "false",
    ]
    if api_key is not None:
        command += ["--api_key", api_key]
    managed = Process(
        command,
        name=f"llama.cpp server {model_name!r}",
        log_path=log_dir / f"{model_name}.log",
        cwd=REPO_ROOT,
    )
    server = LlamaServer(model_name, port, api_key, managed)
    try:
        wait_until(server.is_ready, BACKEND_START_TIMEOUT, f"{managed.name} ready")
    except TimeoutError as timeout:
        managed.stop()
        pytest.fail(f"{timeout}; its log ends with:\n{managed.log_tail()}", False)
    return server


@dataclass
class Backends:
    alpha: LlamaServer
    beta: LlamaServer

    def by_name(self, model_name: str) -> LlamaServer:
        return {ALPHA: self.alpha, BETA: self.beta}[model_name]


def start_router(config: dict[str, Any], work_dir: Path) -> RouterProcess:
    if not ROUTER_SCRIPT.exists():
        pytest.fail(f"the router {ROUTER_SCRIPT} does not exist", False)
    return RouterProcess(config, work_dir, script=ROUTER_SCRIPT)


@dataclass
class CpuSample:
    at: float  # time.monotonic()
    cpu: float  # CPU-seconds of the process


@dataclass
class SettleResult:
    settled_after: float | None  # seconds from the disconnect to the start of a quiet window
    cpu_after_disconnect: float  # CPU-seconds the process used from the disconnect to then
    cpu_in_quiet_window: float  # CPU-seconds it used during the quiet window (or the last one)
    samples: list[CpuSample]


def wait_for_cpu_to_settle(
    pid: int, since: CpuSample, quiet_window: float, quiet_cpu: float, limit: float
) -> SettleResult:
    """Sample the process's CPU time until it stays within `quiet_cpu` CPU-seconds over a whole
    `quiet_window`; report when that quiet stretch began. Gives up `limit` + `quiet_window`
    seconds after `since`, returning `settled_after=None`."""
    samples = [since]
    window_cpu = 0.0
    give_up_at = since.at + limit + quiet_window
    while samples[-1].at < give_up_at:
        time.sleep(CPU_POLL_INTERVAL)
        newest = CpuSample(time.monotonic(), cpu_seconds(pid))
        samples.append(newest)
        window_start = next(s for s in samples if s.at >= newest.at - quiet_window)
        covers_window = newest.at - window_start.at >= quiet_window - CPU_POLL_INTERVAL
        window_cpu = newest.cpu - window_start.cpu
        if covers_window and window_cpu <= quiet_cpu:
            settled_after = window_start.at - since.at
            return SettleResult(settled_after, window_start.cpu - since.cpu, window_cpu, samples)
    return SettleResult(None, samples[-1].cpu - since.cpu, window_cpu, samples)
