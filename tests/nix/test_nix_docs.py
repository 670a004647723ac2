"""The complete example of docs/module.md evaluates and does what the text says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nix_harness import REPO, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

MARKER = "<!-- example: evaluated by tests/nix/test_nix_docs.py -->"


def example() -> str:
    text = (REPO / "docs" / "module.md").read_text()
    match = re.search(re.escape(MARKER) + r"\n```nix\n(.*?)\n```", text, re.DOTALL)
    assert match, "docs/module.md lost its example"
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
    }
    router = result["services"]["llmhop"]["serviceConfig"]
    assert router["TimeoutStopSec"] == 130
    assert router["ImportCredential"] == ["llmhop.client-token"]
    assert router["SupplementaryGroups"] == ["llama-cpp"]
    assert result["sockets"]["llmhop-caddy"]["listenStreams"] == ["/run/llmhop/caddy.sock"]
    gemma = result["services"]["llama-cpp-gemma"]["serviceConfig"]
    assert '"--api-key-file" "%d/api-keys"' in gemma["ExecStart"]
    assert '"--ctx-size" "8192"' in gemma["ExecStart"]
    assert gemma["PrivateUsers"] == "identity"
    assert gemma["MemoryMax"] == "24G"
