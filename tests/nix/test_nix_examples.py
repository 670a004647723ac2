"""The examples of docs/module.md are the files in examples/nixos/ (the flake's `eval` check
evaluates them as NixOS systems), and they evaluate and do what the text says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from module_configs import WATCHED
from nix_harness import REPO, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

EXAMPLES = REPO / "examples" / "nixos"


def shown(name: str) -> str:
    """The block of docs/module.md marked as showing examples/nixos/<name>."""
    text = (REPO / "docs" / "module.md").read_text()
    marker = f": examples/nixos/{name} -->"
    match = re.search(re.escape(marker) + r"\n```nix\n(.*?)\n```", text, re.DOTALL)
    assert match, f"docs/module.md lost its example {name}"
    return match.group(1)


@pytest.mark.parametrize(
    "name",
    [
        "complete.nix",
        "native-vllm.nix",
        "sharing.nix",
        "two-hosts-front.nix",
        "two-hosts-gpu.nix",
    ],
)
def test_the_docs_show_the_example_files(name: str) -> None:
    assert shown(name) == (EXAMPLES / name).read_text().rstrip("\n")


def test_the_docs_show_the_quickstart_block() -> None:
    """The docs show the option block alone; the file wraps it in a module."""
    lines = (EXAMPLES / "quickstart.nix").read_text().splitlines()
    body = lines[lines.index("{") + 1 : lines.index("}")]
    assert shown("quickstart.nix") == "\n".join(line.removeprefix("  ") for line in body)


def test_the_complete_example() -> None:
    result = evaluate(module=EXAMPLES / "complete.nix")
    config = json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())
    assert config["models"] == {
        "gemma": {
            "url": "unix:///run/llmhop/llama-cpp-gemma/http.sock",
            "headers": {"Authorization": "Bearer ${cred:llmhop.worker-key}"},
            **WATCHED,
        },
        "openai-gpt-4o": {
            "url": "https://api.openai.com",
            "headers": {"Authorization": "Bearer ${cred:llmhop.openai-key}"},
        },
        "qwen3-8b": {"url": "http://127.0.0.1:18001", **WATCHED},
        "llama-3-8b": {"url": "http://127.0.0.1:20001", **WATCHED},
        "qwen3-32b": {"url": "unix:///run/llmhop/vllm-qwen3-32b/http.sock", **WATCHED},
        "llama-3-70b": {"url": "unix:///run/llmhop/vllm-llama-3-70b/http.sock", **WATCHED},
        "gemma-3-27b": {"url": "http://127.0.0.1:30001", **WATCHED},
        "mistral-small": {"url": "http://127.0.0.1:30002", **WATCHED},
        # The gateway's: neither (its metrics have a listener of their own).
        "sglang": {"url": "http://127.0.0.1:30000"},
    }
    router = result["services"]["llmhop"]["serviceConfig"]
    assert router["TimeoutStopSec"] == 130
    assert router["ImportCredential"] == ["llmhop.client-token"]
    assert sorted(router["SupplementaryGroups"]) == ["llama-cpp", "vllm"]
    assert result["sockets"]["llmhop-caddy"]["listenStreams"] == ["/run/llmhop/caddy.sock"]
    gemma = result["services"]["llama-cpp-gemma"]["serviceConfig"]
    assert '"--api-key-file" "%d/api-keys"' in gemma["ExecStart"]
    assert '"--ctx-size" "8192"' in gemma["ExecStart"]
    assert gemma["PrivateUsers"] == "identity"
    assert gemma["MemoryMax"] == "24G"
    # vLLM and SGLang: rootless containers of their users; the gateway in front of SGLang.
    qwen = result["quadlet"]["vllm-qwen3-32b"]
    assert "ConditionUser=60602\n" in qwen
    assert "AddDevice=nvidia.com/gpu=1\n" in qwen
    assert "Pull=missing\n" in qwen
    assert "Volume=%d:/run/llmhop/credentials:ro\n" in qwen
    assert "LoadCredential=llmhop.hf-token:/run/secrets/vllm/hf-token\n" in qwen
    assert "Image=docker.io/vllm/vllm-openai:v0.11.0\n" in result["quadlet"]["vllm-llama-3-8b"]
    # The native vLLM: a system unit of the same (lingering) user, NCCL for its four GPUs.
    assert "vllm-llama-3-70b" not in result["quadlet"]
    native = result["services"]["vllm-llama-3-70b"]
    exec_start = native["serviceConfig"]["ExecStart"]
    assert native["serviceConfig"]["User"] == "vllm"
    assert '"--tensor-parallel-size" "4"' in exec_start
    assert '"--uds" "/run/llmhop/vllm-llama-3-70b/http.sock"' in exec_start
    assert native["environment"]["NCCL_SOCKET_IFNAME"] == "lo"
    assert result["users"]["vllm"]["linger"] is True
    mistral = result["quadlet"]["sglang-mistral-small"]
    assert "After=sglang-gemma-3-27b.service\n" in mistral
    assert "AddDevice=nvidia.com/gpu=7\n" in mistral  # its own, replacing the backend's
    gateway = result["quadlet"]["sglang-gateway"]
    assert "--worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002" in gateway
    assert "'--policy=cache_aware'" in gateway
    assert result["users"]["sglang"]["linger"] is True
    # Every image pinned, every GPU container given its device: nothing to warn about.
    assert result["warnings"] == []


def test_the_native_vllm_example() -> None:
    result = evaluate(module=EXAMPLES / "native-vllm.nix")
    assert result["quadlet"] == {}
    unit = result["services"]["vllm-llama-3-8b"]
    assert unit["serviceConfig"]["User"] == "vllm"
    assert '"--uds" "/run/llmhop/vllm-llama-3-8b/http.sock"' in unit["serviceConfig"]["ExecStart"]
    assert unit["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    config = json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())
    assert config["models"] == {
        "llama-3-8b": {"url": "unix:///run/llmhop/vllm-llama-3-8b/http.sock", **WATCHED}
    }


def test_the_sharing_example() -> None:
    result = evaluate(module=EXAMPLES / "sharing.nix")
    path = Path(result["etc"]["llmhop/llmhop.json"]["source"])
    config = json.loads(path.read_text())
    keys = {key["name"]: key for key in config["authTokens"]}
    assert sorted(keys) == ["admin", "chat-ui", "ci", "family"]
    assert keys["chat-ui"]["token"] == "${cred:llmhop.chat-ui-token}"
    assert "models" not in keys["admin"]
    assert keys["family"]["models"] == ["qwen3-8b", "gemma"]
    assert keys["ci"]["maxConcurrentRequests"] == 2
    assert all(len(keys[name]["sha256"]) == 64 for name in ("admin", "family", "ci"))
    assert config["metricsAuth"] is True
    router = result["services"]["llmhop"]["serviceConfig"]
    assert router["LoadCredential"] == ["llmhop.chat-ui-token:/run/secrets/llmhop/chat-ui-token"]
    # The build-time check of the config file, by the real router.
    check = subprocess.run(
        [sys.executable, "-I", str(REPO / "pkgs/llmhop/llmhop.py"), "--check", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
