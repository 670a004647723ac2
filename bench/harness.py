"""Building blocks of the benchmark: pinned processes, nginx and llmhop configs, wrk, /proc.

Everything listens on 127.0.0.1 only, and every wait has a deadline. Process handling comes
from the tests' support package (`Process`, `cpu_seconds`, `free_port` of tests.support),
imported, not copied; `taskset` in front of a command pins it, and `taskset` execs, so the pid
is the program's own.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO as REPO_ROOT
from tests.support.processes import Process, cpu_seconds, free_port

BENCH_DIR = Path(__file__).resolve().parent
ROUTER_SCRIPT = Path(
    os.environ.get("LLMHOP_BENCH_ROUTER", REPO_ROOT / "pkgs" / "llmhop" / "llmhop.py")
)
WRK_SCRIPT = BENCH_DIR / "post.lua"
SSE_UPSTREAM_SCRIPT = BENCH_DIR / "sse_upstream.py"
FAULTY_UPSTREAM_SCRIPT = BENCH_DIR / "faulty_upstream.py"
LOOPBACK = "127.0.0.1"

START_TIMEOUT = 15.0
READY_POLL = 0.005  # fine enough to time a router's startup in milliseconds
WRK_GRACE = 20.0  # on top of the run's duration, before wrk is given up on

LISTENING_LINE = re.compile(r"listening on (\S+?):(\d+)\b")

# What the fast upstream answers: a whole non-streamed chat completion, fixed bytes.
CHAT_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fast",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
    },
    separators=(",", ":"),
)


# -- cores -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Which cores run what: the load (client and upstreams) on one, the proxy on another."""

    load_cores: str
    proxy_cores: str

    @classmethod
    def for_this_machine(cls) -> Pinning:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(str(cores[0]), str(cores[0]))
        return cls(str(cores[0]), str(cores[1]))

    def pin_self_to_load(self) -> None:
        """The orchestrator measures SSE streams itself, so it belongs with the load."""
        os.sched_setaffinity(0, {int(core) for core in self.load_cores.split(",")})

    @staticmethod
    def command(cores: str, command: list[str]) -> list[str]:
        return ["taskset", "-c", cores, *command]

    @staticmethod
    def move(pid: int, cores: str) -> None:
        """Pin a running process and all its threads."""
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, capture_output=True
        )


# -- /proc -----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants, should a proxy run helpers."""
    pids = [pid]
    for current in pids:
        for children_file in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pids += [int(child) for child in children_file.read_text().split()]
            except OSError:
                continue  # the thread ended meanwhile
    return pids


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        status = Path(f"/proc/{p}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match[1]) * 1024 if match else 0
    return total


def machine_busy_fraction(seconds: float) -> float:
    """How busy all cores were over `seconds` (0..1), from /proc/stat: others' load."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy_before, total_before = sample()
    time.sleep(seconds)
    busy_after, total_after = sample()
    return (busy_after - busy_before) / max(total_after - total_before, 1)


def _spawn(name: str, command: list[str], log_path: Path) -> Process:
    """A benchmark process, its output straight to `log_path` (nothing read in this one)."""
    return Process(command, name=name, log_path=log_path, cwd=REPO_ROOT)


# -- services --------------------------------------------------------------------------------


@dataclass
class Service:
    """A started server: its process and where it listens."""

    managed: Process
    host: str
    port: int
    startup_seconds: float

    @property
    def pid(self) -> int:
        return self.managed.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.managed.stop()


def _wait_for_port(managed: Process, port: int, started: float) -> float:
    deadline = started + START_TIMEOUT
    while True:
        if managed.process.poll() is not None:
            raise RuntimeError(f"{managed.name} exited; its log:\n{managed.log_tail()}")
        with socket.socket() as probe:
            if probe.connect_ex((LOOPBACK, port)) == 0:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            managed.stop()
            raise TimeoutError(f"{managed.name} not listening within {START_TIMEOUT} s")
        time.sleep(READY_POLL)


def _wait_for_listening_line(managed: Process, started: float) -> tuple[str, int, float]:
    """Wait for `listening on HOST:PORT` in the log; the time it took is the startup time."""
    deadline = started + START_TIMEOUT
    while True:
        match = LISTENING_LINE.search(managed.log_path.read_text(errors="replace"))
        if match:
            return match[1], int(match[2]), time.monotonic() - started
        if managed.process.poll() is not None or time.monotonic() > deadline:
            managed.stop()
            raise RuntimeError(
                f"{managed.name} printed no `listening on` line; its log:\n{managed.log_tail()}"
            )
        time.sleep(READY_POLL)


# What package.nix installs as bin/llmhop: the router started by import, from bytecode.
LAUNCHER = """\
import sys
sys.path.insert(0, {library!r})
from llmhop import main
sys.exit(main())
"""


def install_router(script: Path, work_dir: Path) -> Path:
    """`script` laid out as the package installs it (compiled once, never checked against its
    source again), so the figures are those of the router as deployed: a script would be
    compiled at every start, and that leaves megabytes behind. Returns the launcher."""
    library = work_dir / "llmhop-lib"
    library.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(script, library / "llmhop.py")
    py_compile.compile(
        str(library / "llmhop.py"),
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    launcher = work_dir / "llmhop"
    launcher.write_text(LAUNCHER.format(library=str(library)))
    return launcher


def start_llmhop(
    name: str, config: dict[str, object], work_dir: Path, cores: str, script: Path = ROUTER_SCRIPT
) -> Service:
    """The router from its config; its stderr (one access-log line a request) goes to a file,
    which costs a write per request, as nginx's access log does."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / f"{name}.json"
    config_path.write_text(json.dumps(config))
    launcher = install_router(script, work_dir)
    command = Pinning.command(
        cores, [sys.executable, "-I", str(launcher), "--config", str(config_path)]
    )
    started = time.monotonic()
    managed = _spawn(name, command, work_dir / f"{name}.log")
    host, port, startup = _wait_for_listening_line(managed, started)
    return Service(managed, host, port, startup)


def start_reference(binary: Path, models: dict[str, str], work_dir: Path, cores: str) -> Service:
    """The Go reference on a free loopback port, from its own config format."""
    port = free_port()
    config_path = work_dir / "reference.json"
    config = {"listen": f"{LOOPBACK}:{port}", "models": {m: {"url": u} for m, u in models.items()}}
    config_path.write_text(json.dumps(config))
    command = Pinning.command(cores, [str(binary), "--config", str(config_path)])
    started = time.monotonic()
    managed = _spawn("reference", command, work_dir / "reference.log")
    return Service(managed, LOOPBACK, port, _wait_for_port(managed, port, started))


def llmhop_config(models: dict[str, str]) -> dict[str, object]:
    """A benchmark config: loopback, ephemeral port, no concurrency cap, model → upstream URL."""
    return {
        "host": LOOPBACK,
        "port": 0,
        "maxConcurrentRequests": 0,
        "models": {name: {"url": url} for name, url in models.items()},
    }


def start_sse_upstream(work_dir: Path, cores: str) -> Service:
    return _start_script_upstream("sse-upstream", SSE_UPSTREAM_SCRIPT, work_dir, cores)


def start_faulty_upstream(work_dir: Path, cores: str) -> Service:
    return _start_script_upstream("faulty-upstream", FAULTY_UPSTREAM_SCRIPT, work_dir, cores)


def _start_script_upstream(name: str, script: Path, work_dir: Path, cores: str) -> Service:
    work_dir.mkdir(parents=True, exist_ok=True)
    command = Pinning.command(cores, [sys.executable, str(script), "--port", "0"])
    started = time.monotonic()
    managed = _spawn(name, command, work_dir / f"{name}.log")
    host, port, startup = _wait_for_listening_line(managed, started)
    return Service(managed, host, port, startup)


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


# One process (no master): it does exactly a single worker's work, and PR_SET_PDEATHSIG then
# covers it, so no worker is left behind should the harness itself be killed.
NGINX_MAIN = """\
daemon off;
master_process off;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    # One line per request to a file, as llmhop writes its access log: same work on both.
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_max_body_size 100m;
    # Bodies up to 2 MiB stay in memory, as llmhop keeps them.
    client_body_buffer_size 2m;
{servers}
}}
"""

FAST_UPSTREAM_SERVER = """\
    server {{
        listen {host}:{port} backlog=4096;
        location = /nginx_status {{ stub_status; }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
"""

PROXY_SERVER = """\
    upstream {name} {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
"""


def start_nginx(name: str, servers: str, ports: list[int], work_dir: Path, cores: str) -> Service:
    prefix = work_dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    config_path = prefix / "nginx.conf"
    config_path.write_text(NGINX_MAIN.format(prefix=prefix, servers=servers))
    command = Pinning.command(
        cores, [nginx_binary(), "-p", str(prefix), "-c", str(config_path), "-e", "stderr"]
    )
    started = time.monotonic()
    managed = _spawn(name, command, prefix / "nginx.log")
    startup = max(_wait_for_port(managed, port, started) for port in ports)
    return Service(managed, LOOPBACK, ports[0], startup)


def start_fast_upstream(work_dir: Path, cores: str) -> Service:
    """nginx answering every request with the fixed chat completion."""
    port = free_port()
    body = CHAT_COMPLETION.replace("'", "\\'")
    server = FAST_UPSTREAM_SERVER.format(host=LOOPBACK, port=port, body=body)
    return start_nginx("fast-upstream", server, [port], work_dir, cores)


def start_nginx_proxy(
    upstreams: dict[str, str], work_dir: Path, cores: str
) -> tuple[Service, dict[str, int]]:
    """nginx as the reference reverse proxy: one listening port per upstream ("host:port")."""
    ports = {name: free_port() for name in upstreams}
    servers = "".join(
        PROXY_SERVER.format(name=name, upstream=upstream, host=LOOPBACK, port=ports[name])
        for name, upstream in upstreams.items()
    )
    return start_nginx("nginx-proxy", servers, list(ports.values()), work_dir, cores), ports


def nginx_accepted_connections(service: Service) -> int:
    """Connections the nginx has accepted since it started (its stub_status `accepts`)."""
    with urllib.request.urlopen(f"{service.url}/nginx_status", timeout=5) as response:
        text = response.read().decode()
    return int(text.split("\n")[2].split()[0])


def llmhop_upstream_connections(service: Service) -> int:
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^llmhop_upstream_connections_opened_total (\d+)$", text, re.MULTILINE)
    if match is None:
        raise ValueError("no llmhop_upstream_connections_opened_total in /metrics")
    return int(match[1])


# -- wrk -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    socket_errors: int
    status_errors: int  # answers other than 2xx/3xx
    timeouts: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.socket_errors + self.status_errors + self.timeouts


def parse_wrk_output(output: str) -> WrkResult:
    """The JSON line that post.lua's done() prints."""
    for line in output.splitlines():
        if line.startswith("BENCH_RESULT "):
            fields = json.loads(line.removeprefix("BENCH_RESULT "))
            seconds = fields.pop("duration_us") / 1e6
            return WrkResult(seconds=seconds, **fields)
    raise ValueError(f"no BENCH_RESULT line in wrk's output:\n{output}")


def start_wrk(
    url: str,
    connections: int,
    seconds: int,
    cores: str,
    model: str = "fast",
    body_bytes: int = 0,
) -> subprocess.Popen[str]:
    """One wrk thread (on the load core) POSTing chat requests over keep-alive connections.

    `seconds` is whole: wrk reads fractions as zero, and then only prints its usage."""
    command = Pinning.command(
        cores,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
    )
    environment = {**os.environ, "BENCH_MODEL": model, "BENCH_BODY_BYTES": str(body_bytes)}
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_wrk(process: subprocess.Popen[str], seconds: int) -> WrkResult:
    try:
        stdout, stderr = process.communicate(timeout=seconds + WRK_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed with status {process.returncode}: {stdout}{stderr}")
    return parse_wrk_output(stdout)


def run_wrk(
    url: str, connections: int, seconds: float, cores: str, model: str = "fast"
) -> WrkResult:
    return finish_wrk(start_wrk(url, connections, seconds, cores, model), seconds)
