"""The llama.cpp backend natively (modules/nixos/llama-cpp.nix), and through it what every
backend's models share (modules/framework): units, flags, credentials, environment, GPU
switch, users and refusals."""

from __future__ import annotations

import pytest
from module_configs import (
    QUICKSTART,
    WATCHED,
    argv,
    assertions,
    config_file,
    llama,
    llmhop,
    service,
)
from nix_harness import NixEvalError, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def test_the_quickstart_llama_model() -> None:
    result = evaluate(llama(QUICKSTART))
    args = argv(result, "llama-cpp-qwen3-8b")
    assert args[0].endswith("-llmhop/bin/llmhop-notify")
    assert args[1:6] == ["-url", "http://127.0.0.1:18001", "-health-path", "/health", "--"]
    assert args[6].endswith("-llama-cpp/bin/llama-server")
    assert args[7:] == [
        "--alias",
        "qwen3-8b",
        "--hf-repo",
        "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL",
        "--host",
        "127.0.0.1",
        "--metrics",
        "--port",
        "18001",
    ]
    config = service(result, "llama-cpp-qwen3-8b")
    assert config["SocketBindAllow"] == "tcp:18001"
    assert config["UMask"] == "0077"
    assert "RuntimeDirectory" not in config
    assert config_file(result)["models"] == {
        "qwen3-8b": {"url": "http://127.0.0.1:18001", **WATCHED}
    }
    assert result["registries"]["portsRegistry"]["llama-cpp.models.qwen3-8b"] == 18001
    assert result["registries"]["unitsRegistry"]["llama-cpp.models.qwen3-8b"] == (
        "llama-cpp-qwen3-8b.service"
    )
    # A TCP worker needs no shared group with the router.
    assert service(result).get("SupplementaryGroups", []) == []


def test_worker_unit() -> None:
    result = evaluate(llama({"m": {}}, openFilesLimit=4096))
    unit = result["services"]["llama-cpp-m"]
    config = unit["serviceConfig"]
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["after"] == ["network-online.target"]
    assert unit["unitConfig"] == {"StartLimitBurst": 3, "StartLimitIntervalSec": 3600}
    assert unit["environment"] == {"LLAMA_CACHE": "/var/cache/llama-cpp/m"}
    expected = {
        "Type": "notify",
        "KillMode": "mixed",
        "KillSignal": "SIGINT",
        "SuccessExitStatus": 130,
        "Restart": "on-failure",
        "RestartSec": 30,
        "TimeoutStartSec": 3600,
        "TasksMax": 4096,
        "LimitNOFILE": 4096,
        "DynamicUser": True,
        "Group": "llama-cpp",
        "CacheDirectory": "llama-cpp/m",
        "StateDirectory": "llama-cpp/m",
        "WorkingDirectory": "/var/lib/llama-cpp/m",
        "RuntimeDirectory": "llmhop/llama-cpp-m",
        "RuntimeDirectoryMode": "0710",
        "UMask": "0007",
        "SocketBindDeny": "any",
        "PrivateDevices": True,
        "PrivateUsers": True,
        "MemoryDenyWriteExecute": True,
        "ProtectSystem": "strict",
    }
    assert {k: config.get(k) for k in expected} == expected
    assert config["User"] == "llama-cpp-m"  # the dynamic user, named after the model
    args = argv(result, "llama-cpp-m")
    assert args[1:3] == ["-url", "unix:///run/llmhop/llama-cpp-m/http.sock"]
    assert args[-5:] == ["--alias", "m", "--host", "/run/llmhop/llama-cpp-m/http.sock", "--metrics"]
    assert config_file(result)["models"]["m"] == {
        "url": "unix:///run/llmhop/llama-cpp-m/http.sock",
        **WATCHED,
    }
    # The router joins the group owning the sockets; the group is declared.
    assert service(result)["SupplementaryGroups"] == ["llama-cpp"]
    assert "llama-cpp" in result["groups"]
    assert "llama-cpp" not in result["users"]


def test_named_user_and_group() -> None:
    result = evaluate(llama({"m": {}}, user="llama", group="gpu-llm"))
    config = service(result, "llama-cpp-m")
    assert (config["User"], config["Group"]) == ("llama", "gpu-llm")
    assert "DynamicUser" not in config
    assert "llama" not in result["users"]
    assert "gpu-llm" not in result["groups"]
    assert service(result)["SupplementaryGroups"] == ["gpu-llm"]


def test_custom_socket_directory_for_workers() -> None:
    config = llama({"m": {}})
    config["services"]["llmhop"]["socketDirectory"] = "/run/sockets/llmhop"
    result = evaluate(config)
    assert service(result, "llama-cpp-m")["RuntimeDirectory"] == "sockets/llmhop/llama-cpp-m"
    assert argv(result, "llama-cpp-m")[2] == "unix:///run/sockets/llmhop/llama-cpp-m/http.sock"


def test_flag_precedence_managed_over_settings_over_model_settings() -> None:
    models = {
        "m": {
            "name": "served",
            "port": 18002,
            "settings": {"ctx-size": 4096, "alias": "mine", "port": 1, "flash-attn": False},
        }
    }
    result = evaluate(llama(models, modelSettings={"ctx-size": 8192, "threads": 4, "lora": ["a"]}))
    args = argv(result, "llama-cpp-served")[6:]
    assert args[1:] == [
        "--alias",
        "served",
        "--ctx-size",
        "4096",
        "--no-flash-attn",
        "--host",
        "127.0.0.1",
        "--lora",
        "a",
        "--metrics",
        "--port",
        "18002",
        "--threads",
        "4",
    ]
    assert config_file(result)["models"] == {"served": {"url": "http://127.0.0.1:18002", **WATCHED}}


def test_credential_references_become_paths() -> None:
    models = {
        "m": {
            "credentials": {"api-keys": "/run/secrets/keys", "hf": {}},
            "settings": {"api-key-file": "${cred:api-keys}", "hf-token-file": "${cred:hf}"},
        }
    }
    result = evaluate(llama(models))
    exec_start = service(result, "llama-cpp-m")["ExecStart"]
    assert '"--api-key-file" "%d/api-keys"' in exec_start
    assert '"--hf-token-file" "%d/hf"' in exec_start
    assert "%%d" not in exec_start
    config = service(result, "llama-cpp-m")
    assert config["LoadCredential"] == ["api-keys:/run/secrets/keys"]
    assert config["ImportCredential"] == ["hf"]


def test_unknown_credential_reference_is_rejected() -> None:
    models = {"m": {"credentials": {"a": "/run/a"}, "settings": {"x": "${cred:missing}"}}}
    assert assertions(llama(models)) == [
        "services.llmhop.llama-cpp.models.m.settings: ${cred:missing} names no credential"
        " of this model (it has: a)."
    ]


def test_backend_credentials_are_not_inherited_through_model_settings() -> None:
    messages = assertions(llama({"m": {}}, modelSettings={"api-key-file": "${cred:k}"}))
    assert "${cred:k} names no credential" in messages[0]


def test_invalid_model_credential_name_is_rejected() -> None:
    messages = assertions(llama({"m": {"credentials": {"a/b": "/run/a"}}}))
    assert messages == [
        'services.llmhop.llama-cpp.models.m.credentials."a/b": a credential name is one path'
        " component matching [[:alnum:]_][[:alnum:]_.-]{0,254}."
    ]


def test_environment_layers() -> None:
    models = {
        "m": {
            "environment": {"B": "model", "C": "model"},
            "environmentFile": "/run/secrets/m.env",
        }
    }
    result = evaluate(
        llama(
            models,
            environment={"A": "backend", "B": "backend", "LLAMA_CACHE": "/srv/cache"},
            environmentFile="/run/secrets/all.env",
        )
    )
    assert result["services"]["llama-cpp-m"]["environment"] == {
        "A": "backend",
        "B": "model",
        "C": "model",
        "LLAMA_CACHE": "/srv/cache",
    }
    assert service(result, "llama-cpp-m")["EnvironmentFile"] == [
        "/run/secrets/all.env",
        "/run/secrets/m.env",
    ]


def test_service_and_unit_config_escape_hatches() -> None:
    models = {
        "m": {
            "credentials": {"k": "/run/k"},
            "serviceConfig": {
                "MemoryMax": "24G",
                "RestartSec": 5,
                "RuntimeDirectoryMode": "0750",
                "LoadCredential": ["manual:/run/manual"],
                "Type": "simple",
                "ExecStart": "/bin/false",
                "KillMode": "process",
            },
            "unitConfig": {"ConditionPathExists": "/dev/dri", "StartLimitBurst": 5},
        }
    }
    result = evaluate(llama(models))
    unit = result["services"]["llama-cpp-m"]
    config = unit["serviceConfig"]
    assert (config["MemoryMax"], config["RestartSec"], config["RuntimeDirectoryMode"]) == (
        "24G",
        5,
        "0750",
    )
    assert config["LoadCredential"] == ["manual:/run/manual", "k:/run/k"]
    # The module keeps what makes readiness and stopping work.
    assert (config["Type"], config["KillMode"]) == ("notify", "mixed")
    assert "llmhop-notify" in config["ExecStart"]
    assert unit["unitConfig"] == {
        "ConditionPathExists": "/dev/dri",
        "StartLimitBurst": 5,
        "StartLimitIntervalSec": 3600,
    }


def test_gpu_switch() -> None:
    result = evaluate(llama({"g": {"gpu": True}, "c": {}}))
    gpu, cpu = service(result, "llama-cpp-g"), service(result, "llama-cpp-c")
    assert {k: gpu[k] for k in ("PrivateDevices", "PrivateUsers", "ProcSubset")} == {
        "PrivateDevices": False,
        "PrivateUsers": "identity",
        "ProcSubset": "all",
    }
    assert gpu["SupplementaryGroups"] == ["render", "video"]
    assert gpu["MemoryDenyWriteExecute"] is False
    assert gpu["LimitMEMLOCK"] == "infinity"
    assert gpu["ProtectClock"] is False
    env = result["services"]["llama-cpp-g"]["environment"]
    assert env["TRITON_CACHE_DIR"] == "/var/cache/llama-cpp/g/triton"
    assert env["SYCL_CACHE_PERSISTENT"] == "1"
    assert cpu["PrivateDevices"] is True
    assert "LimitMEMLOCK" not in cpu
    assert "TRITON_CACHE_DIR" not in result["services"]["llama-cpp-c"]["environment"]


def test_disabled_models_and_backends_write_nothing() -> None:
    result = evaluate(llama({"on": {}, "off": {"enable": False}}))
    assert "llama-cpp-on" in result["services"]
    assert "llama-cpp-off" not in result["services"]
    assert "off" not in config_file(result)["models"]
    config = llmhop()
    config["services"]["llmhop"]["llama-cpp"] = {"enable": False, "models": {"m": {}}}
    result = evaluate(config)
    assert "llama-cpp-m" not in result["services"]
    assert "llama-cpp" not in result["groups"]


def test_workers_run_without_the_router() -> None:
    result = evaluate(llama(QUICKSTART, router=False))
    assert "llama-cpp-qwen3-8b" in result["services"]
    assert "llmhop" not in result["services"]


def test_the_socket_is_read_only() -> None:
    with pytest.raises(NixEvalError, match=r"models\.m\.socket.*read-only"):
        evaluate(llama({"m": {"socket": "/run/elsewhere.sock"}}))


def test_model_names_are_validated() -> None:
    with pytest.raises(NixEvalError, match=r"models\.\"a/b\"\.name.*not of type"):
        evaluate(llama({"a/b": {}}))


def test_long_socket_path_is_rejected() -> None:
    messages = assertions(llama({"m" * 90: {}}))
    assert any("is longer than 107 bytes" in m for m in messages), messages
