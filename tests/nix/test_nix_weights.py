"""Declared weights, evaluated: one fetch unit per model (`llmhop-fetch-<name>`), every worker
of the model requiring it and running offline on the local snapshot, for each backend and
runtime; the assertions and warnings of `weights`."""

from __future__ import annotations

from typing import Any

import pytest
from module_configs import argv, assertions, container, llmhop, warnings
from nix_harness import NixEvalError, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GGUF = "Qwen3-8B-Q4_K_M.gguf"
FETCH = "llmhop-fetch-m"


def hub(repo: str = "org/m", revision: str = COMMIT, **more: Any) -> dict[str, Any]:
    return {"huggingface": {"repo": repo, "revision": revision, **more}}


def gguf(**more: Any) -> dict[str, Any]:
    return hub("org/m-GGUF", files=[GGUF, "*.md"], **more)


def fetch_argv(result: dict[str, Any], unit: str = FETCH) -> list[str]:
    return argv(result, unit)[2:]


def test_llama_cpp_replicas_share_one_fetch_unit_and_run_offline() -> None:
    result = evaluate(
        llmhop(**{"llama-cpp": {"models": {"m": {"weights": gguf(), "replicas": [{}, {}]}}}})
    )
    fetches = [name for name in result["services"] if name.startswith("llmhop-fetch-")]
    assert fetches == [FETCH]
    unit = result["services"][FETCH]
    config = unit["serviceConfig"]
    assert config["Type"] == "oneshot" and config["RemainAfterExit"] is True
    assert config["TimeoutStartSec"] == "infinity"
    assert (config["Restart"], config["RestartPreventExitStatus"]) == ("on-failure", 2)
    # The harness' systemd is older than 254: a fixed delay, no steps.
    assert config["RestartSec"] == 60 and "RestartSteps" not in config
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["after"] == unit["wants"] == ["network-online.target"]
    assert unit["startLimitIntervalSec"] == 0
    assert config["ProtectSystem"] == "strict" and config["CapabilityBoundingSet"] == ""
    cache = "/var/cache/llama-cpp/m/hub"
    assert fetch_argv(result) == [
        "--repo", "org/m-GGUF", "--revision", COMMIT, "--cache-dir", cache, "--name", "m",
        "--include", GGUF, "--include", "*.md",
    ]  # fmt: skip
    snapshot = f"{cache}/models--org--m-GGUF/snapshots/{COMMIT}"
    for index in (0, 1):
        worker = result["services"][f"llama-cpp-m-{index}"]
        assert worker["requires"] == [f"{FETCH}.service"]
        assert f"{FETCH}.service" in worker["after"]
        assert worker["environment"]["HF_HUB_OFFLINE"] == "1"
        args = argv(result, f"llama-cpp-m-{index}")
        assert args[args.index("--model") + 1] == f"{snapshot}/{GGUF}"
        # The worker's user and cache: the files the fetch writes are the worker's.
        for key in ("User", "DynamicUser", "Group", "CacheDirectory"):
            assert config[key] == worker["serviceConfig"][key], key


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_native_python_workers_serve_the_snapshot(backend: str) -> None:
    model = {"weights": hub(), "port": 30001, "runtime": "native"}
    options = {"models": {"m": model}} | (
        {"package": "/opt/sglang-env"} if backend == "sglang" else {}
    )
    result = evaluate(llmhop(**{backend: options}))
    worker = result["services"][f"{backend}-m"]
    cache = worker["environment"]["HF_HUB_CACHE"]
    assert cache == f"/var/cache/{backend}/m/hub"
    args = argv(result, f"{backend}-m")
    served = (
        args[args.index("serve") + 1] if backend == "vllm" else args[args.index("--model-path") + 1]
    )
    assert served == f"{cache}/models--org--m/snapshots/{COMMIT}"
    assert worker["environment"]["HF_HUB_OFFLINE"] == "1"
    assert worker["requires"] == [f"{FETCH}.service"]
    fetch = result["services"][FETCH]["serviceConfig"]
    assert (fetch["User"], fetch["Group"], fetch["CacheDirectory"]) == (
        backend,
        backend,
        f"{backend}/m",
    )
    assert fetch_argv(result)[4:6] == ["--cache-dir", cache]
    # No `--include`: every file of the repository.
    assert "--include" not in fetch_argv(result)


def test_a_rootless_container_mounts_the_repository_read_only() -> None:
    result = evaluate(llmhop(vllm={"models": {"m": {"weights": hub(), "devices": []}}}))
    unit = container(result, "vllm-m")
    assert unit["Container"]["Exec"][0].startswith(f"/run/llmhop/weights/snapshots/{COMMIT} ")
    assert (
        "/var/cache/vllm/hub/models--org--m:/run/llmhop/weights:ro" in unit["Container"]["Volume"]
    )
    assert "HF_HUB_OFFLINE=1" in " ".join(unit["Container"]["Environment"])
    # Its manager, not the container, waits: a user unit cannot require a system unit.
    assert "Requires" not in unit["Unit"]
    manager = result["services"]["user@60602"]
    assert manager["wants"] == manager["after"] == [f"{FETCH}.service"]
    fetch = result["services"][FETCH]["serviceConfig"]
    assert (fetch["User"], fetch["ReadWritePaths"]) == ("vllm", ["/var/cache/vllm"])
    assert fetch_argv(result)[4:6] == ["--cache-dir", "/var/cache/vllm/hub"]


def test_a_rootful_container_requires_its_fetch_unit() -> None:
    model = {"weights": gguf(), "runtime": "container", "port": 18001}
    result = evaluate(llmhop(**{"llama-cpp": {"models": {"m": model}, "quadlet": {"user": None}}}))
    unit = container(result, "llama-cpp-m")
    assert unit["Unit"]["Requires"] == [f"{FETCH}.service"]
    assert f"{FETCH}.service" in unit["Unit"]["After"][0].split()
    assert f"--model=/run/llmhop/weights/snapshots/{COMMIT}/{GGUF}" in unit["Container"]["Exec"][0]
    assert result["services"][FETCH]["serviceConfig"]["User"] == "root"
    assert not any(name.startswith("user@") for name in result["services"])


def test_an_on_demand_model_is_fetched_at_boot() -> None:
    model = {"weights": gguf(), "onDemand": {"enable": True}}
    result = evaluate(llmhop(**{"llama-cpp": {"models": {"m": model}}}))
    worker = result["services"]["llama-cpp-m"]
    assert "wantedBy" not in worker
    assert worker["requires"] == [f"{FETCH}.service"]
    assert result["services"][FETCH]["wantedBy"] == ["multi-user.target"]


def test_weights_on_disk_need_no_fetch() -> None:
    models = {
        "m": {"weights": {"path": "/srv/models/m.gguf"}},
        "c": {"weights": {"path": "/srv/models/c.gguf"}, "runtime": "container", "port": 18002},
    }
    result = evaluate(llmhop(**{"llama-cpp": {"models": models}}))
    assert not any(name.startswith("llmhop-fetch-") for name in result["services"])
    worker = result["services"]["llama-cpp-m"]
    assert "requires" not in worker and worker["environment"]["HF_HUB_OFFLINE"] == "1"
    args = argv(result, "llama-cpp-m")
    assert args[args.index("--model") + 1] == "/srv/models/m.gguf"
    unit = container(result, "llama-cpp-c")
    assert "/srv/models/c.gguf:/run/llmhop/weights/c.gguf:ro" in unit["Container"]["Volume"]
    assert "--model=/run/llmhop/weights/c.gguf" in unit["Container"]["Exec"][0]


def test_tokens_and_pruning() -> None:
    models = {
        "m": {"weights": hub() | {"tokenCredential": "/run/secrets/hf-token", "prune": True}},
        "n": {"weights": hub(revision="a" * 40) | {"tokenCredential": "hf-token"}},
    }
    result = evaluate(llmhop(vllm={"models": models, "runtime": "container", "devices": []}))
    m = result["services"][FETCH]["serviceConfig"]
    assert m["LoadCredential"] == ["huggingface-token:/run/secrets/hf-token"]
    args = fetch_argv(result)
    assert args[args.index("--token-file") + 1] == "%d/huggingface-token"
    # The containers share the backend's cache: the other model's revision is kept.
    assert args[args.index("--prune") :] == ["--prune", "--keep", COMMIT, "--keep", "a" * 40]
    n = result["services"]["llmhop-fetch-n"]["serviceConfig"]
    assert n["ImportCredential"] == ["hf-token"]
    assert "--prune" not in fetch_argv(result, "llmhop-fetch-n")
    # Only the fetch units get the token.
    assert "LoadCredential" not in " ".join(result["quadlet"]["vllm-m"].splitlines())


def test_a_branch_warns_and_is_served_through_the_fetched_link() -> None:
    config = llmhop(**{"llama-cpp": {"models": {"m": {"weights": gguf(revision="main")}}}})
    assert warnings(config) == [
        'services.llmhop.llama-cpp.models.m.weights.huggingface.revision = "main" is a branch or'
        " tag, not a commit: the model may change under you at the next fetch. Pin the commit"
        ' (40 hex digits, as the repository\'s "Files and versions" page shows it).'
    ]
    args = argv(evaluate(config), "llama-cpp-m")
    cache = "/var/cache/llama-cpp/m/hub/models--org--m-GGUF"
    assert args[args.index("--model") + 1] == f"{cache}/llmhop/m/{GGUF}"


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (
            gguf() | {"path": "/srv/m"},
            "services.llmhop.llama-cpp.models.m.weights: set either huggingface or path, not both.",
        ),
        (
            {"path": "/srv/m", "prune": True},
            "services.llmhop.llama-cpp.models.m.weights: tokenCredential and prune apply to"
            " weights.huggingface, which is not set.",
        ),
        (
            hub(files=["*Q4_K_M.gguf"]),
            "services.llmhop.llama-cpp.models.m.weights.huggingface.files: the server loads one"
            ' file, so the first entry must name it without a pattern (e.g. "Qwen3-8B-Q4_K_M.gguf";'
            " further entries may be patterns).",
        ),
        (
            hub(),
            "services.llmhop.llama-cpp.models.m.weights.huggingface.files: the server loads one"
            ' file, so the first entry must name it without a pattern (e.g. "Qwen3-8B-Q4_K_M.gguf";'
            " further entries may be patterns).",
        ),
    ],
)
def test_weights_assertions(weights: dict[str, Any], message: str) -> None:
    assert assertions(llmhop(**{"llama-cpp": {"models": {"m": {"weights": weights}}}})) == [message]


def test_a_token_in_the_store_is_refused() -> None:
    weights = hub() | {"tokenCredential": f"/nix/store/{'0' * 32}-token"}
    with pytest.raises(NixEvalError, match="tokenCredential"):
        evaluate(llmhop(vllm={"models": {"m": {"weights": weights}}}))
