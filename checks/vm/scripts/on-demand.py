# The vm-on-demand check (checks/vm.nix): two llama.cpp models of one group on demand,
# configured by checks/vm/on-demand-config.nix; their servers are fakes
# (tests/support/fake_engine.py) that load for three seconds, and a third whose server dies
# while loading. Every transition is read from systemd. The nixosTest driver provides
# `machine`, `start_all`, `subtest` and type-checks this script with mypy (so no
# `from __future__` here).
import json
import shlex

ROUTER = "http://127.0.0.1:8080"
A, B = "llama-cpp-a.service", "llama-cpp-b.service"
PROXY_A, PROXY_B = "llama-cpp-a-proxy.service", "llama-cpp-b-proxy.service"
BROKEN, PROXY_BROKEN = "llama-cpp-broken.service", "llama-cpp-broken-proxy.service"
SOCKETS = ["llama-cpp-a-proxy.socket", "llama-cpp-b-proxy.socket", "llama-cpp-broken-proxy.socket"]
# Where `a` itself listens, behind its proxy.
SERVER_A = "/run/llmhop/llama-cpp-a/worker/http.sock"
LOADING_PROBES = 3
TIMEOUT = 120


def state(unit: str) -> str:
    return machine.get_unit_property(unit, "ActiveState")


def timestamp(unit: str, what: str) -> int:
    """A unit's CLOCK_MONOTONIC timestamp in µs (`ActiveEnter`, `InactiveExit`, …)."""
    return int(machine.get_unit_property(unit, f"{what}TimestampMonotonic"))


def wait_for_state(unit: str, wanted: str) -> None:
    machine.wait_until_succeeds(
        f'[ "$(systemctl show -P ActiveState {unit})" = {wanted} ]', timeout=TIMEOUT
    )


def request(name: str, model: str, **extra: object) -> None:
    """A chat request for `model` through the router, in a transient unit `name` whose answer
    goes to /run/<name>.out."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    command = [
        "systemd-run",
        f"--unit={name}",
        "--service-type=exec",
        "--property=RemainAfterExit=yes",
        f"--property=StandardOutput=file:/run/{name}.out",
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        str(TIMEOUT),
        "--header",
        "Content-Type: application/json",
        "--data",
        json.dumps(body),
        f"{ROUTER}/v1/chat/completions",
    ]
    machine.succeed(shlex.join(command))


def finished(name: str) -> str:
    """The answer of request `name` once its curl exited 0."""
    machine.wait_until_succeeds(f"[ $(systemctl show -P MainPID {name}) = 0 ]", timeout=TIMEOUT)
    assert machine.get_unit_property(name, "Result") == "success", name
    return machine.succeed(f"cat /run/{name}.out")


def server_a(path: str) -> dict:
    """`a`'s fake engine, asked on its own socket (not through the router)."""
    return json.loads(
        machine.succeed(f"curl --silent --fail --unix-socket {SERVER_A} http://localhost{path}")
    )


def metric(sample: str) -> str:
    return f"curl --silent {ROUTER}/metrics | grep -Fx {shlex.quote(sample)}"


start_all()

with subtest("at boot the sockets listen and no model is loaded"):
    machine.wait_for_unit("llmhop-default.socket", timeout=TIMEOUT)
    for socket in SOCKETS:
        machine.wait_for_unit(socket, timeout=TIMEOUT)
        assert machine.get_unit_property(socket, "SubState") == "listening", socket
    for unit in (A, B, PROXY_A, PROXY_B):
        assert state(unit) == "inactive", unit

with subtest("the first request starts the model, waits while it loads, and succeeds"):
    request("first", "a")
    wait_for_state(A, "activating")
    reply = json.loads(finished("first"))
    assert reply["model"] == "a", reply
    assert state(A) == "active" and state(PROXY_A) == "active"
    assert state(B) == "inactive"
    assert server_a("/fake/info")["probes"] > LOADING_PROBES

with subtest("an idle model stops, its socket listens on"):
    wait_for_state(A, "inactive")
    assert state(PROXY_A) == "inactive"
    assert machine.get_unit_property(PROXY_A, "Result") == "success"
    assert machine.get_unit_property(SOCKETS[0], "SubState") == "listening"
    machine.fail(f"test -e {SERVER_A}")

with subtest("a request for the other model of the group waits, then swaps them"):
    request("held", "a", stream=True, fake_hold=True)
    machine.wait_until_succeeds(
        f"curl --silent --unix-socket {SERVER_A} http://localhost/fake/info"
        " | grep -q '\"holding\": 1'",
        timeout=TIMEOUT,
    )
    request("second", "b")
    machine.wait_until_succeeds(
        metric('llmhop_queue_depth{group="gpu",model="b"} 1'), timeout=TIMEOUT
    )
    assert state(A) == "active" and state(B) == "inactive" and state(PROXY_B) == "inactive"
    # Released by a transient unit, whose start systemd timestamps on the same clock as a's.
    machine.succeed(
        "systemd-run --wait --unit=release --property=RemainAfterExit=yes curl --silent --fail"
        f" --unix-socket {SERVER_A} --data '{{}}' http://localhost/fake/release"
    )
    assert finished("held").rstrip().endswith("data: [DONE]")
    assert json.loads(finished("second"))["model"] == "b"
    assert state(A) == "inactive" and state(PROXY_A) == "inactive"
    assert state(B) == "active" and state(PROXY_B) == "active"
    # `a` stopped only after its stream had been released, and before `b` began to load.
    assert timestamp(A, "ActiveExit") >= timestamp("release.service", "InactiveExit")
    assert timestamp(A, "InactiveEnter") <= timestamp(B, "InactiveExit")

with subtest("the other model stops when idle too"):
    wait_for_state(B, "inactive")
    assert state(PROXY_B) == "inactive"

with subtest("a model that fails to load fails its request, and only the next one tries again"):
    body = json.dumps({"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    for attempt in (1, 2):
        status = machine.succeed(
            "curl --silent --output /dev/null --write-out '%{http_code}'"
            f" --max-time {TIMEOUT} --header 'Content-Type: application/json'"
            f" --data {shlex.quote(body)} {ROUTER}/v1/chat/completions"
        )
        assert status == "502", status
        assert state(BROKEN) == "failed" and state(PROXY_BROKEN) == "inactive"
        assert machine.get_unit_property(SOCKETS[2], "SubState") == "listening"
        loads = machine.succeed(
            f"journalctl --unit {BROKEN} --output cat | grep -c 'failed to load the model'"
        )
        assert int(loads) == attempt, loads
