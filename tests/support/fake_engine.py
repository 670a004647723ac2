"""The one fake inference server of the tests, the VM checks (checks/vm.nix) and their images:
stand-ins for llama.cpp's `llama-server`, `vllm serve`, SGLang, the SGL Model Gateway and a
hosted provider, speaking enough of the OpenAI API to be routed to. One file, standard library
only: the VM checks install it by path.

    fake_engine.py MODE [ARGS...]      MODE: llama-server, vllm, sglang, gateway, upstream

Each mode parses the flags the NixOS module renders as strictly as the real server does
(unknown flags and missing managed flags exit 2), so a unit with a wrong command line fails.
Credential files (`--api-key-file`, `HF_TOKEN_PATH`) must lie in `$CREDENTIALS_DIRECTORY` (a
native unit) or in /run/llmhop/credentials (a container), and are read at start.

Engines answer `GET /health` (or `--fake-health-path`) with 503 ("loading") for the first
`--fake-loading-probes` probes (default 1), or until `--fake-ready-file` exists, then 200 (or
`--fake-health-status`); `--fake-die-while-loading` exits 3 at the first probe,
`--fake-exit-after-ready CODE` exits CODE after its first healthy answer, and
`--fake-probe-log FILE` appends `<path> <status>` per probe. `GET /metrics` answers a few
Prometheus samples in the engine's own names (its streams in progress) where the real server
serves them: llama-server with `--metrics` (behind its API key), vLLM always, SGLang with
`--enable-metrics`. A first SIGINT or SIGTERM stops an
engine cleanly, a second one exits 1 at once, as the real servers do; with
`--fake-plain-signals` it dies of the signal instead. Every other route needs the API key when
one is configured:

    GET  /v1/models
    POST /v1/chat/completions   also streamed; `"fake_hold": true` holds the stream after its
                                first token until POST /fake/release
    POST /v1/completions
    GET  /fake/info             parsed flags, identity, credentials, environment, devices,
                                health probes and when the first one answered 200, scrapes
    POST /fake/release          ends every held stream

The gateway forwards each request to the worker of `--worker-urls` that serves the body's
model; the upstream (a hosted provider) echoes the Authorization header it received.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CONTAINER_CREDENTIALS = Path("/run/llmhop/credentials")
# A held stream ends by itself after this long, without its last event, so a test that never
# releases it fails instead of hanging.
HOLD_TIMEOUT = 120.0
STREAM_WORDS = ("fake", "tokens", "from", "a", "fake", "engine")
# What /fake/info reports of the environment: what the module sets, and what the VM check's
# CDI spec injects.
REPORTED_ENVIRONMENT = (
    "CREDENTIALS_DIRECTORY",
    "HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "LLAMA_CACHE",
    "VLLM_CACHE_ROOT",
    "LLMHOP_FAKE_CDI",
)
# The device node the VM check's CDI spec maps nvidia.com/gpu=all to.
FAKE_GPU = Path("/dev/nvidia-fake")
# Each engine's gauge of the requests it is generating for, as the real one names it.
RUNNING_GAUGE = {
    "llama-server": "llamacpp:requests_processing",
    "vllm": "vllm:num_requests_running",
    "sglang": "sglang:num_running_reqs",
}

JSON = dict[str, Any]
Address = str | tuple[str, int]


class Failure(Exception):
    """A start-up error, reported like an argument error of the real server (exit 2)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command lines ---------------------------------------------------------------------------


def new_parser(prog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, allow_abbrev=False)


def add_loading_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fake-loading-probes", type=int, default=1, metavar="N")
    parser.add_argument("--fake-ready-file", type=Path)
    parser.add_argument("--fake-die-while-loading", action="store_true")
    parser.add_argument("--fake-health-path", default="/health")
    parser.add_argument("--fake-health-status", type=int, default=200)
    parser.add_argument("--fake-exit-after-ready", type=int, metavar="CODE")
    parser.add_argument("--fake-probe-log", type=Path)
    parser.add_argument("--fake-plain-signals", action="store_true")


def llama_server_parser() -> argparse.ArgumentParser:
    parser = new_parser("llama-server")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--api-key-file", type=Path)
    parser.add_argument("-m", "--model", type=Path)
    parser.add_argument("--hf-repo")
    parser.add_argument("--ctx-size", type=int)
    parser.add_argument("--jinja", action="store_true")
    parser.add_argument("--metrics", action="store_true")
    add_loading_flags(parser)
    return parser


def vllm_parser() -> argparse.ArgumentParser:
    parser = new_parser("vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--uds")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--api-key")
    add_loading_flags(parser)
    return parser


def sglang_parser() -> argparse.ArgumentParser:
    parser = new_parser("sglang")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--api-key")
    parser.add_argument("--enable-metrics", action="store_true")
    add_loading_flags(parser)
    return parser


def gateway_parser() -> argparse.ArgumentParser:
    parser = new_parser("sgl-model-gateway")
    parser.add_argument("--enable-igw", action="store_true", required=True)
    parser.add_argument("--worker-urls", nargs="+", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prometheus-host")
    parser.add_argument("--prometheus-port", type=int)
    parser.add_argument(
        "--policy", choices=["random", "round_robin", "cache_aware", "power_of_two"]
    )
    return parser


def upstream_parser() -> argparse.ArgumentParser:
    parser = new_parser("fake-upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser


# SGLang's launchers: `python -m sglang.launch_server` (what the module runs, natively and in
# containers) and `sglang serve` (the newer CLI).
SGLANG_LAUNCHERS = (["-m", "sglang.launch_server"], ["serve"])


def strip_sglang_launcher(argv: list[str]) -> list[str]:
    for launcher in SGLANG_LAUNCHERS:
        if argv[: len(launcher)] == launcher:
            return argv[len(launcher) :]
    raise Failure("expected `-m sglang.launch_server` or `serve` before the flags")


def read_credential(path: Path, what: str) -> str:
    """A credential file's content; it must be one of the unit's (or container's) credentials."""
    directory = Path(os.environ.get("CREDENTIALS_DIRECTORY") or CONTAINER_CREDENTIALS)
    if path.parent != directory:
        raise Failure(f"{what} {path} is not a credential in {directory}")
    try:
        return path.read_text().removesuffix("\n")
    except OSError as exc:
        raise Failure(f"cannot read {what} {path}: {exc.strerror}") from None


def jsonable(options: argparse.Namespace) -> JSON:
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(options).items()
    }


# --- the servers' behaviour ------------------------------------------------------------------


class App:
    """What a server answers; `respond` returns False when the route is unknown."""

    mode = ""
    name = ""
    api_key: str | None = None
    health_path = "/health"
    plain_signals = False

    def public(self, route: str) -> bool:
        """Whether a route other than the health path needs no API key."""
        return False

    def health(self, request: Request) -> None:
        request.send_json(200, {"status": "ok"})

    def info(self) -> JSON:
        return {"mode": self.mode, "name": self.name}

    def respond(self, request: Request) -> bool:
        raise NotImplementedError


class Engine(App):
    """llama-server, vLLM or SGLang serving one model."""

    def __init__(self, mode: str, name: str, options: argparse.Namespace, argv: list[str]) -> None:
        self.mode = mode
        self.name = name
        self.options = options
        self.argv = argv
        self.loading_probes: int = options.fake_loading_probes
        self.ready_file: Path | None = options.fake_ready_file
        self.die_while_loading: bool = options.fake_die_while_loading
        self.health_path: str = options.fake_health_path
        self.healthy_status: int = options.fake_health_status
        self.exit_after_ready: int | None = options.fake_exit_after_ready
        self.probe_log: Path | None = options.fake_probe_log
        self.plain_signals: bool = options.fake_plain_signals
        self.metrics = False  # set by the mode from its flags
        self.scrapes = 0
        self.credentials: dict[str, JSON] = {}
        self.lock = threading.Lock()
        self.probes = 0
        # CLOCK_MONOTONIC (as systemd's *TimestampMonotonic) of the first healthy answer.
        self.ready_at_us: int | None = None
        self.holds: list[threading.Event] = []
        # Like vLLM, a model name other than the served one is unknown; llama-server serves any.
        self.strict_model = mode != "llama-server"
        token_path = os.environ.get("HF_TOKEN_PATH")
        if token_path:
            self.load_credential("HF_TOKEN_PATH", Path(token_path))

    def load_credential(self, what: str, path: Path) -> str:
        value = read_credential(path, what)
        self.credentials[what] = {"path": str(path), "length": len(value)}
        return value

    def health(self, request: Request) -> None:
        with self.lock:
            self.probes += 1
            probe = self.probes
        log(f"health probe {probe}")
        loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
        if self.die_while_loading:
            self.answer_probe(request, 503, loading)
            log("failed to load the model")
            os._exit(3)
        loaded = self.ready_file.exists() if self.ready_file else probe > self.loading_probes
        if not loaded:
            self.answer_probe(request, 503, loading)
            return
        with self.lock:
            if self.ready_at_us is None:
                self.ready_at_us = time.monotonic_ns() // 1000
        self.answer_probe(request, self.healthy_status, {"status": "ok"})
        if self.healthy_status == 200 and self.exit_after_ready is not None:
            request.wfile.flush()
            log(f"exiting with {self.exit_after_ready} after the first healthy answer")
            os._exit(self.exit_after_ready)

    def public(self, route: str) -> bool:
        # vLLM guards only /v1 and SGLang leaves /metrics open; llama-server guards it.
        return route == "/metrics" and self.mode != "llama-server"

    def answer_probe(self, request: Request, status: int, body: JSON) -> None:
        if self.probe_log is not None:
            with self.probe_log.open("a") as probes:
                probes.write(f"{request.route} {status}\n")
        if status in (301, 302):
            request.send_response(status)
            request.send_header("Location", "/elsewhere")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        request.send_json(status, body)

    def info(self) -> JSON:
        with self.lock:
            holding = len(self.holds)
        return {
            "mode": self.mode,
            "name": self.name,
            "argv": self.argv,
            "options": jsonable(self.options),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "groups": sorted(os.getgroups()),
            "credentials": self.credentials,
            "environment": {k: os.environ[k] for k in REPORTED_ENVIRONMENT if k in os.environ},
            "gpu": FAKE_GPU.exists(),
            "probes": self.probes,
            "ready_at_us": self.ready_at_us,
            "holding": holding,
            "scrapes": self.scrapes,
        }

    def respond(self, request: Request) -> bool:
        method, path = request.command, request.route
        if (method, path) == ("GET", "/v1/models"):
            request.send_json(200, models_list([self.name], self.mode))
        elif (method, path) == ("GET", "/fake/info"):
            request.send_json(200, self.info())
        elif (method, path) == ("POST", "/fake/release"):
            request.send_json(200, {"released": self.release()})
        elif (method, path) == ("GET", "/metrics") and self.metrics:
            self.send_metrics(request)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.complete(request, chat=path == "/v1/chat/completions")
        else:
            return False
        return True

    def send_metrics(self, request: Request) -> None:
        with self.lock:
            self.scrapes += 1
            running = len(self.holds)
        gauge = RUNNING_GAUGE[self.mode]
        # vLLM and SGLang label their samples with the served model; llama-server does not.
        labels = "" if self.mode == "llama-server" else f'{{model_name="{self.name}"}}'
        text = (
            f"# HELP {gauge} Number of requests processing.\n"
            f"# TYPE {gauge} gauge\n"
            f"{gauge}{labels} {running}\n"
        )
        request.send_body(200, "text/plain; version=0.0.4", text.encode())

    def release(self) -> int:
        with self.lock:
            holds, self.holds = self.holds, []
        for hold in holds:
            hold.set()
        return len(holds)

    def complete(self, request: Request, *, chat: bool) -> None:
        body = request.json_body()
        if body is None:
            return
        model = body.get("model")
        if self.strict_model and model != self.name:
            message = f"The model `{model}` does not exist."
            request.send_json(404, {"error": {"message": message, "type": "NotFoundError"}})
            return
        prompt = last_prompt(body) if chat else str(body.get("prompt", ""))
        text = f"{self.mode} {self.name}: {prompt}"
        if not body.get("stream"):
            reply = completion(self.name, text, chat=chat)
            # How the request reached the engine: a router behind a socket should use it.
            reply["via"] = "tcp" if isinstance(request.client_address, tuple) else "socket"
            request.send_json(200, reply)
            return
        hold = threading.Event() if body.get("fake_hold") else None
        request.start_stream()
        for index, word in enumerate(STREAM_WORDS):
            request.send_event(chunk(self.name, f"{word} ", chat=chat, first=index == 0))
            if index == 0 and hold is not None:
                with self.lock:
                    self.holds.append(hold)
                log("holding a stream")
                if not hold.wait(HOLD_TIMEOUT):
                    log("a held stream was never released: cut off")
                    request.close_connection = True
                    return
        request.send_event(chunk(self.name, "", chat=chat, finish="stop"))
        request.send_event("[DONE]")
        request.end_stream()


class Gateway(App):
    """The SGL Model Gateway: forwards to the worker serving the requested model."""

    mode = "gateway"
    name = "gateway"

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.workers: list[str] = options.worker_urls
        for url in self.workers:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise Failure(f"--worker-urls: {url} is not http://host:port")

    def info(self) -> JSON:
        return {"mode": self.mode, "name": self.name, "options": jsonable(self.options)}

    def health(self, request: Request) -> None:
        healthy = [url for url in self.workers if get(url, "/health")[0] == 200]
        request.send_json(200 if healthy else 503, {"healthy_workers": healthy})

    def worker_models(self, request: Request) -> dict[str, str]:
        """Model name → worker URL, asked of every worker now (workers come and go)."""
        served: dict[str, str] = {}
        for url in self.workers:
            status, body = get(url, "/v1/models", request.headers.get("Authorization"))
            if status == 200:
                for model in json.loads(body)["data"]:
                    served.setdefault(model["id"], url)
        return served

    def respond(self, request: Request) -> bool:
        method, path = request.command, request.route
        if (method, path) == ("GET", "/v1/models"):
            request.send_json(200, models_list(sorted(self.worker_models(request)), self.mode))
        elif (method, path) == ("GET", "/fake/info"):
            request.send_json(200, self.info())
        elif method == "POST" and path.startswith("/v1/"):
            body = request.json_body()
            if body is None:
                return True
            worker = self.worker_models(request).get(str(body.get("model")))
            if worker is None:
                message = f"fake gateway: no worker serves model {body.get('model')!r}"
                request.send_json(404, {"error": {"message": message, "code": "model_not_found"}})
            else:
                forward(request, worker)
        else:
            return False
        return True


class Metrics(App):
    """The gateway's Prometheus listener."""

    mode = "gateway-metrics"
    name = "gateway"

    def __init__(self) -> None:
        self.scrapes = 0

    def respond(self, request: Request) -> bool:
        if (request.command, request.route) != ("GET", "/metrics"):
            return False
        self.scrapes += 1
        text = f"fake_gateway_scrapes_total {self.scrapes}\n".encode()
        request.send_body(200, "text/plain; version=0.0.4", text)
        return True


class Upstream(App):
    """A hosted provider: answers every model, saying which Authorization it received."""

    mode = "upstream"
    name = "upstream"

    def respond(self, request: Request) -> bool:
        if (request.command, request.route) != ("POST", "/v1/chat/completions"):
            return False
        body = request.json_body()
        if body is not None:
            seen = request.headers.get("Authorization", "")
            text = f"authorization={seen}"
            request.send_json(200, completion(str(body.get("model")), text, chat=True))
        return True


# --- OpenAI-shaped objects -------------------------------------------------------------------


def models_list(names: list[str], owner: str) -> JSON:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": owner} for n in names],
    }


def last_prompt(body: JSON) -> str:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    return content if isinstance(content, str) else ""


def completion(model: str, text: str, *, chat: bool) -> JSON:
    choice: JSON = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": "fake-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(
    model: str, text: str, *, chat: bool, first: bool = False, finish: str | None = None
) -> str:
    choice: JSON = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    return json.dumps(
        {
            "id": "fake-1",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
    )


# --- HTTP --------------------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def get(url: str, path: str, authorization: str | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    headers = {"Authorization": authorization} if authorization else {}
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def forward(request: Request, url: str) -> None:
    """Send the request on to a worker and stream its answer back as it arrives."""
    parts = urlsplit(url)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    connection = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=HOLD_TIMEOUT + 30
    )
    try:
        connection.request(request.command, request.path, body=request.body, headers=headers)
        response = connection.getresponse()
        request.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                request.send_header(name, value)
        request.send_header("X-Fake-Gateway-Worker", url)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        while data := response.read1(65536):
            request.write_chunk(data)
        request.write_chunk(b"")
    except OSError as exc:
        log(f"forwarding to {url} failed: {exc}")
        request.close_connection = True
    finally:
        connection.close()


class Request(BaseHTTPRequestHandler):
    """One HTTP/1.1 exchange (keep-alive, as the router pools connections)."""

    protocol_version = "HTTP/1.1"
    app: App
    body = b""

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    def address_string(self) -> str:  # a unix peer has no address
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.app.mode} {self.app.name}: {format % args}")

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_body(self) -> JSON | None:
        """The body as a JSON object, or None after answering 400."""
        try:
            body = json.loads(self.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.send_json(400, {"error": {"message": "the body is not a JSON object"}})
            return None
        return body

    def send_body(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status: int, value: JSON) -> None:
        self.send_body(status, "application/json", json.dumps(value).encode())

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, data: str) -> None:
        self.write_chunk(f"data: {data}\n\n".encode())

    def end_stream(self) -> None:
        self.write_chunk(b"")

    def dispatch(self) -> None:
        self.body = self.read_body()
        app = self.app
        if self.command in ("GET", "HEAD") and self.route == app.health_path:
            app.health(self)
            return
        authorized = self.headers.get("Authorization") == f"Bearer {app.api_key}"
        if app.api_key is not None and not authorized and not app.public(self.route):
            self.send_json(401, {"error": {"message": "Invalid API Key", "code": 401}})
            return
        if not app.respond(self):
            self.send_json(404, {"error": {"message": f"no route {self.command} {self.route}"}})

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = dispatch


class TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    # Not http.server's HTTPServer: its bind looks the host's name up, which may hang without DNS.
    daemon_threads = True
    allow_reuse_address = True


class TCP6Server(TCPServer):
    address_family = socket.AF_INET6


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(app: App, address: Address) -> socketserver.BaseServer:
    """Bind a server for `app`: a unix socket path or a (host, port) pair."""
    handler = type("Handler", (Request,), {"app": app})
    if isinstance(address, str):
        # A stale socket file makes this fail with EADDRINUSE, as the real servers do.
        server: socketserver.BaseServer = UnixServer(address, handler)
    elif ":" in address[0]:
        server = TCP6Server(address, handler)
    else:
        server = TCPServer(address, handler)
    log(f"{app.mode} {app.name}: listening on {describe(address)}")
    return server


def describe(address: Address) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"


# --- modes ----------------------------------------------------------------------------------


def llama_server(argv: list[str]) -> tuple[App, list[Address]]:
    options = llama_server_parser().parse_args(argv)
    engine = Engine("llama-server", options.alias, options, argv)
    engine.metrics = options.metrics
    if options.model is not None:
        # As llama-server, which reads the file's GGUF header before it listens.
        try:
            with options.model.open("rb") as model:
                magic = model.read(4)
        except OSError as error:
            raise Failure(f"failed to load model {options.model}: {error}") from error
        if magic != b"GGUF":
            raise Failure(f"failed to load model {options.model}: not a GGUF file")
    if options.api_key_file is not None:
        engine.api_key = engine.load_credential("api-key-file", options.api_key_file)
    # llama-server listens on a unix socket when --host ends in .sock.
    address: Address = (
        options.host if options.host.endswith(".sock") else (options.host, options.port)
    )
    return engine, [address]


def vllm(argv: list[str]) -> tuple[App, list[Address]]:
    options = vllm_parser().parse_args(argv)
    engine = Engine("vllm", options.served_model_name, options, argv)
    engine.metrics = True
    engine.api_key = options.api_key or os.environ.get("VLLM_API_KEY")
    if options.uds is not None:
        if options.host is not None or options.port is not None:
            raise Failure("--uds excludes --host and --port")
        return engine, [options.uds]
    if options.host is None or options.port is None:
        raise Failure("--host and --port (or --uds) are required")
    return engine, [(options.host, options.port)]


def sglang(argv: list[str]) -> tuple[App, list[Address]]:
    options = sglang_parser().parse_args(strip_sglang_launcher(argv))
    engine = Engine("sglang", options.served_model_name, options, argv)
    engine.metrics = options.enable_metrics
    engine.api_key = options.api_key
    return engine, [(options.host, options.port)]


def gateway(argv: list[str]) -> tuple[App, list[Address]]:
    options = gateway_parser().parse_args(argv)
    return Gateway(options), [(options.host, options.port)]


def upstream(argv: list[str]) -> tuple[App, list[Address]]:
    options = upstream_parser().parse_args(argv)
    return Upstream(), [(options.host, options.port)]


MODES: dict[str, Callable[[list[str]], tuple[App, list[Address]]]] = {
    "llama-server": llama_server,
    "vllm": vllm,
    "sglang": sglang,
    "gateway": gateway,
    "upstream": upstream,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODES:
        log(f"usage: fake_engine.py {{{','.join(MODES)}}} [ARGS...]")
        return 2
    mode, args = argv[0], argv[1:]
    try:
        app, addresses = MODES[mode](args)
        listeners: list[tuple[App, Address]] = [(app, a) for a in addresses]
        if isinstance(app, Gateway) and app.options.prometheus_port is not None:
            host = app.options.prometheus_host or app.options.host
            listeners.append((Metrics(), (host, app.options.prometheus_port)))
    except Failure as exc:
        log(f"fake {mode}: {exc}")
        return 2
    # As the real servers: the first SIGINT or SIGTERM stops cleanly (status 0); a second one
    # while stopping exits 1 at once. Handled from before the first bind on, so a signal right
    # after "listening" is a clean stop too.
    servers: list[socketserver.BaseServer] = []
    stopping = threading.Event()

    def stop(*_: object) -> None:
        if stopping.is_set():
            log("Received second interrupt, terminating immediately.")
            os._exit(1)
        stopping.set()
        for server in servers:
            threading.Thread(target=server.shutdown, daemon=True).start()

    if not app.plain_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)

    for listener_app, address in listeners:
        try:
            servers.append(serve(listener_app, address))
        except OSError as exc:
            log(f"fake {mode}: cannot listen on {describe(address)}: {exc.strerror}")
            return 1
    # A signal while binding shut down only the servers bound before it.
    if stopping.is_set():
        return 0
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
