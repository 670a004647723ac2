"""The registries (modules/nixos/registries.nix): ports, units and routing keys claimed
twice fail naming every owner; hand-written routes claim or extend a worker's."""

from __future__ import annotations

import pytest
from module_configs import QUICKSTART, WATCHED, assertions, config_file, llama, llmhop, service
from nix_harness import evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def test_port_claimed_twice() -> None:
    messages = assertions(llama({"a": {"port": 8080}, "b": {"port": 18001}, "c": {"port": 18001}}))
    assert sorted(messages) == [
        "services.llmhop: port 18001 is claimed more than once, by llama-cpp.models.b,"
        " llama-cpp.models.c.",
        "services.llmhop: port 8080 is claimed more than once, by llama-cpp.models.a,"
        " llmhop.listen.default.",
    ]


def test_unit_and_routing_key_claimed_twice() -> None:
    result = evaluate(
        llama({"a": {"name": "same"}, "b": {"name": "same", "port": 18001}}),
        check_assertions=False,
    )
    assert sorted(result["assertions"]) == [
        "services.llmhop: routing key same is claimed more than once, by llama-cpp.models.a,"
        " llama-cpp.models.b.",
        "services.llmhop: unit llama-cpp-same.service is claimed more than once, by"
        " llama-cpp.models.a, llama-cpp.models.b.",
    ]
    # No merge conflict hides the message: the first owner keeps the unit and the route.
    assert "unix://" in config_file(result)["models"]["same"]["url"]
    assert "unix://" in service(result, "llama-cpp-same")["ExecStart"]


def test_hand_written_route_claiming_a_worker_key() -> None:
    config = llama(QUICKSTART)
    config["services"]["llmhop"]["settings"] = {
        "models": {"qwen3-8b": {"url": "https://api.example.com"}}
    }
    assert assertions(config) == [
        "services.llmhop: routing key qwen3-8b is claimed more than once, by"
        " llama-cpp.models.qwen3-8b, settings.models.qwen3-8b."
    ]


def test_hand_written_headers_extend_a_worker_route() -> None:
    config = llama(QUICKSTART)
    config["services"]["llmhop"]["settings"] = {
        "models": {
            "qwen3-8b": {"headers": {"Authorization": "Bearer ${cred:k}"}, "unlisted": True},
            "openai": {"url": "https://api.openai.com"},
        }
    }
    assert config_file(evaluate(config))["models"] == {
        "openai": {"url": "https://api.openai.com"},
        "qwen3-8b": {
            "url": "http://127.0.0.1:18001",
            "headers": {"Authorization": "Bearer ${cred:k}"},
            "unlisted": True,
            **WATCHED,
        },
    }


def test_collisions_across_backends() -> None:
    messages = assertions(
        llmhop(
            vllm={"models": {"m": {"port": 20001, "model": "x"}}},
            sglang={"models": {"m": {"port": 20001, "model": "x"}}},
        )
    )
    assert messages == [
        "services.llmhop: port 20001 is claimed more than once, by sglang.models.m, vllm.models.m.",
        "services.llmhop: routing key m is claimed more than once,"
        " by sglang.models.m, vllm.models.m.",
    ]
