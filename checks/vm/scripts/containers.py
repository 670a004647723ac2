# The vm-containers check (checks/vm.nix): vLLM and SGLang as rootless Podman containers of
# their lingering users behind llmhop, SGLang also behind the SGL Model Gateway, llama.cpp as a
# rootful container; configured by checks/vm/containers-config.nix. Every image is the fake
# (tests/support/fake_engine.py) and a CDI spec maps nvidia.com/gpu=all to /dev/null. The nixosTest
# driver provides `machine`, `start_all`, `subtest` and type-checks this script with mypy.
import json
import shlex
from typing import NamedTuple

ROUTER = "http://127.0.0.1:8080"
CLIENT = "/run/current-system/sw/bin/llmhop-vm-client"
IMAGE = "localhost/llmhop-fake-engine"
ROOTFUL = "llama-cpp-llama-root.service"
GATEWAY = "sglang-gateway.service"
# The rootless units by user (UID), in their start order.
USERS: dict[str, tuple[int, list[str]]] = {
    "vllm": (60602, ["vllm-vllm-port.service", "vllm-vllm-sock.service"]),
    "sglang": (60603, ["sglang-sglang-a.service", "sglang-sglang-b.service", GATEWAY]),
}


class Worker(NamedTuple):
    unit: str
    user: str | None  # None: a system unit
    mode: str  # of the fake
    gpu: bool


WORKERS = {
    "llama-root": Worker(ROOTFUL, None, "llama-server", False),
    "vllm-port": Worker("vllm-vllm-port.service", "vllm", "vllm", True),
    "vllm-sock": Worker("vllm-vllm-sock.service", "vllm", "vllm", True),
    "sglang-a": Worker("sglang-sglang-a.service", "sglang", "sglang", True),
    "sglang-b": Worker("sglang-sglang-b.service", "sglang", "sglang", True),
}
WORDS = ["fake", "tokens", "from", "a", "fake", "engine"]
# Loading an image and podman's health checks (every 10 s) take their time.
TIMEOUT = 900


def as_user(user: str, command: str) -> str:
    """A command in the login environment of a rootless container user."""
    uid = USERS[user][0]
    return f"su -l {user} -s /bin/sh -c {shlex.quote(f'XDG_RUNTIME_DIR=/run/user/{uid} {command}')}"


def client(*args: str, base: str = "/v1") -> dict:
    """The official openai client's answer (checks/vm/client.py); llmhop has no auth here."""
    return json.loads(machine.succeed(shlex.join([CLIENT, f"--base-url={ROUTER}{base}", *args])))


def get(path: str) -> dict:
    return json.loads(machine.succeed(f"curl --silent --fail {ROUTER}{path}"))


start_all()

with subtest("the rootful container is a system unit, from the loaded image"):
    machine.wait_for_unit(ROOTFUL, timeout=TIMEOUT)
    machine.succeed(f"podman image exists {IMAGE}:llama-cpp")
    machine.wait_for_unit("llmhop.service", timeout=TIMEOUT)

with subtest("the rootless containers are user units of their lingering users"):
    for user, (uid, units) in USERS.items():
        machine.wait_for_unit(f"user@{uid}.service", timeout=TIMEOUT)
        for unit in units:
            machine.wait_for_unit(unit, user, timeout=TIMEOUT)
            # Not a system unit: quadlet-nix generated it for the user manager only.
            machine.fail(f"systemctl cat {unit}")
        tag = user if user == "vllm" else "gateway"
        machine.succeed(as_user(user, f"podman image exists {IMAGE}:{tag}"))
        running = machine.succeed(as_user(user, "podman ps --format '{{.Names}}'")).split()
        assert sorted(running) == sorted(f"systemd-{u.removesuffix('.service')}" for u in units)
    # Nothing pulled: root's storage holds only the rootful image.
    images = machine.succeed("podman images --format '{{.Repository}}:{{.Tag}}'").split()
    assert images == [f"{IMAGE}:llama-cpp"], images

with subtest("containers are active once healthy (Notify=healthy), not before"):
    for model, worker in WORKERS.items():
        fake = get(f"/route/{model}/fake/info")
        active = int(
            machine.get_unit_property(worker.unit, "ActiveEnterTimestampMonotonic", worker.user)
        )
        # The first health check got 503 (loading); the unit went active after the first 200.
        assert fake["probes"] >= 2 and fake["ready_at_us"] <= active, (model, fake, active)

with subtest("llmhop routes to every container, for the openai client"):
    assert client("models") == {"ids": sorted([*WORKERS, "sglang"])}
    for model, worker in WORKERS.items():
        reply = client("chat", model, "--prompt", "ping")
        assert reply == {
            "model": model,
            "content": f"{worker.mode} {model}: ping",
            "finish_reason": "stop",
        }
        streamed = client("chat", model, "--stream")
        assert streamed["content"].split() == WORDS and streamed["finish_reason"] == "stop"

with subtest("containers get the module's flags, credentials and CDI devices"):
    for model, worker in WORKERS.items():
        fake = get(f"/route/{model}/fake/info")
        # AddDevice=nvidia.com/gpu=all went through the CDI spec: its device node and variable.
        assert fake["gpu"] is worker.gpu, (model, fake)
        cdi = fake["environment"].get("LLMHOP_FAKE_CDI")
        assert (cdi == "nvidia.com/gpu=all") is worker.gpu, fake
    vllm = get("/route/vllm-sock/fake/info")
    assert vllm["options"]["uds"] == "/run/llmhop/socket/http.sock", vllm
    assert vllm["credentials"]["HF_TOKEN_PATH"] == {
        "path": "/run/llmhop/credentials/llmhop.hf-token",
        "length": len("hf-secret"),
    }, vllm
    llama = get("/route/llama-root/fake/info")
    assert llama["options"]["host"] == "/run/llmhop/socket/http.sock", llama
    assert llama["credentials"]["api-key-file"]["path"] == "/run/llmhop/credentials/api-keys"
    # The module replaced the image's entrypoint with `python3 -m sglang.launch_server`.
    sglang = get("/route/sglang-b/fake/info")
    assert sglang["argv"][:2] == ["-m", "sglang.launch_server"], sglang
    assert sglang["options"]["mem_fraction_static"] == 0.5, sglang
    # The rootful container's API key: without llmhop's header the server refuses.
    machine.fail(
        "curl --silent --fail --unix-socket /run/llmhop/llama-cpp-llama-root/http.sock "
        "http://localhost/v1/models"
    )

with subtest("the SGL Model Gateway forwards to the SGLang workers"):
    gateway = get("/route/sglang/fake/info")["options"]
    assert gateway["worker_urls"] == ["http://127.0.0.1:30001", "http://127.0.0.1:30002"], gateway
    assert gateway["policy"] == "round_robin", gateway
    for model in ("sglang-a", "sglang-b"):
        reply = client("chat", model, base="/route/sglang/v1")
        assert reply["content"] == f"sglang {model}: hello", reply
    chat = json.dumps({"model": "sglang-b", "messages": [{"role": "user", "content": "hi"}]})
    headers = machine.succeed(
        "curl --silent --fail --dump-header - --output /dev/null"
        f" -H 'Content-Type: application/json' -d {shlex.quote(chat)}"
        f" {ROUTER}/route/sglang/v1/chat/completions"
    )
    assert "x-fake-gateway-worker: http://127.0.0.1:30002" in headers.lower(), headers
    # Body routing on `sglang` reaches the gateway, which knows no model of that name.
    answer = client("error", "sglang")
    assert answer["status"] == 404 and "fake gateway" in json.dumps(answer["body"]), answer
    machine.succeed("curl --silent --fail http://127.0.0.1:29000/metrics | grep -q fake_gateway")

with subtest("a killed rootless container restarts over its stale socket"):
    unit = "vllm-vllm-sock.service"
    machine.succeed("test -S /run/llmhop/vllm-vllm-sock/http.sock")
    status, out = machine.systemctl(f"kill --signal=SIGKILL {unit}", "vllm")
    assert status == 0, out
    status, out = machine.systemctl(f"restart {unit}", "vllm")
    assert status == 0, out
    assert client("chat", "vllm-sock")["model"] == "vllm-sock"
