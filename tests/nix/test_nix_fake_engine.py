"""The fake servers of the VM checks (tests/support/fake_engine.py) and their openai client
(checks/vm/client.py), run here for real: loading then ready, flag and credential checks,
streaming, auth, metrics, the gateway's forwarding, and the real router in front of them."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nix_harness import REPO

from tests.support import FAKE_ENGINE as FAKE
from tests.support.processes import Process, free_port
from tests.support.router import RouterProcess
from tests.support.wire import request

CLIENT = REPO / "checks" / "vm" / "client.py"
WAIT = 15.0


@pytest.fixture
def spawn() -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(argv: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(argv, env={**os.environ, **(env or {})})
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture
def fake(spawn: Callable[..., Process]) -> Callable[..., Process]:
    """Start a fake server and wait until it listens."""

    def start(mode: str, *args: str, env: dict[str, str] | None = None) -> Process:
        process = spawn([sys.executable, "-I", str(FAKE), mode, *args], env)
        process.wait_for_line(r"listening on", WAIT)
        return process

    return start


def status(address: str | int, path: str, **kwargs: Any) -> int:
    return request(address, path, **kwargs)[0]


def as_json(address: str | int, path: str, body: Any = None, **kwargs: Any) -> Any:
    code, _, data = request(address, path, body, **kwargs)
    assert code == 200, data
    return json.loads(data)


LOOPBACK = "127.0.0.1"


def vllm_serve(port: int) -> list[str]:
    """`vllm serve` of model `m` on a loopback port, as the module starts it."""
    return ["serve", "org/m", "--served-model-name", "m", "--host", LOOPBACK, "--port", f"{port}"]


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(data: bytes) -> list[str]:
    return [line.removeprefix(b"data: ").decode() for line in data.split(b"\n") if line]


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "api-keys").write_text("worker-secret\n")
    (directory / "hf-token").write_text("hf-secret")
    return directory


# --- the engines on their own ----------------------------------------------------------------


def test_loading_then_ready(fake: Callable[..., Process]) -> None:
    port = free_port()
    args = ("serve", "org/m", "--served-model-name", "m", "--host", "127.0.0.1")
    engine = fake("vllm", *args, "--port", str(port), "--fake-loading-probes", "2")
    assert [status(port, "/health") for _ in range(3)] == [503, 503, 200]
    engine.wait_for_line(r"health probe 3", WAIT)
    assert as_json(port, "/v1/models")["data"][0]["id"] == "m"


def test_ready_file_and_stale_socket(fake: Callable[..., Process], tmp_path: Path) -> None:
    sock = str(tmp_path / "http.sock")
    ready = tmp_path / "ready"
    args = ("--host", sock, "--alias", "a", "--fake-ready-file", str(ready))
    engine = fake("llama-server", *args)
    assert [status(sock, "/health") for _ in range(3)] == [503] * 3
    ready.touch()
    assert status(sock, "/health") == 200
    # Killed, it leaves its socket behind; binding over it fails as with the real servers.
    engine.process.kill()
    engine.exit_status()
    assert Path(sock).is_socket()
    again = Process([sys.executable, "-I", str(FAKE), "llama-server", *args])
    assert again.exit_status() == 1
    assert "Address already in use" in again.output


def test_dying_while_loading(fake: Callable[..., Process]) -> None:
    port = free_port()
    args = ("serve", "--model-path", "org/s", "--served-model-name", "s", "--host", "127.0.0.1")
    engine = fake("sglang", *args, "--port", str(port), "--fake-die-while-loading")
    assert status(port, "/health") == 503
    assert engine.exit_status() == 3
    assert "failed to load the model" in engine.output


@pytest.mark.parametrize(
    ("mode", "args", "message"),
    [
        ("llama-server", ["--host", "/x.sock", "--alias", "a", "--bogus", "1"], "unrecognized"),
        ("llama-server", ["--host", "/x.sock"], "--alias"),
        ("llama-server", ["--host", "/x.sock", "--alias=a", "--api-key-file=/etc/k"], "not a cred"),
        ("vllm", ["org/m", "--served-model-name", "m", "--port", "1"], "invalid choice"),
        ("vllm", ["serve", "org/m", "--served-model-name=m", "--uds=/x", "--port=1"], "excludes"),
        ("vllm", ["serve", "org/m", "--served-model-name", "m"], "--host and --port"),
        ("sglang", ["--model-path", "m", "--served-model-name", "m"], "sglang.launch_server"),
        ("sglang", ["serve", "--model-path", "m", "--served-model-name", "m"], "--host"),
        ("gateway", ["--enable-igw", "--host", "127.0.0.1", "--port", "1"], "--worker-urls"),
        ("gateway", ["--worker-urls", "http://a:1", "--host", "h", "--port", "1"], "--enable-igw"),
        (
            "gateway",
            ["--enable-igw", "--worker-urls", "unix:///a", "--host", "h", "--port", "1"],
            "is not http",
        ),
        ("nonsense", [], "usage"),
    ],
)
def test_command_lines_are_checked(mode: str, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-I", str(FAKE), mode, *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_credentials_are_read_from_the_credentials_directory(
    fake: Callable[..., Process], credentials: Path
) -> None:
    sock = str(credentials.parent / "llama.sock")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    fake(
        "llama-server",
        f"--host={sock}",
        "--alias=a",
        f"--api-key-file={credentials}/api-keys",
        env=env,
    )
    assert status(sock, "/health") == 503  # loading
    assert status(sock, "/health") == 200  # /health needs no key
    assert status(sock, "/v1/models") == 401
    assert status(sock, "/v1/models", token="wrong") == 401
    info = as_json(sock, "/fake/info", token="worker-secret")
    assert info["credentials"] == {
        "api-key-file": {"path": f"{credentials}/api-keys", "length": len("worker-secret")}
    }
    assert info["options"]["alias"] == "a"
    assert info["environment"]["CREDENTIALS_DIRECTORY"] == str(credentials)
    assert info["gpu"] is False


def test_hf_token_path_and_missing_credentials(
    fake: Callable[..., Process], credentials: Path
) -> None:
    port = free_port()
    args = vllm_serve(port)
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "HF_TOKEN_PATH": f"{credentials}/hf-token"}
    fake("vllm", *args, env=env)
    token = as_json(port, "/fake/info")["credentials"]["HF_TOKEN_PATH"]
    assert token == {"path": f"{credentials}/hf-token", "length": len("hf-secret")}
    # A credential that systemd did not load: the server does not start.
    env["HF_TOKEN_PATH"] = f"{credentials}/missing"
    proc = subprocess.run(
        [sys.executable, "-I", str(FAKE), "vllm", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, **env},
        check=False,
    )
    assert proc.returncode == 2
    assert "cannot read HF_TOKEN_PATH" in proc.stderr


def test_chat_and_streaming(fake: Callable[..., Process]) -> None:
    port = free_port()
    args = vllm_serve(port)
    fake("vllm", *args, "--api-key", "k", "--fake-loading-probes", "0")
    reply = as_json(port, "/v1/chat/completions", chat_body("m"), token="k")
    assert reply["choices"][0]["message"]["content"] == "vllm m: hi"
    code, _, body = request(port, "/v1/chat/completions", chat_body("other"), token="k")
    assert code == 404
    assert "does not exist" in json.loads(body)["error"]["message"]
    code, headers, body = request(
        port, "/v1/chat/completions", chat_body("m", stream=True), token="k"
    )
    assert code == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    words = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(words).split() == ["fake", "tokens", "from", "a", "fake", "engine"]


def test_held_stream_waits_for_its_release(fake: Callable[..., Process]) -> None:
    port = free_port()
    args = vllm_serve(port)
    engine = fake("vllm", *args, "--fake-loading-probes", "0")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    body = json.dumps(chat_body("m", stream=True, fake_hold=True)).encode()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = response.read1(65536)
    assert b'"content": "fake "' in first
    engine.wait_for_line("holding a stream", WAIT)
    assert as_json(port, "/fake/info")["holding"] == 1
    assert 'vllm:num_requests_running{model_name="m"} 1\n' in metrics_text(port)
    assert as_json(port, "/fake/release", {})["released"] == 1
    rest = response.read()
    assert sse_events(rest)[-1] == "[DONE]"
    assert as_json(port, "/fake/info")["holding"] == 0
    assert 'vllm:num_requests_running{model_name="m"} 0\n' in metrics_text(port)
    connection.close()


def metrics_text(address: str | int, **kwargs: Any) -> str:
    code, headers, body = request(address, "/metrics", **kwargs)
    assert code == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    return body.decode()


# Each engine on a loopback port without its metrics flag, the flag (None: always on), and the
# sample it then serves.
ENGINES_METRICS = [
    (
        "llama-server",
        ["--alias", "m", "--host", LOOPBACK],
        "--metrics",
        "llamacpp:requests_processing 0",
    ),
    (
        "vllm",
        ["serve", "org/m", "--served-model-name", "m", "--host", LOOPBACK],
        None,
        'vllm:num_requests_running{model_name="m"} 0',
    ),
    (
        "sglang",
        ["serve", "--model-path", "org/s", "--served-model-name", "s", "--host", LOOPBACK],
        "--enable-metrics",
        'sglang:num_running_reqs{model_name="s"} 0',
    ),
]


@pytest.mark.parametrize(("mode", "args", "flag", "sample"), ENGINES_METRICS)
def test_metrics_where_the_real_server_serves_them(
    fake: Callable[..., Process], mode: str, args: list[str], flag: str | None, sample: str
) -> None:
    if flag is not None:
        port = free_port()
        fake(mode, *args, f"--port={port}")
        assert status(port, "/metrics") == 404
    port = free_port()
    fake(mode, *args, f"--port={port}", *([flag] if flag else []))
    gauge = sample.split("{")[0].split(" ")[0]
    help_and_type = f"# HELP {gauge} Number of requests processing.\n# TYPE {gauge} gauge\n"
    assert metrics_text(port) == f"{help_and_type}{sample}\n"
    assert as_json(port, "/fake/info")["scrapes"] == 1


def test_metrics_behind_the_api_key_of_llama_server_only(
    fake: Callable[..., Process], credentials: Path
) -> None:
    llama = str(credentials.parent / "llama.sock")
    key_file = f"--api-key-file={credentials}/api-keys"
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    fake("llama-server", f"--host={llama}", "--alias=a", "--metrics", key_file, env=env)
    assert status(llama, "/metrics") == 401
    assert "llamacpp:requests_processing 0" in metrics_text(llama, token="worker-secret")
    # vLLM guards only /v1, SGLang leaves /metrics open.
    vllm_port, sglang_port = free_port(), free_port()
    fake("vllm", *vllm_serve(vllm_port), "--api-key=k")
    sglang = ["serve", "--model-path=org/s", "--served-model-name=s", f"--host={LOOPBACK}"]
    fake("sglang", *sglang, f"--port={sglang_port}", "--enable-metrics", "--api-key=k")
    for port in (vllm_port, sglang_port):
        assert status(port, "/v1/models") == 401
        assert "num_" in metrics_text(port)


def test_gateway_forwards_by_model(fake: Callable[..., Process]) -> None:
    workers = {}
    for name in ("a", "b"):
        port = free_port()
        args = ("--model-path", f"org/{name}", "--served-model-name", name, "--host", "127.0.0.1")
        fake("sglang", "-m", "sglang.launch_server", *args, "--port", str(port))
        workers[name] = port
    port, metrics = free_port(), free_port()
    urls = [f"http://127.0.0.1:{p}" for p in workers.values()]
    flags = [f"--port={port}", "--prometheus-host=127.0.0.1", f"--prometheus-port={metrics}"]
    gateway = ["--enable-igw", "--host=127.0.0.1", *flags, "--policy=cache_aware"]
    fake("gateway", *gateway, "--worker-urls", *urls)
    # Healthy once a worker is: each worker's first probe answers 503 (loading).
    assert status(port, "/health") == 503
    assert status(port, "/health") == 200
    assert [m["id"] for m in as_json(port, "/v1/models")["data"]] == ["a", "b"]
    for name, worker_port in workers.items():
        code, headers, body = request(port, "/v1/chat/completions", chat_body(name))
        assert code == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == f"sglang {name}: hi"
        assert headers["X-Fake-Gateway-Worker"] == f"http://127.0.0.1:{worker_port}"
    code, _, body = request(port, "/v1/chat/completions", chat_body("b", stream=True))
    assert code == 200
    assert sse_events(body)[-1] == "[DONE]"
    code, _, body = request(port, "/v1/chat/completions", chat_body("sglang"))
    assert code == 404
    assert "fake gateway: no worker serves model 'sglang'" in body.decode()
    assert as_json(port, "/fake/info")["options"]["worker_urls"] == urls
    code, _, body = request(metrics, "/metrics")
    assert (code, body) == (200, b"fake_gateway_scrapes_total 1\n")


def test_stops_cleanly_on_sigint(fake: Callable[..., Process]) -> None:
    engine = fake("upstream", "--port", str(free_port()))
    engine.process.send_signal(signal.SIGINT)
    assert engine.exit_status() == 0


# --- behind the real router, with the openai client ------------------------------------------


def client(router: int, *args: str, token: str = "client-secret", base: str = "/v1") -> Any:
    """Run client.py (the official openai client) against the router; its JSON answer."""
    proc = subprocess.run(
        [
            sys.executable,
            str(CLIENT),
            f"--base-url=http://127.0.0.1:{router}{base}",
            f"--token={token}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class Stack:
    """The real router in front of every kind of fake, as on the VM check's node."""

    def __init__(self, spawn: Callable[..., Process], fake: Callable[..., Process], tmp: Path):
        credentials = tmp / "credentials"
        credentials.mkdir()
        (credentials / "api-keys").write_text("worker-secret\n")
        secrets = tmp / "secrets"
        secrets.mkdir()
        for name, value in (("client", "client-secret"), ("upstream", "upstream-secret")):
            (secrets / name).write_text(value + "\n")
        (secrets / "worker").write_text("worker-secret")
        sock = self.llama_socket = str(tmp / "llama.sock")
        self.ports = {name: free_port() for name in ("vllm", "sglang", "hosted")}
        local = ("--host", "127.0.0.1", "--fake-loading-probes", "0")
        self.llama = fake(
            "llama-server",
            f"--host={sock}",
            "--alias=llama",
            f"--api-key-file={credentials}/api-keys",
            "--fake-loading-probes=0",
            env={"CREDENTIALS_DIRECTORY": str(credentials)},
        )
        vllm_port = str(self.ports["vllm"])
        self.vllm = fake(
            "vllm", "serve", "org/v", "--served-model-name=vllm", *local, "--port", vllm_port
        )
        sglang_port = str(self.ports["sglang"])
        fake(
            "sglang",
            "serve",
            "--model-path=org/s",
            "--served-model-name=sglang",
            *local,
            "--port",
            sglang_port,
        )
        fake("upstream", "--port", str(self.ports["hosted"]))
        config = {
            "host": "127.0.0.1",
            "port": 0,
            "authTokens": [f"${{file:{secrets}/client}}"],
            "models": {
                "llama": {
                    "url": f"unix://{sock}",
                    "headers": {"Authorization": f"Bearer ${{file:{secrets}/worker}}"},
                },
                "vllm": {"url": f"http://127.0.0.1:{self.ports['vllm']}"},
                "sglang": {"url": f"http://127.0.0.1:{self.ports['sglang']}"},
                "hosted": {
                    "url": f"http://127.0.0.1:{self.ports['hosted']}",
                    "headers": {"Authorization": f"Bearer ${{file:{secrets}/upstream}}"},
                },
            },
        }
        self.router = RouterProcess(config, tmp)
        self.port = self.router.address[1]


@pytest.fixture
def stack(
    openai_client: None, spawn: Callable[..., Process], fake: Callable[..., Process], tmp_path: Path
) -> Iterator[Stack]:
    stack = Stack(spawn, fake, tmp_path)
    yield stack
    stack.router.stop()


def test_every_fake_through_the_router_with_the_openai_client(stack: Stack) -> None:
    for model, mode in (("llama", "llama-server"), ("vllm", "vllm"), ("sglang", "sglang")):
        reply = client(stack.port, "chat", model, "--prompt", "ping")
        assert reply == {
            "model": model,
            "content": f"{mode} {model}: ping",
            "finish_reason": "stop",
        }
        streamed = client(stack.port, "chat", model, "--stream")
        assert streamed["content"].split() == ["fake", "tokens", "from", "a", "fake", "engine"]
        assert streamed["finish_reason"] == "stop"
    # The hosted upstream sees the injected key, not the client's token.
    hosted = client(stack.port, "chat", "hosted")
    assert hosted["content"] == "authorization=Bearer upstream-secret"
    assert client(stack.port, "models") == {"ids": ["hosted", "llama", "sglang", "vllm"]}
    pinned = client(stack.port, "chat", "vllm", base="/route/vllm/v1")
    assert pinned["content"] == "vllm vllm: hello"


def test_auth_and_unknown_models_through_the_router(stack: Stack) -> None:
    unknown = client(stack.port, "error", "nope")
    assert (unknown["status"], unknown["code"]) == (404, "model_not_found")
    denied = client(stack.port, "error", "vllm", token="wrong")
    assert (denied["status"], denied["code"]) == (401, "invalid_api_key")
    # Without the key the router injects, the worker itself refuses.
    assert status(stack.llama_socket, "/v1/models") == 401
    assert status(stack.llama_socket, "/v1/models", token="worker-secret") == 200


def test_a_held_stream_survives_a_router_reload(stack: Stack) -> None:
    argv = [sys.executable, str(CLIENT), f"--base-url=http://127.0.0.1:{stack.port}/v1"]
    held = subprocess.Popen(
        [*argv, "--token=client-secret", "chat", "vllm", "--stream", "--hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stack.vllm.wait_for_line("holding a stream", WAIT)
        stack.router.process.send_signal(signal.SIGHUP)
        stack.router.wait_for_line(r"reloaded .*: 4 model\(s\)", WAIT)
        released = request(stack.ports["vllm"], "/fake/release", {})
        assert json.loads(released[2]) == {"released": 1}
        out, err = held.communicate(timeout=60)
    finally:
        held.kill()
    assert held.returncode == 0, err
    reply = json.loads(out)
    assert reply["content"].split() == ["fake", "tokens", "from", "a", "fake", "engine"]
    assert reply["finish_reason"] == "stop"
