# The vm-native check (checks/vm.nix): the router and native llama.cpp, vLLM and SGLang workers
# on one node, configured by checks/vm/native-config.nix; the workers' servers are fakes
# (tests/support/fake_engine.py). The nixosTest driver provides `machine`, `start_all`, `subtest`
# and type-checks this script with mypy (so no `from __future__` here).
import json
import re
import shlex
import time

TOKEN = "client-secret"
ROUTER = "http://127.0.0.1:8080"
LOCAL_SOCKET = "/run/llmhop/local.sock"
CLIENT = "/run/current-system/sw/bin/llmhop-vm-client"
# Routing key -> (unit, the fake's mode) of the workers started at boot.
WORKERS = {
    "llama-port": ("llama-cpp-llama-port.service", "llama-server"),
    "vllm-port": ("vllm-vllm-port.service", "vllm"),
    "vllm-sock": ("vllm-vllm-sock.service", "vllm"),
    "sglang-a": ("sglang-sglang-a.service", "sglang"),
}
# Started by this script: loading until a file exists, and one that dies while loading.
LLAMA_SOCK = "llama-cpp-llama-sock.service"
DYING = "llama-cpp-dying.service"
MODELS = sorted([*WORKERS, "llama-sock", "dying", "hosted"])
WORDS = ["fake", "tokens", "from", "a", "fake", "engine"]
TIMEOUT = 300


def curl(
    path: str, *options: str, token: str | None = TOKEN, socket: str | None = None
) -> tuple[int, str]:
    """Status and body of a request to the router (over TCP or a unix socket)."""
    args = [
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "60",
        "--write-out",
        r"\n%{http_code}",
    ]
    if token is not None:
        args += ["--header", f"Authorization: Bearer {token}"]
    if socket is not None:
        args += ["--unix-socket", socket, f"http://localhost{path}"]
    else:
        args += [f"{ROUTER}{path}"]
    body, _, status = machine.succeed(shlex.join([*args, *options])).rpartition("\n")
    return int(status), body


def post(model: str) -> list[str]:
    """curl options posting a chat request for `model`."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return ["--header", "Content-Type: application/json", "--data", json.dumps(body)]


def client(*args: str, token: str = TOKEN, base: str = "/v1") -> dict:
    """The official openai client's answer (checks/vm/client.py)."""
    command = [CLIENT, f"--base-url={ROUTER}{base}", f"--token={token}", *args]
    return json.loads(machine.succeed(shlex.join(command)))


def info(model: str) -> dict:
    """What the fake behind a route reports of itself (through the router)."""
    status, body = curl(f"/route/{model}/fake/info")
    assert status == 200, body
    return json.loads(body)


def metric(sample: str) -> float:
    """The value of one sample of the router's /metrics, e.g. `llmhop_models`."""
    status, text = curl("/metrics")
    assert status == 200, text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample} in:\n{text}")


def wait_for_metric(sample: str, value: float) -> None:
    machine.wait_until_succeeds(
        f"curl --silent --header 'Authorization: Bearer {TOKEN}' {ROUTER}/metrics"
        f" | grep -Fx {shlex.quote(f'{sample} {value:g}')}",
        timeout=60,
    )


def router_pid() -> str:
    return machine.get_unit_property("llmhop.service", "MainPID")


start_all()

with subtest("the router is socket-activated and ready as soon as its unit is"):
    machine.wait_for_unit("llmhop-default.socket", timeout=TIMEOUT)
    machine.wait_for_unit("llmhop-local.socket", timeout=TIMEOUT)
    machine.wait_for_unit("llmhop.service", timeout=TIMEOUT)
    # Type=notify: READY=1 came once every listener served, so no port is waited for.
    for socket in (None, LOCAL_SOCKET):
        status, body = curl("/health", token=None, socket=socket)
        assert status == 200, body
        assert json.loads(body) == {"status": "ok", "models": len(MODELS)}, body
    triggered = machine.get_unit_property("llmhop.service", "TriggeredBy").split()
    assert sorted(triggered) == ["llmhop-default.socket", "llmhop-local.socket"], triggered

with subtest("workers are active once healthy, not before"):
    for unit, _ in WORKERS.values():
        machine.wait_for_unit(unit, timeout=TIMEOUT)
    # Each fake answered its first probe with 503: the unit went active after the first 200.
    for model, (unit, _) in WORKERS.items():
        fake = info(model)
        active = int(machine.get_unit_property(unit, "ActiveEnterTimestampMonotonic"))
        assert fake["probes"] >= 2 and fake["ready_at_us"] <= active, (model, fake, active)
    machine.succeed("mkdir -p /run/llmhop-vm", f"systemctl start --no-block {LLAMA_SOCK}")
    machine.wait_until_succeeds(
        f"journalctl -u {LLAMA_SOCK} -o cat | grep -q 'health probe 3'", timeout=60
    )
    assert machine.get_unit_property(LLAMA_SOCK, "ActiveState") == "activating"
    machine.succeed("touch /run/llmhop-vm/llama-sock.ready")
    machine.wait_for_unit(LLAMA_SOCK, timeout=60)
    status_text = machine.get_unit_property(LLAMA_SOCK, "StatusText")
    assert "healthy at unix:///run/llmhop/llama-cpp-llama-sock/http.sock" in status_text

with subtest("every worker answers the openai client through the router"):
    for model, (_, mode) in {**WORKERS, "llama-sock": (LLAMA_SOCK, "llama-server")}.items():
        reply = client("chat", model, "--prompt", "ping")
        assert reply == {
            "model": model,
            "content": f"{mode} {model}: ping",
            "finish_reason": "stop",
        }
        streamed = client("chat", model, "--stream")
        assert streamed["content"].split() == WORDS, streamed
        assert streamed["finish_reason"] == "stop", streamed
    # Pinned by path, and over the unix listener.
    assert client("chat", "vllm-port", base="/route/vllm-port/v1")["model"] == "vllm-port"
    status, body = curl("/v1/chat/completions", *post("sglang-a"), socket=LOCAL_SOCKET)
    assert status == 200 and json.loads(body)["model"] == "sglang-a", body

with subtest("workers run with the flags, identity and credentials the module gives them"):
    llama = info("llama-sock")
    assert llama["options"]["host"] == "/run/llmhop/llama-cpp-llama-sock/http.sock", llama
    assert llama["credentials"]["api-key-file"] == {
        "path": "/run/credentials/llama-cpp-llama-sock.service/api-keys",
        "length": len("worker-secret"),
    }, llama
    assert 61184 <= llama["uid"] <= 65519, llama  # DynamicUser=
    port = info("llama-port")["options"]
    assert (port["host"], port["port"], port["alias"]) == ("127.0.0.1", 18001, "llama-port")
    assert (port["hf_repo"], port["ctx_size"], port["jinja"]) == (
        "fake/llama-GGUF:Q4_K_M",
        2048,
        True,
    )
    vllm = info("vllm-sock")
    assert vllm["argv"][:2] == ["serve", "fake/vllm-sock"], vllm
    assert vllm["options"]["uds"] == "/run/llmhop/vllm-vllm-sock/http.sock", vllm
    assert vllm["options"]["host"] is None and vllm["options"]["port"] is None, vllm
    assert vllm["credentials"]["HF_TOKEN_PATH"]["length"] == len("hf-secret"), vllm
    assert vllm["uid"] == 60602 and vllm["environment"]["HF_HOME"] == "/var/cache/vllm/vllm-sock"
    assert info("vllm-port")["options"]["max_model_len"] == 4096
    sglang = info("sglang-a")
    assert sglang["argv"][:2] == ["-m", "sglang.launch_server"], sglang
    assert sglang["options"]["model_path"] == "fake/sglang-a", sglang
    assert sglang["options"]["mem_fraction_static"] == 0.5 and sglang["uid"] == 60603, sglang

with subtest("the hosted provider gets the key from the credstore, not the client's token"):
    machine.wait_for_open_port(9000, timeout=60)
    assert client("chat", "hosted")["content"] == "authorization=Bearer upstream-secret"

with subtest("auth failures"):
    for token in (None, "wrong"):
        status, body = curl("/v1/models", token=token)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", body
    denied = client("error", "vllm-port", token="wrong")
    assert (denied["status"], denied["code"]) == (401, "invalid_api_key"), denied
    # Auth comes before the model lookup.
    assert curl("/v1/chat/completions", *post("nope"), token=None)[0] == 401
    # /health needs no token; the workers themselves refuse a request without the router's key.
    assert curl("/health", token=None)[0] == 200
    machine.fail(
        "curl --silent --fail --unix-socket /run/llmhop/llama-cpp-llama-sock/http.sock "
        "http://localhost/v1/models"
    )

with subtest("an unknown model"):
    unknown = client("error", "nope")
    assert (unknown["status"], unknown["code"]) == (404, "model_not_found"), unknown
    assert curl("/v1/models/nope")[0] == 404

with subtest("/v1/models"):
    assert client("models") == {"ids": MODELS}
    status, body = curl("/v1/models/vllm-sock")
    assert status == 200 and json.loads(body)["id"] == "vllm-sock", body

with subtest("/metrics"):
    # With auth on, /metrics needs a token like every route but /health.
    assert curl("/metrics", token=None)[0] == 401
    assert metric("llmhop_models") == len(MODELS)
    for model in WORKERS:
        assert metric(f'llmhop_requests_total{{model="{model}",route="body",status="200"}}') >= 2
    assert metric('llmhop_requests_total{model="-",route="error",status="401"}') >= 1

with subtest("reloads keep a stream in flight"):
    pid = router_pid()
    machine.succeed(
        shlex.join(
            [
                "systemd-run",
                "--unit=held-stream",
                "--service-type=exec",
                "--property=RemainAfterExit=yes",
                "--property=StandardOutput=file:/run/held-stream.json",
                CLIENT,
                f"--base-url={ROUTER}/v1",
                f"--token={TOKEN}",
                "chat",
                "vllm-port",
                "--stream",
                "--hold",
            ]
        )
    )
    machine.wait_until_succeeds(
        f"curl --silent -H 'Authorization: Bearer {TOKEN}' {ROUTER}/route/vllm-port/fake/info"
        " | grep -q '\"holding\": 1'",
        timeout=60,
    )
    assert metric('llmhop_requests_in_flight{model="vllm-port"}') == 1
    machine.succeed("systemctl reload llmhop.service")
    wait_for_metric('llmhop_config_reloads_total{result="success"}', 1)
    # Into a configuration with one more route: NixOS reloads the router (reloadTriggers).
    machine.succeed(
        "/run/current-system/specialisation/extra-route/bin/switch-to-configuration test"
    )
    wait_for_metric('llmhop_config_reloads_total{result="success"}', 2)
    assert router_pid() == pid
    assert client("chat", "extra-route")["content"] == "authorization=Bearer upstream-secret"
    assert metric('llmhop_requests_in_flight{model="vllm-port"}') == 1
    status, body = curl("/route/vllm-port/fake/release", "--data", "{}")
    assert status == 200 and json.loads(body) == {"released": 1}, body
    machine.wait_until_succeeds("[ $(systemctl show held-stream -P MainPID) = 0 ]", timeout=60)
    assert machine.get_unit_property("held-stream", "Result") == "success"
    assert machine.get_unit_property("held-stream", "ExecMainStatus") == "0"
    held = json.loads(machine.succeed("cat /run/held-stream.json"))
    assert held["content"].split() == WORDS and held["finish_reason"] == "stop", held

with subtest("a SIGKILLed worker restarts over its stale socket"):
    for model, unit in (("llama-sock", LLAMA_SOCK), ("vllm-sock", WORKERS["vllm-sock"][0])):
        pid = machine.get_unit_property(unit, "MainPID")
        machine.succeed(f"systemctl kill --signal=SIGKILL {unit}")
        machine.wait_until_fails(f"systemctl is-active --quiet {unit}", timeout=60)
        machine.succeed(f"timeout 120 systemctl restart {unit}")
        machine.require_unit_state(unit, "active")
        assert machine.get_unit_property(unit, "MainPID") != pid
        assert client("chat", model)["model"] == model
        machine.fail(f"journalctl -u {unit} -o cat | grep -q 'Address already in use'")

with subtest("a worker dying while loading fails its start at once"):
    started = time.monotonic()
    status, _ = machine.execute(f"timeout 120 systemctl start {DYING}")
    assert status not in (0, 124), status
    assert time.monotonic() - started < 60
    assert machine.get_unit_property(DYING, "Result") == "exit-code"
    assert machine.get_unit_property(DYING, "ExecMainStatus") == "3"
    machine.succeed(f"journalctl -u {DYING} -o cat | grep -q 'exited before it was ready'")

with subtest("systemd-analyze security rates the router 2.0 at most"):
    report = machine.succeed("systemd-analyze security --no-pager llmhop.service")
    match = re.search(r"Overall exposure level for llmhop\.service: (\d+(?:\.\d+)?)", report)
    assert match is not None, report
    assert float(match.group(1)) <= 2.0, report
