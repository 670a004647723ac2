"""Configurations and views of evaluated results shared by the module's tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nix_harness import REPO, FailedAssertions, evaluate


def llmhop(**options: Any) -> dict[str, Any]:
    return {"services": {"llmhop": {"enable": True, **options}}}


def llama(models: dict[str, Any], router: bool = True, **options: Any) -> dict[str, Any]:
    config = llmhop() if router else {"services": {"llmhop": {}}}
    config["services"]["llmhop"]["llama-cpp"] = {"enable": True, "models": models, **options}
    return config


def service(result: dict[str, Any], unit: str = "llmhop") -> dict[str, Any]:
    return result["services"][unit]["serviceConfig"]


def argv(result: dict[str, Any], unit: str) -> list[str]:
    """ExecStart= split back into its (JSON-quoted) arguments."""
    return json.loads("[" + service(result, unit)["ExecStart"].replace('" "', '", "') + "]")


def config_file(result: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())


def router_check(result: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """The config file's build-time check, `llmhop --check`, by the real router."""
    path = result["etc"]["llmhop/llmhop.json"]["source"]
    router = REPO / "pkgs" / "llmhop" / "llmhop.py"
    return subprocess.run(
        [sys.executable, "-I", str(router), "--check", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assertions(config: dict[str, Any]) -> list[str]:
    with pytest.raises(FailedAssertions) as info:
        evaluate(config)
    return info.value.messages


DIGEST = "sha256:" + "ab" * 32

# What a route of a worker that is always on gets besides its upstream: the paths the router
# probes and scrapes.
WATCHED = {"healthPath": "/health", "metricsPath": "/metrics"}


def quadlet(text: str) -> dict[str, dict[str, list[str]]]:
    """A Quadlet unit's text as {section: {key: [values]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def container(result: dict[str, Any], name: str) -> dict[str, dict[str, list[str]]]:
    return quadlet(result["quadlet"][name])


def acl_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The module's tmpfiles settings, without the defaults of unset fields."""
    return {
        path: {
            kind: {key: value for key, value in entry.items() if value != "-" and key != "type"}
            for kind, entry in kinds.items()
        }
        for path, kinds in result["tmpfiles"]["settings"].get("llmhop", {}).items()
    }


def warnings(config: dict[str, Any]) -> list[str]:
    return [" ".join(w.split()) for w in evaluate(config)["warnings"]]


# The quickstart's llama.cpp model (examples/nixos/quickstart.nix).
QUICKSTART = {
    "qwen3-8b": {"port": 18001, "settings": {"hf-repo": "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL"}}
}
