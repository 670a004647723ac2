"""Processes and measurements for the real end-to-end suite: llama.cpp servers, the router.

Nothing here imports llama_cpp, openai or gguf at module level, so that a machine without the
backend can still collect the suite and be told why it skips (or, in CI, why it fails).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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
ROUTER_START_TIMEOUT = 10.0
PROCESS_STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
# CPU time is counted in 10 ms ticks; sampling a little slower than that resolves it.
CPU_POLL_INTERVAL = 0.02

LISTENING_LINE = re.compile(r"listening on (\S+) with \d+ model\(s\)")


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


def free_port() -> int:
    """A port that was free a moment ago (the servers under test take a port number, not a
    socket, so a tiny race with other programs is unavoidable; it has no effect in practice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: should pytest itself be killed, the kernel kills the
    # servers, so that no llama.cpp server is left eating a core after a crashed run. SIGKILL,
    # because uvicorn answers SIGTERM by waiting for the running generation to finish.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a whole process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces, so split after its closing parenthesis;
    # utime and stime are fields 14 and 15, i.e. 12th and 13th after it.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(POLL_INTERVAL)


@dataclass
class ManagedProcess:
    """A child process with its output in a log file, stopped for sure by `stop`."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, line_count: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-line_count:])

    def ensure_running(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(
                f"{self.name} exited with status {self.process.returncode}; "
                f"its log ({self.log_path}) ends with:\n{self.log_tail()}",
                False,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PROCESS_STOP_TIMEOUT)


def spawn(
    name: str, command: list[str], log_path: Path, stderr_to_pipe: bool = False
) -> ManagedProcess:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.PIPE if stderr_to_pipe else subprocess.STDOUT,
            cwd=REPO_ROOT,
            preexec_fn=_die_with_parent,
        )
    return ManagedProcess(name, process, log_path)


@dataclass
class LlamaServer:
    """A real `python -m llama_cpp.server` serving one model under one name."""

    model_name: str
    port: int
    api_key: str | None
    managed: ManagedProcess

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.managed.pid

    def is_ready(self) -> bool:
        self.managed.ensure_running()
        request = urllib.request.Request(f"{self.base_url}/v1/models")
        if self.api_key is not None:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def start_llama_server(
    model_path: Path, model_name: str, log_dir: Path, api_key: str | None = None
) -> LlamaServer:
    port = free_port()
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
    managed = spawn(f"llama.cpp server {model_name!r}", command, log_dir / f"{model_name}.log")
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


@dataclass
class RouterProcess:
    """`python3 pkgs/llmhop/llmhop.py --config …` with its stderr read by a thread."""

    managed: ManagedProcess
    address: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        return self.managed.pid


def start_router(config: dict[str, Any], work_dir: Path) -> RouterProcess:
    if not ROUTER_SCRIPT.exists():
        pytest.fail(f"the router {ROUTER_SCRIPT} does not exist", False)
    config_path = work_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = work_dir / "router.log"
    managed = spawn(
        "llmhop router",
        [sys.executable, str(ROUTER_SCRIPT), "--config", str(config_path)],
        log_path,
        stderr_to_pipe=True,
    )
    lines: list[str] = []
    addresses: list[str] = []
    listening = threading.Event()

    def drain_stderr() -> None:
        # Always drained, so that access-log lines can never fill the pipe and stall the router.
        assert managed.process.stderr is not None
        with log_path.open("a", encoding="utf-8", errors="replace") as log_file:
            for raw_line in managed.process.stderr:
                line = raw_line.decode(errors="replace").rstrip("\n")
                lines.append(line)
                log_file.write(line + "\n")
                log_file.flush()
                match = LISTENING_LINE.search(line)
                if match and not listening.is_set():
                    addresses.append(match.group(1))
                    listening.set()

    threading.Thread(target=drain_stderr, name="router-stderr", daemon=True).start()
    deadline = time.monotonic() + ROUTER_START_TIMEOUT
    while not listening.wait(POLL_INTERVAL):
        if managed.process.poll() is not None or time.monotonic() > deadline:
            managed.stop()
            pytest.fail(
                "the router did not print `listening on ADDRESS with N model(s)` within "
                f"{ROUTER_START_TIMEOUT} s (exit status {managed.process.returncode}); "
                "its stderr:\n" + "\n".join(lines[-40:]),
                False,
            )
    return RouterProcess(managed, addresses[0], lines)


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
