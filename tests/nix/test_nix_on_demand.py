"""Models on demand and groups, evaluated: the socket, proxy and worker units and their
dependencies, Conflicts= within a group, the router's group and upstreamIdleTimeout, the
container variant (in the user manager of a rootless container's user), every assertion, and
the rendered units through `systemd-analyze verify`. The scenario under a real systemd is
test_nix_on_demand_systemd.py; the containers through Podman's generator are in
test_nix_containers_quadlet.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from module_configs import WATCHED, argv, assertions, config_file, container, service, warnings
from nix_harness import REPO, FailedAssertions, analyze_verify, evaluate, render_units, stand_in

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

ON_DEMAND = {"enable": True, "idleTimeout": "2s"}


def native() -> dict[str, Any]:
    """llama.cpp `a` (socket) and `b` (port) and native vLLM `v` in group gpu; SGLang `s`
    on demand alone, behind its own port."""
    return {
        "services": {
            "llmhop": {
                "enable": True,
                "llama-cpp": {
                    "models": {
                        "a": {"onDemand": ON_DEMAND, "group": "gpu"},
                        "b": {"port": 18002, "onDemand": ON_DEMAND, "group": "gpu"},
                    }
                },
                "vllm": {
                    "runtime": "native",
                    "models": {
                        "v": {
                            "model": "org/v",
                            "gpu": False,
                            "onDemand": {"enable": True, "idleTimeout": "1h 30min"},
                            "group": "gpu",
                        }
                    },
                },
                "sglang": {
                    "runtime": "native",
                    "package": "/opt/sglang",
                    "models": {
                        "s": {
                            "port": 30001,
                            "model": "org/s",
                            "gpu": False,
                            "onDemand": {"enable": True, "workerPort": 30101},
                        }
                    },
                },
            }
        }
    }


def containers(*, rootless: bool) -> dict[str, Any]:
    """vLLM `x` (socket) and `y` (port) in group gpu, as containers."""
    user = {} if rootless else {"quadlet": {"user": None}}
    return {
        "services": {
            "llmhop": {
                "enable": True,
                "vllm": {
                    **user,
                    "tag": "v0.11.0",
                    "devices": ["nvidia.com/gpu=0"],
                    "models": {
                        "x": {"model": "org/x", "onDemand": ON_DEMAND, "group": "gpu"},
                        "y": {
                            "port": 20002,
                            "model": "org/y",
                            "onDemand": ON_DEMAND,
                            "group": "gpu",
                        },
                    },
                },
            }
        }
    }


# --- native workers ---------------------------------------------------------------------------


def test_a_socket_unit_owns_the_registered_address() -> None:
    result = evaluate(native())
    sockets = result["sockets"]
    assert sockets["llama-cpp-a-proxy"]["listenStreams"] == ["/run/llmhop/llama-cpp-a/http.sock"]
    assert sockets["llama-cpp-a-proxy"]["socketConfig"] == {
        "Service": "llama-cpp-a-proxy.service",
        # A proxy that ends with its worker drops the connections still waiting.
        "FlushPending": True,
        "SocketGroup": "llama-cpp",
        "SocketMode": "0660",
        "RemoveOnStop": True,
    }
    assert sockets["llama-cpp-b-proxy"]["listenStreams"] == ["127.0.0.1:18002"]
    assert sockets["sglang-s-proxy"]["listenStreams"] == ["127.0.0.1:30001"]
    assert sockets["vllm-v-proxy"]["socketConfig"]["SocketGroup"] == "vllm"
    for name in ("llama-cpp-a", "llama-cpp-b", "vllm-v", "sglang-s"):
        assert sockets[f"{name}-proxy"]["wantedBy"] == ["sockets.target"]
    # The router still routes to the registered address, and joins the socket groups.
    routes = config_file(result)["models"]
    assert routes["a"]["url"] == "unix:///run/llmhop/llama-cpp-a/http.sock"
    assert routes["b"]["url"] == "http://127.0.0.1:18002"
    assert routes["s"]["url"] == "http://127.0.0.1:30001"
    assert sorted(service(result)["SupplementaryGroups"]) == ["llama-cpp", "vllm"]


def test_the_proxy_is_bound_to_the_worker_and_exits_when_idle() -> None:
    result = evaluate(native())
    for worker, target, idle in (
        ("llama-cpp-a", "/run/llmhop/llama-cpp-a/worker/http.sock", "2s"),
        ("llama-cpp-b", "/run/llmhop/llama-cpp-b/worker/http.sock", "2s"),
        ("vllm-v", "/run/llmhop/vllm-v/worker/http.sock", "1h 30min"),
        ("sglang-s", "127.0.0.1:30101", "10min"),
    ):
        proxy = result["services"][f"{worker}-proxy"]
        assert proxy["bindsTo"] == proxy["after"] == [f"{worker}.service"]
        assert "wantedBy" not in proxy
        command = argv(result, f"{worker}-proxy")
        assert command[0].endswith("-systemd/lib/systemd/systemd-socket-proxyd")
        # The router's default cap (8 requests) needs no more than the proxy's own default.
        assert command[1:] == [f"--exit-idle-time={idle}", "--connections-max=256", target]
        config = service(result, f"{worker}-proxy")
        assert config["LimitNOFILE"] == 6 * 256 + 64
        # As the router (which reaches every worker socket), in the router's sandbox.
        assert (config["User"], config["Group"]) == ("llmhop", "llmhop")
        assert config["SocketBindDeny"] == "any"
        assert config["NoNewPrivileges"] is True
    assert service(result, "llama-cpp-b-proxy")["SupplementaryGroups"] == ["llama-cpp"]
    assert service(result, "sglang-s-proxy")["SupplementaryGroups"] == ["sglang"]


def test_the_worker_starts_only_through_its_proxy_and_listens_behind_it() -> None:
    result = evaluate(native())
    for worker in ("llama-cpp-a", "llama-cpp-b", "vllm-v", "sglang-s"):
        unit = result["services"][worker]
        assert "wantedBy" not in unit, worker
        # Every load is a start: no rate limit; and the next request, not systemd, restarts it.
        assert service(result, worker)["Restart"] == "no"
        assert unit["unitConfig"] == {
            "StopWhenUnneeded": True,
            "StartLimitBurst": 3,
            "StartLimitIntervalSec": 0,
        }
        # Ready only once healthy, as every worker: on its own address behind the proxy.
        assert service(result, worker)["Type"] == "notify"
        assert service(result, worker)["TimeoutStartSec"] == 3600
    a = argv(result, "llama-cpp-a")
    assert a[a.index("-url") + 1] == "unix:///run/llmhop/llama-cpp-a/worker/http.sock"
    assert a[a.index("--host") + 1] == "/run/llmhop/llama-cpp-a/worker/http.sock"
    assert service(result, "llama-cpp-a")["RuntimeDirectory"] == "llmhop/llama-cpp-a/worker"
    b = service(result, "llama-cpp-b")
    assert b["RuntimeDirectory"] == "llmhop/llama-cpp-b/worker"
    assert "SocketBindAllow" not in b
    v = argv(result, "vllm-v")
    assert v[v.index("--uds") + 1] == "/run/llmhop/vllm-v/worker/http.sock"
    s = argv(result, "sglang-s")
    assert s[s.index("-url") + 1] == "http://127.0.0.1:30101"
    assert (s[s.index("--host") + 1], s[s.index("--port") + 1]) == ("127.0.0.1", "30101")
    assert service(result, "sglang-s")["SocketBindAllow"] == "tcp:30101"


def test_workers_of_a_group_conflict_ordered_one_way() -> None:
    result = evaluate(native())
    services = result["services"]
    group = {"llama-cpp-a.service", "llama-cpp-b.service", "vllm-v.service"}
    for unit in group:
        worker = services[unit.removesuffix(".service")]
        others = sorted(group - {unit})
        assert worker["conflicts"] == others, unit
        # Each pair ordered exactly once: a stop of one precedes the start of the other.
        assert [u for u in worker["after"] if u in group] == [u for u in others if u < unit]
    assert "conflicts" not in services["sglang-s"]


def test_the_router_gets_each_group_and_an_upstream_idle_timeout_below_the_idle_timeout() -> None:
    config = native()
    config["services"]["llmhop"]["llama-cpp"]["models"]["plain"] = {"port": 18003}
    routes = config_file(evaluate(config))["models"]
    assert {name: route.get("group") for name, route in routes.items()} == {
        "a": "gpu",
        "b": "gpu",
        "v": "gpu",
        "s": None,
        "plain": None,
    }
    # Half the idle timeout, at most 30 s; nothing for a model that is always on.
    assert {name: route.get("upstreamIdleTimeout") for name, route in routes.items()} == {
        "a": 1,
        "b": 1,
        "v": 30,
        "s": 30,
        "plain": None,
    }
    # One of the user's own, below the idle timeout, wins.
    config["services"]["llmhop"]["settings"] = {"models": {"s": {"upstreamIdleTimeout": 120}}}
    assert config_file(evaluate(config))["models"]["s"]["upstreamIdleTimeout"] == 120


def test_registries_hold_the_proxies_and_worker_ports() -> None:
    registries = evaluate(native())["registries"]
    assert registries["unitsRegistry"]["llama-cpp.models.a.onDemand"] == "llama-cpp-a-proxy.service"
    assert registries["portsRegistry"]["sglang.models.s.onDemand.workerPort"] == 30101
    assert registries["portsRegistry"]["sglang.models.s"] == 30001
    # A worker port is claimed like any other.
    config = native()
    config["services"]["llmhop"]["sglang"]["models"]["s"]["onDemand"]["workerPort"] = 18002
    assert assertions(config) == [
        "services.llmhop: port 18002 is claimed more than once, by llama-cpp.models.b,"
        " sglang.models.s.onDemand.workerPort."
    ]


# --- containers -------------------------------------------------------------------------------


def test_rootless_containers_get_socket_and_proxy_in_their_users_manager() -> None:
    result = evaluate(containers(rootless=True))
    assert "vllm-x-proxy" not in result["sockets"]
    user = result["units"]["user"]
    socket = user["files"]["vllm-x-proxy.socket"]
    assert "ListenStream=/run/llmhop/vllm-x/http.sock\n" in socket
    assert "ConditionUser=60602\n" in socket
    assert "Service=vllm-x-proxy.service\n" in socket
    assert "SocketGroup" not in socket
    assert user["links"]["sockets.target.wants/vllm-x-proxy.socket"] == "vllm-x-proxy.socket"
    assert "ListenStream=127.0.0.1:20002\n" in user["files"]["vllm-y-proxy.socket"]
    proxy = result["userServices"]["vllm-x-proxy"]
    assert proxy["bindsTo"] == proxy["after"] == ["vllm-x.service"]
    assert proxy["unitConfig"] == {"ConditionUser": "60602"}
    assert "User" not in proxy["serviceConfig"]
    assert proxy["serviceConfig"]["ExecStart"].endswith(
        '"--exit-idle-time=2s" "--connections-max=256" "/run/llmhop/vllm-x/worker/http.sock"'
    )
    # The container: not started at boot, stopped when unneeded, its peer conflicting.
    assert "wantedBy" not in result["userServices"]["vllm-x"]
    x = container(result, "vllm-x")
    assert x["Unit"]["StopWhenUnneeded"] == ["true"]
    assert x["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert x["Service"]["Restart"] == ["no"]
    assert x["Unit"]["Conflicts"] == ["vllm-y.service"]
    assert "vllm-x.service" in container(result, "vllm-y")["Unit"]["After"]
    assert "/run/llmhop/vllm-x/worker:/run/llmhop/socket:U" in x["Container"]["Volume"]
    assert x["Service"]["ExecStartPre"][-1].endswith(
        "podman unshare rm -f /run/llmhop/vllm-x/worker/http.sock"
    )
    # The port model's server is on a socket behind the proxy, not published.
    y = container(result, "vllm-y")
    assert "PublishPort" not in y["Container"]
    assert "/run/llmhop/vllm-y/worker:/run/llmhop/socket:U" in y["Container"]["Volume"]
    # The user's manager cannot create directories below /run: tmpfiles does, and the router
    # reaches the sockets through the ACL on the socket root, as it does today's.
    rules = result["tmpfiles"]["rules"]
    for directory in ("vllm-x", "vllm-x/worker", "vllm-y", "vllm-y/worker"):
        assert f"d /run/llmhop/{directory} 0710 vllm vllm - -" in rules
    assert "default:user:llmhop:-wx" in str(result["tmpfiles"]["settings"])


def test_rootful_containers_get_system_units() -> None:
    result = evaluate(containers(rootless=False))
    assert "vllm-x-proxy" not in result["userServices"]
    assert result["sockets"]["vllm-x-proxy"]["listenStreams"] == ["/run/llmhop/vllm-x/http.sock"]
    assert "SocketGroup" not in result["sockets"]["vllm-x-proxy"]["socketConfig"]
    proxy = service(result, "vllm-x-proxy")
    assert proxy["User"] == "llmhop" and proxy["SupplementaryGroups"] == []
    x = container(result, "vllm-x")
    assert x["Service"]["RuntimeDirectory"] == ["llmhop/vllm-x/worker"]
    assert x["Unit"]["Conflicts"] == ["vllm-y.service"]
    assert "wantedBy" not in result["services"]["vllm-x"]


# --- assertions -------------------------------------------------------------------------------


def llama_cpp(models: dict[str, Any], **router: Any) -> dict[str, Any]:
    return {"services": {"llmhop": {"enable": True, **router, "llama-cpp": {"models": models}}}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param(
            llama_cpp({"z": {"port": 0, "onDemand": ON_DEMAND}}),
            "services.llmhop.llama-cpp.models.z: on demand, it needs a unix socket or a fixed port"
            " for the proxy's socket unit to own, not port 0.",
            id="port-0",
        ),
        pytest.param(
            {
                "services": {
                    "llmhop": {
                        "enable": True,
                        "sglang": {
                            "models": {"s": {"port": 30001, "model": "m", "onDemand": ON_DEMAND}}
                        },
                    }
                }
            },
            "services.llmhop.sglang.models.s.onDemand.workerPort must be set: the server serves"
            " no unix socket, so behind the proxy it needs a loopback port of its own.",
            id="sglang-worker-port",
        ),
        pytest.param(
            llama_cpp(
                {"a": {"onDemand": {"enable": True, "idleTimeout": "1min"}}},
                settings={"models": {"a": {"upstreamIdleTimeout": 60}}},
            ),
            "services.llmhop.llama-cpp.models.a.onDemand.idleTimeout (1min) must be longer than"
            " the router's upstreamIdleTimeout for a (60 s): its pooled connections would keep"
            " the server loaded.",
            id="idle-timeout",
        ),
        pytest.param(
            {"services": {"llmhop": {"llama-cpp": {"models": {"a": {"onDemand": ON_DEMAND}}}}}},
            "services.llmhop.llama-cpp.models.a: on demand, it needs services.llmhop.enable: its"
            " proxy runs as the router's user.",
            id="router-off",
        ),
        pytest.param(
            llama_cpp({"a": {"onDemand": ON_DEMAND, "group": "g"}, "b": {"group": "g"}}),
            "services.llmhop: every model of group g must be on demand (onDemand.enable), or it"
            " could never be swapped out: llama-cpp.models.b is not.",
            id="always-on-member",
        ),
        pytest.param(
            {
                "services": {
                    "llmhop": {
                        "enable": True,
                        "llama-cpp": {"models": {"a": {"onDemand": ON_DEMAND, "group": "g"}}},
                        "vllm": {
                            "models": {"v": {"model": "m", "onDemand": ON_DEMAND, "group": "g"}}
                        },
                    }
                }
            },
            "services.llmhop: the workers of group g run in the system manager and the user"
            " manager of vllm, but Conflicts= works within one: run them all natively or rootful,"
            " or as containers of one user (llama-cpp.models.a, vllm.models.v).",
            id="two-managers",
        ),
        pytest.param(
            {
                "services": {
                    "llmhop": {
                        "enable": True,
                        "sglang": {
                            "models": {
                                "s": {
                                    "port": 30001,
                                    "model": "m",
                                    "onDemand": {"enable": True, "workerPort": 30101},
                                }
                            },
                            "gateway": {"enable": True, "port": 30000},
                        },
                    }
                }
            },
            "services.llmhop.sglang.gateway: the models s are on demand, which the gateway's"
            " Requires= and health checks would keep loaded; turn it off or run them always on.",
            id="gateway",
        ),
        pytest.param(
            llama_cpp({"a" * 80: {"onDemand": ON_DEMAND}}, socketDirectory="/run/" + "d" * 10),
            f"services.llmhop.llama-cpp.models.{'a' * 80}: the server's socket behind the proxy,"
            f" /run/{'d' * 10}/llama-cpp-{'a' * 80}/worker/http.sock, is longer than 107 bytes;"
            " shorten the name or services.llmhop.socketDirectory.",
            id="socket-length",
        ),
    ],
)
def test_assertions(config: dict[str, Any], message: str) -> None:
    assert message in [" ".join(m.split()) for m in assertions(config)]


def test_an_idle_timeout_that_is_no_time_span_is_refused() -> None:
    from nix_harness import NixEvalError

    with pytest.raises(NixEvalError, match=r"onDemand\.idleTimeout"):
        evaluate(llama_cpp({"a": {"onDemand": {"enable": True, "idleTimeout": "soon"}}}))


# --- local users ------------------------------------------------------------------------------


def tcp_member_warning(option_path: str, group: str, port: int) -> str:
    return (
        f"{option_path} is in group {group} and listens on 127.0.0.1:{port}: any local user can"
        " connect there past the router's keys, start it and so stop the other models of"
        f" {group} mid-request. Leave port null for a unix socket, or set"
        " onDemand.trustLocalUsers = true."
    )


def test_a_group_member_on_a_tcp_port_is_warned_about() -> None:
    # a and v are on unix sockets; s is on a port but in no group.
    assert warnings(native()) == [
        tcp_member_warning("services.llmhop.llama-cpp.models.b", "gpu", 18002)
    ]
    member = tcp_member_warning("services.llmhop.vllm.models.y", "gpu", 20002)
    for rootless in (True, False):
        assert warnings(containers(rootless=rootless)) == [member]


def test_trusting_local_users_silences_the_warning() -> None:
    config = native()
    b = config["services"]["llmhop"]["llama-cpp"]["models"]["b"]
    b["onDemand"] = {**ON_DEMAND, "trustLocalUsers": True}
    assert warnings(config) == []


# --- systemd-analyze --------------------------------------------------------------------------


@pytest.mark.systemd
@pytest.mark.usefixtures("systemd_analyze")
def test_units_verify(tmp_path: Path) -> None:
    config = native()
    config["services"]["llmhop"]["sglang"]["package"] = stand_in(tmp_path, "sglang", "python")
    units = render_units(config, tmp_path)
    names = [
        f"{worker}{suffix}"
        for worker in ("llama-cpp-a", "llama-cpp-b", "vllm-v", "sglang-s")
        for suffix in (".service", "-proxy.service", "-proxy.socket")
    ]
    result = analyze_verify(units, names)
    assert result.clean, result.stderr
    # The host's systemd-socket-proxyd is what ExecStart= runs: a missing one is caught.
    proxy = units / "llama-cpp-a-proxy.service"
    text = proxy.read_text()
    assert "/usr/lib/systemd/systemd-socket-proxyd" in text
    proxy.write_text(text.replace("systemd-socket-proxyd", "no-such-proxyd"))
    assert not analyze_verify(units, ["llama-cpp-a-proxy.service"]).clean


# --- the documented example -------------------------------------------------------------------


def test_the_docs_show_the_example_and_it_evaluates() -> None:
    example = REPO / "examples" / "nixos" / "on-demand.nix"
    text = (REPO / "docs" / "module.md").read_text()
    marker = "<!-- example: examples/nixos/on-demand.nix -->\n```nix\n"
    start = text.index(marker) + len(marker)
    assert text[start : text.index("\n```", start)] == example.read_text().rstrip("\n")
    result = evaluate(module=example)
    assert result["warnings"] == []
    routes = config_file(result)["models"]
    assert routes["qwen3-coder"] == {
        "url": "unix:///run/llmhop/llama-cpp-qwen3-coder/http.sock",
        "group": "gpu0",
        "upstreamIdleTimeout": 30,
    }
    assert routes["gemma-3-27b"]["group"] == "gpu0"
    assert routes["embed"] == {"url": "unix:///run/llmhop/llama-cpp-embed/http.sock", **WATCHED}
    services = result["services"]
    assert services["llama-cpp-embed"]["wantedBy"] == ["multi-user.target"]
    assert services["llama-cpp-gemma-3-27b"]["conflicts"] == ["llama-cpp-qwen3-coder.service"]
    assert argv(result, "llama-cpp-qwen3-coder-proxy")[1] == "--exit-idle-time=15min"
    assert argv(result, "llama-cpp-gemma-3-27b-proxy")[1] == "--exit-idle-time=10min"
    assert sorted(result["sockets"]) == [
        "llama-cpp-gemma-3-27b-proxy",
        "llama-cpp-qwen3-coder-proxy",
        "llmhop-default",
    ]
    # The message the docs quote, for a group member that is always on.
    shown = (
        "services.llmhop: every model of group gpu0 must be on demand (onDemand.enable), or it"
        " could never be swapped out: llama-cpp.models.embed is not."
    )
    assert shown in " ".join(text.split())
    embed = {"services": {"llmhop": {"llama-cpp": {"models": {"embed": {"group": "gpu0"}}}}}}
    with pytest.raises(FailedAssertions) as refused:
        evaluate(embed, module=example)
    assert refused.value.messages == [shown]
    # The warning the docs quote, for a member given a port.
    gemma = {"services": {"llmhop": {"llama-cpp": {"models": {"gemma-3-27b": {"port": 18002}}}}}}
    [warned] = evaluate(gemma, module=example)["warnings"]
    assert " ".join(warned.split()) in " ".join(text.split())


@pytest.mark.parametrize(
    ("cap", "connections"), [(8, 256), (128, 256), (129, 258), (1000, 2000), (0, 65536)]
)
def test_the_proxy_carries_what_the_router_lets_in(cap: int, connections: int) -> None:
    config = native()
    config["services"]["llmhop"]["settings"] = {"maxConcurrentRequests": cap}
    result = evaluate(config)
    for proxy in ("llama-cpp-a-proxy", "sglang-s-proxy"):
        assert f"--connections-max={connections}" in argv(result, proxy)
        # Two sockets and two pipes per connection.
        assert service(result, proxy)["LimitNOFILE"] >= 6 * connections
