"""Replicas: several units of one model (one per GPU, say), each on its own port or socket,
all registered under the model's name as the router's `urls`; and routes to other hosts
written as `settings.models.<name>.urls`."""

from __future__ import annotations

from typing import Any

import pytest
from module_configs import (
    WATCHED,
    argv,
    assertions,
    config_file,
    container,
    llama,
    llmhop,
    router_check,
    service,
)
from nix_harness import REPO, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

TWO_GPUS = [{"gpus": ["0"]}, {"gpus": ["1"]}]


def backend(name: str, models: dict[str, Any], **options: Any) -> dict[str, Any]:
    config = llmhop()
    config["services"]["llmhop"][name] = {"models": models, **options}
    return config


def test_two_gpus_two_native_units_behind_one_route() -> None:
    result = evaluate(llama({"q": {"port": 18001, "gpu": True, "replicas": TWO_GPUS}}))
    assert "llama-cpp-q" not in result["services"]
    for index, port in ((0, 18001), (1, 18002)):
        unit = f"llama-cpp-q-{index}"
        environment = result["services"][unit]["environment"]
        assert environment["CUDA_VISIBLE_DEVICES"] == str(index)
        # Numbered as nvidia-smi and CDI number them.
        assert environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        args = argv(result, unit)
        assert args[1:3] == ["-url", f"http://127.0.0.1:{port}"]
        assert args[-5:] == ["--host", "127.0.0.1", "--metrics", "--port", str(port)]
        # One model: the same served name and cache for every replica.
        assert args[args.index("--alias") + 1] == "q"
        assert service(result, unit)["SocketBindAllow"] == f"tcp:{port}"
        assert service(result, unit)["CacheDirectory"] == "llama-cpp/q"
    assert config_file(result)["models"] == {
        "q": {"urls": ["http://127.0.0.1:18001", "http://127.0.0.1:18002"], **WATCHED}
    }
    registries = result["registries"]
    assert registries["portsRegistry"] == {
        "llama-cpp.models.q.replicas.0": 18001,
        "llama-cpp.models.q.replicas.1": 18002,
        "llmhop.listen.default": 8080,
    }
    assert registries["unitsRegistry"]["llama-cpp.models.q.replicas.1"] == "llama-cpp-q-1.service"
    assert registries["modelsRegistry"]["llama-cpp.models.q"]["route"] == {
        "urls": ["http://127.0.0.1:18001", "http://127.0.0.1:18002"],
        **WATCHED,
    }
    check = router_check(result)
    assert check.returncode == 0, check.stderr


def test_socket_replicas_and_their_own_ports() -> None:
    replicas = [{}, {"port": 18050, "environment": {"HIP_VISIBLE_DEVICES": "1"}}]
    result = evaluate(llama({"s": {"replicas": replicas}}))
    first = service(result, "llama-cpp-s-0")
    assert first["RuntimeDirectory"] == "llmhop/llama-cpp-s-0"
    assert argv(result, "llama-cpp-s-0")[-3:-1] == ["--host", "/run/llmhop/llama-cpp-s-0/http.sock"]
    second = service(result, "llama-cpp-s-1")
    assert "RuntimeDirectory" not in second
    assert second["SocketBindAllow"] == "tcp:18050"
    assert result["services"]["llama-cpp-s-1"]["environment"]["HIP_VISIBLE_DEVICES"] == "1"
    assert config_file(result)["models"]["s"] == {
        "urls": ["unix:///run/llmhop/llama-cpp-s-0/http.sock", "http://127.0.0.1:18050"],
        **WATCHED,
    }
    # The router joins the group owning the replica's socket directory.
    assert service(result)["SupplementaryGroups"] == ["llama-cpp"]


@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "rootful"])
def test_container_replicas_get_their_cdi_devices(rootless: bool) -> None:
    user = {} if rootless else {"quadlet": {"user": None}}
    models = {
        "v": {"port": 20001, "model": "org/v", "replicas": TWO_GPUS},
        "s": {"model": "org/s", "replicas": [{"devices": ["amd.com/gpu=3"]}, {}]},
    }
    result = evaluate(backend("vllm", models, devices=["nvidia.com/gpu=all"], **user))
    for index in (0, 1):
        unit = container(result, f"vllm-v-{index}")["Container"]
        assert unit["AddDevice"] == [f"nvidia.com/gpu={index}"]
        assert unit["PublishPort"] == [f"127.0.0.1:{20001 + index}:8000"]
        # Inside, the container sees its one GPU as device 0: no CUDA_VISIBLE_DEVICES.
        assert not any("CUDA_VISIBLE_DEVICES" in e for e in unit.get("Environment", []))
    assert container(result, "vllm-s-0")["Container"]["AddDevice"] == ["amd.com/gpu=3"]
    assert container(result, "vllm-s-1")["Container"]["AddDevice"] == ["nvidia.com/gpu=all"]
    socket = container(result, "vllm-s-1")["Container"]
    assert "/run/llmhop/vllm-s-1:/run/llmhop/socket:U" in socket["Volume"]
    if rootless:
        assert "d /run/llmhop/vllm-s-1 0710 vllm vllm - -" in result["tmpfiles"]["rules"]
    else:
        assert container(result, "vllm-s-1")["Service"]["RuntimeDirectory"] == ["llmhop/vllm-s-1"]
    assert config_file(result)["models"] == {
        "v": {"urls": ["http://127.0.0.1:20001", "http://127.0.0.1:20002"], **WATCHED},
        "s": {
            "urls": [
                "unix:///run/llmhop/vllm-s-0/http.sock",
                "unix:///run/llmhop/vllm-s-1/http.sock",
            ],
            **WATCHED,
        },
    }
    # Started one after another, replicas included (vLLM's startupOrdering).
    after = [container(result, f"vllm-{u}")["Unit"].get("After") for u in ("s-1", "v-0", "v-1")]
    assert after == [["vllm-s-0.service"], ["vllm-s-1.service"], ["vllm-v-0.service"]]


def test_sglang_replicas_behind_the_gateway() -> None:
    models = {"a": {"port": 30001, "model": "org/a", "replicas": TWO_GPUS}}
    gateway = {"enable": True, "port": 30000}
    result = evaluate(backend("sglang", models, gateway=gateway))
    text = result["quadlet"]["sglang-gateway"]
    assert "--worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002" in text
    assert container(result, "sglang-gateway")["Unit"]["Requires"] == [
        "sglang-a-0.service",
        "sglang-a-1.service",
    ]


def test_native_python_replicas() -> None:
    models = {"n": {"runtime": "native", "model": "org/n", "replicas": TWO_GPUS}}
    result = evaluate(backend("vllm", models))
    for index in (0, 1):
        unit = f"vllm-n-{index}"
        assert result["services"][unit]["environment"]["CUDA_VISIBLE_DEVICES"] == str(index)
        assert f'"--uds" "/run/llmhop/{unit}/http.sock"' in service(result, unit)["ExecStart"]
        assert service(result, unit)["User"] == "vllm"
    assert result["services"]["vllm-n-1"]["after"] == [
        "network-online.target",
        "vllm-n-0.service",
    ]


def test_native_replicas_start_one_after_another() -> None:
    # llama.cpp orders no models natively (startupOrdering off), but a model's replicas share
    # its cache: one downloads, the next starts once it is healthy.
    replicas = [{}, {}, {}]
    result = evaluate(llama({"q": {"replicas": replicas}, "r": {"replicas": replicas}}))
    for model in ("q", "r"):
        after = [result["services"][f"llama-cpp-{model}-{i}"]["after"] for i in range(3)]
        assert after == [
            ["network-online.target"],
            ["network-online.target", f"llama-cpp-{model}-0.service"],
            ["network-online.target", f"llama-cpp-{model}-1.service"],
        ]


def test_gpus_of_a_native_model_without_gpu_are_refused() -> None:
    assert assertions(llama({"q": {"replicas": TWO_GPUS}})) == [
        "services.llmhop.llama-cpp.models.q: a replica has gpus, but the model has gpu = false"
        " and runs natively without any device (PrivateDevices=); set gpu = true."
    ]
    # In a container, gpus are CDI devices whatever `gpu` says.
    result = evaluate(llama({"q": {"runtime": "container", "replicas": TWO_GPUS}}))
    assert "nvidia.com/gpu=1" in result["quadlet"]["llama-cpp-q-1"]


def test_every_replica_is_in_the_collision_checks() -> None:
    models = {
        "q": {"port": 18001, "gpu": True, "replicas": TWO_GPUS},
        "other": {"port": 18002},
        "q-0": {},
    }
    assert sorted(assertions(llama(models))) == [
        "services.llmhop: port 18002 is claimed more than once, by llama-cpp.models.other,"
        " llama-cpp.models.q.replicas.1.",
        "services.llmhop: unit llama-cpp-q-0.service is claimed more than once, by"
        " llama-cpp.models.q-0, llama-cpp.models.q.replicas.0.",
    ]


def test_a_long_replica_socket_is_refused() -> None:
    messages = assertions(llama({"m" * 86: {"replicas": [{}, {}]}}))
    assert messages == [
        f"services.llmhop.llama-cpp.models.{'m' * 86}: the socket"
        f" /run/llmhop/llama-cpp-{'m' * 86}-0/http.sock is longer than 107 bytes; shorten"
        " the name or services.llmhop.socketDirectory.",
        f"services.llmhop.llama-cpp.models.{'m' * 86}: the socket"
        f" /run/llmhop/llama-cpp-{'m' * 86}-1/http.sock is longer than 107 bytes; shorten"
        " the name or services.llmhop.socketDirectory.",
    ]


def test_replica_warnings_are_given_once() -> None:
    models = {"v": {"port": 20001, "model": "org/v", "replicas": [{}, {}]}}
    warnings = evaluate(backend("vllm", models))["warnings"]
    assert len(warnings) == 2, warnings  # no GPU device, an unpinned tag: once each
    assert all(w.startswith("services.llmhop.vllm.models.v") for w in warnings)


def test_replicas_cannot_be_on_demand() -> None:
    on_demand = {"gpu": True, "replicas": TWO_GPUS, "onDemand": {"enable": True}}
    messages = assertions(llama({"q": on_demand}))
    assert messages == [
        "services.llmhop.llama-cpp.models.q: replicas cannot be on demand (each would need a"
        " socket, a proxy and a worker of its own); leave replicas empty or turn onDemand off."
    ]


# --- routes to other hosts --------------------------------------------------------------------


def test_remote_urls_are_written_as_given() -> None:
    urls = [
        "http://192.0.2.2:18001",
        {"url": "https://api.example.com", "headers": {"Authorization": "Bearer ${cred:k}"}},
    ]
    config = llama({"local": {"port": 18001}})
    config["services"]["llmhop"]["settings"] = {
        "models": {"q": {"urls": urls, "affinity": "header:x-conversation"}}
    }
    result = evaluate(config)
    assert config_file(result)["models"] == {
        "local": {"url": "http://127.0.0.1:18001", **WATCHED},
        "q": {"urls": urls, "affinity": "header:x-conversation"},
    }
    assert router_check(result).returncode == 0


def test_hand_written_upstreams_claim_a_replicated_route() -> None:
    config = llama({"q": {"port": 18001, "gpu": True, "replicas": TWO_GPUS}})
    config["services"]["llmhop"]["settings"] = {"models": {"q": {"urls": ["http://192.0.2.2:1"]}}}
    assert assertions(config) == [
        "services.llmhop: routing key q is claimed more than once, by llama-cpp.models.q,"
        " settings.models.q."
    ]
    # Headers alone extend the route of the replicas.
    config["services"]["llmhop"]["settings"] = {"models": {"q": {"headers": {"X-A": "1"}}}}
    assert config_file(evaluate(config))["models"]["q"] == {
        "urls": ["http://127.0.0.1:18001", "http://127.0.0.1:18002"],
        "headers": {"X-A": "1"},
        **WATCHED,
    }


def test_the_two_host_example() -> None:
    """docs/module.md's two hosts: the front host serves one model itself and routes another
    to the routers of two GPU hosts, which run its replicas."""
    examples = REPO / "examples" / "nixos"
    front = evaluate(module=examples / "two-hosts-front.nix")
    assert config_file(front)["models"] == {
        "qwen3-32b": {"urls": ["http://127.0.0.1:20001", "http://127.0.0.1:20002"], **WATCHED},
        "llama-3-70b": {
            "urls": [
                {
                    "url": f"http://10.0.0.{host}:8080",
                    "headers": {"Authorization": "Bearer ${cred:llmhop.gpu-host-token}"},
                }
                for host in (2, 3)
            ]
        },
    }
    assert sorted(front["quadlet"]) == ["vllm-qwen3-32b-0", "vllm-qwen3-32b-1"]
    assert container(front, "vllm-qwen3-32b-1")["Container"]["AddDevice"] == ["nvidia.com/gpu=1"]
    assert front["warnings"] == []
    check = router_check(front)
    assert check.returncode == 0, check.stderr

    gpu = evaluate(module=examples / "two-hosts-gpu.nix")
    assert config_file(gpu)["models"] == {
        "llama-3-70b": {"urls": ["http://127.0.0.1:20001", "http://127.0.0.1:20002"], **WATCHED}
    }
    assert gpu["sockets"]["llmhop-default"]["listenStreams"] == ["8080"]
    assert gpu["firewall"]["allowedTCPPorts"] == [8080]
    devices = [container(gpu, f"vllm-llama-3-70b-{i}")["Container"]["AddDevice"] for i in (0, 1)]
    assert devices == [
        ["nvidia.com/gpu=0", "nvidia.com/gpu=1"],
        ["nvidia.com/gpu=2", "nvidia.com/gpu=3"],
    ]
    assert gpu["warnings"] == []
    check = router_check(gpu)
    assert check.returncode == 0, check.stderr
