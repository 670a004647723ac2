"""The complete example of docs/module.md evaluates and does what the text says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nix_harness import REPO, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

MARKER = "<!-- example: evaluated by tests/nix/test_nix_docs.py -->"
NATIVE = "<!-- native: evaluated by tests/nix/test_nix_docs.py -->"


def example(marker: str = MARKER) -> str:
    text = (REPO / "docs" / "module.md").read_text()
    match = re.search(re.escape(marker) + r"\n```nix\n(.*?)\n```", text, re.DOTALL)
    assert match, f"docs/module.md lost its example {marker}"
    return match.group(1)


def test_the_documented_example(tmp_path: Path) -> None:
    module = tmp_path / "example.nix"
    module.write_text(example())
    result = evaluate(module=module)
    config = json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())
    assert config["models"] == {
        "gemma": {
            "url": "unix:///run/llmhop/llama-cpp-gemma/http.sock",
            "headers": {"Authorization": "Bearer ${cred:llmhop.worker-key}"},
        },
        "openai-gpt-4o": {
            "url": "https://api.openai.com",
            "headers": {"Authorization": "Bearer ${cred:llmhop.openai-key}"},
        },
        "qwen3-8b": {"url": "http://127.0.0.1:18001"},
        "llama-3-8b": {"url": "http://127.0.0.1:20001"},
        "qwen3-32b": {"url": "unix:///run/llmhop/vllm-qwen3-32b/http.sock"},
        "llama-3-70b": {"url": "unix:///run/llmhop/vllm-llama-3-70b/http.sock"},
        "gemma-3-27b": {"url": "http://127.0.0.1:30001"},
        "mistral-small": {"url": "http://127.0.0.1:30002"},
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
    # The native vLLM: a system unit of the same (lingering) user, NCCL for its two GPUs.
    assert "vllm-llama-3-70b" not in result["quadlet"]
    native = result["services"]["vllm-llama-3-70b"]
    exec_start = native["serviceConfig"]["ExecStart"]
    assert native["serviceConfig"]["User"] == "vllm"
    assert '"--tensor-parallel-size" "2"' in exec_start
    assert '"--uds" "/run/llmhop/vllm-llama-3-70b/http.sock"' in exec_start
    assert native["environment"]["NCCL_SOCKET_IFNAME"] == "lo"
    assert result["users"]["vllm"]["linger"] is True
    mistral = result["quadlet"]["sglang-mistral-small"]
    assert "After=sglang-gemma-3-27b.service\n" in mistral
    assert "AddDevice=nvidia.com/gpu=2\n" in mistral
    gateway = result["quadlet"]["sglang-gateway"]
    assert "--worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002" in gateway
    assert "'--policy=cache_aware'" in gateway
    assert result["users"]["sglang"]["linger"] is True


def test_the_documented_native_vllm(tmp_path: Path) -> None:
    module = tmp_path / "native.nix"
    module.write_text(example(NATIVE))
    result = evaluate(module=module)
    assert result["quadlet"] == {}
    unit = result["services"]["vllm-llama-3-8b"]
    assert unit["serviceConfig"]["User"] == "vllm"
    assert '"--uds" "/run/llmhop/vllm-llama-3-8b/http.sock"' in unit["serviceConfig"]["ExecStart"]
    assert unit["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    config = json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())
    assert config["models"] == {
        "llama-3-8b": {"url": "unix:///run/llmhop/vllm-llama-3-8b/http.sock"}
    }
