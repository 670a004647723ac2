"""services.llmhop option by option: rendered units, users, tmpfiles, registries, rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nix_harness import HERE, FailedAssertions, NixEvalError, evaluate, locked_store_path

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


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


def assertions(config: dict[str, Any]) -> list[str]:
    with pytest.raises(FailedAssertions) as info:
        evaluate(config)
    return info.value.messages


# --- the router: listeners ------------------------------------------------------------------


def test_unix_socket_default_listener() -> None:
    result = evaluate(llmhop(port=None, socketGroup="caddy"))
    socket = result["sockets"]["llmhop-default"]
    assert socket["listenStreams"] == ["/run/llmhop/default.sock"]
    assert socket["socketConfig"] == {
        "Service": "llmhop.service",
        "SocketUser": "root",
        "SocketGroup": "caddy",
        "SocketMode": "0660",
        "RemoveOnStop": True,
    }
    assert result["registries"]["portsRegistry"] == {}


def test_extra_listeners_and_firewall() -> None:
    result = evaluate(
        llmhop(
            host="::1",
            openFirewall=True,
            listen={
                "caddy": {"socketGroup": "caddy", "socketMode": "0600"},
                "lan": {"host": "192.0.2.1", "port": 8081},
            },
        )
    )
    sockets = result["sockets"]
    assert sockets["llmhop-default"]["listenStreams"] == ["[::1]:8080"]
    assert sockets["llmhop-lan"]["listenStreams"] == ["192.0.2.1:8081"]
    assert sockets["llmhop-caddy"]["listenStreams"] == ["/run/llmhop/caddy.sock"]
    assert sockets["llmhop-caddy"]["socketConfig"]["SocketMode"] == "0600"
    assert "SocketUser" not in sockets["llmhop-lan"]["socketConfig"]
    assert sorted(service(result)["Sockets"]) == [
        "llmhop-caddy.socket",
        "llmhop-default.socket",
        "llmhop-lan.socket",
    ]
    assert sorted(result["firewall"]["allowedTCPPorts"]) == [8080, 8081]
    assert result["registries"]["portsRegistry"] == {
        "llmhop.listen.default": 8080,
        "llmhop.listen.lan": 8081,
    }
    links = result["units"]["system"]["links"]
    assert links["sockets.target.wants/llmhop-caddy.socket"] == "llmhop-caddy.socket"


def test_firewall_closed_by_default() -> None:
    assert evaluate(llmhop())["firewall"]["allowedTCPPorts"] == []


def test_socket_directory() -> None:
    result = evaluate(llmhop(socketDirectory="/run/sockets/llmhop", port=None))
    assert result["tmpfiles"]["rules"] == ["d /run/sockets/llmhop 0711 root root - -"]
    assert result["sockets"]["llmhop-default"]["listenStreams"] == [
        "/run/sockets/llmhop/default.sock"
    ]
    # No RuntimeDirectory=: stopping the router must not delete the workers' sockets.
    assert "RuntimeDirectory" not in service(result)


@pytest.mark.parametrize("directory", ["/var/lib/llmhop", "/run/../etc", "/run", "/run/.x"])
def test_unsafe_socket_directory_is_rejected(directory: str) -> None:
    with pytest.raises(NixEvalError, match=r"services\.llmhop\.socketDirectory.*not of type"):
        evaluate(llmhop(socketDirectory=directory))


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ({"default": {}}, 'services.llmhop.listen."default": listener names must match'),
        ({"a/b": {}}, 'services.llmhop.listen."a/b": listener names must match'),
        (
            {"lan": {"host": "localhost", "port": 1}},
            'services.llmhop.listen.lan.host must be empty or an IP literal, not "localhost".',
        ),
        ({"x": {"socket": "/run/" + "x" * 110}}, "is longer than 107 bytes"),
    ],
    ids=["default", "slash", "host", "long-socket"],
)
def test_bad_listeners_are_rejected(listen: dict[str, Any], message: str) -> None:
    messages = assertions(llmhop(listen=listen))
    assert any(message in m for m in messages), messages


def test_a_host_name_for_the_default_listener_is_rejected() -> None:
    assert assertions(llmhop(host="localhost")) == [
        'services.llmhop.host must be empty or an IP literal, not "localhost".'
    ]


# --- the router: identity ---------------------------------------------------------------------


def test_default_identity_is_declared() -> None:
    result = evaluate(llmhop(uid=990))
    assert result["users"]["llmhop"]["uid"] == 990
    assert result["users"]["llmhop"]["group"] == "llmhop"
    assert result["groups"]["llmhop"]["gid"] == 990
    assert service(result)["User"] == "llmhop"
    assert (
        "SupplementaryGroups" not in service(result) or service(result)["SupplementaryGroups"] == []
    )


def test_custom_identity_is_not_declared() -> None:
    result = evaluate(llmhop(user="hop", group="hoppers", supplementaryGroups=["a", "a", "b"]))
    assert result["users"] == {}
    assert result["groups"] == {}
    config = service(result)
    assert (config["User"], config["Group"]) == ("hop", "hoppers")
    assert config["SupplementaryGroups"] == ["a", "b"]


# --- the router: credentials --------------------------------------------------------------------


def test_credentials_three_forms() -> None:
    credentials = {
        "llmhop.client-token": {},
        "openai": "/run/secrets/openai",
        "sealed": {"source": "/etc/credstore.encrypted/sealed", "encrypted": True},
    }
    config = llmhop(credentials=credentials)
    config["systemd"] = {
        "services": {"llmhop": {"serviceConfig": {"LoadCredential": ["manual:/run/manual"]}}}
    }
    result = service(evaluate(config))
    assert result["LoadCredential"] == ["manual:/run/manual", "openai:/run/secrets/openai"]
    assert result["LoadCredentialEncrypted"] == ["sealed:/etc/credstore.encrypted/sealed"]
    assert result["ImportCredential"] == ["llmhop.client-token"]


def test_store_path_credential_is_rejected() -> None:
    # A file in the store (as "${./secret}" would be): world-readable, so refused.
    in_store = str(locked_store_path("quadlet-nix") / "flake.nix")
    for credential in (in_store, {"source": in_store}, "relative/path"):
        with pytest.raises(NixEvalError) as info:
            evaluate(llmhop(credentials={"key": credential}))
        assert "services.llmhop.credentials.key.source' is not of type" in info.value.stderr
        assert "absolute path not in the Nix store" in info.value.stderr


def test_invalid_credential_name_is_rejected() -> None:
    assert assertions(llmhop(credentials={"tls/key": "/run/secrets/tls"})) == [
        'services.llmhop.credentials."tls/key": a credential name is one path component'
        " matching [[:alnum:]_][[:alnum:]_.-]{0,254}."
    ]


# --- the router: settings, config file, reload -----------------------------------------------


def test_settings_defaults_and_freeform_keys() -> None:
    written = config_file(evaluate(llmhop(settings={"authTokens": ["${cred:t}"]})))
    assert written == {
        "authTokens": ["${cred:t}"],
        "connectTimeout": 30,
        "maxBodyBytes": 104857600,
        "maxConcurrentRequests": 8,
        "metricsAuth": True,
        "models": {},
        "shutdownTimeout": 30,
    }


@pytest.mark.parametrize(
    ("settings", "metrics_auth"),
    [({}, False), ({"authTokens": ["${cred:t}"], "metricsAuth": False}, False)],
)
def test_metrics_need_a_token_exactly_when_auth_is_on(
    settings: dict[str, object], metrics_auth: bool
) -> None:
    assert config_file(evaluate(llmhop(settings=settings)))["metricsAuth"] is metrics_auth


def test_settings_are_typed() -> None:
    with pytest.raises(NixEvalError, match=r"services\.llmhop\.settings\.maxConcurrentRequests"):
        evaluate(llmhop(settings={"maxConcurrentRequests": -1}))


def test_a_route_needs_a_url() -> None:
    with pytest.raises(NixEvalError, match=r"settings\.models\.m\.url.*(used|accessed)"):
        evaluate(llmhop(settings={"models": {"m": {"unlisted": True}}}))


def test_shutdown_timeout_sets_the_stop_timeout() -> None:
    assert service(evaluate(llmhop()))["TimeoutStopSec"] == 40
    result = evaluate(llmhop(settings={"shutdownTimeout": 299.5}))
    assert service(result)["TimeoutStopSec"] == 310


def test_config_changes_reload_the_router() -> None:
    result = evaluate(llmhop())
    unit = result["units"]["system"]["files"]["llmhop.service"]
    source = result["etc"]["llmhop/llmhop.json"]["source"]
    assert f"X-Reload-Triggers={source}\n" in unit
    assert "ExecStart=" in unit and source not in service(result)["ExecStart"]
    assert service(result)["ExecReload"].endswith("/bin/kill -HUP $MAINPID")


def test_config_is_checked_at_build_time() -> None:
    check = evaluate(llmhop())["etc"]["llmhop/llmhop.json"]["checkPhase"]
    assert check.strip().endswith('/bin/llmhop --check --config "$target"')


def test_config_check_is_skipped_when_cross_compiling(tmp_path: Path) -> None:
    module = tmp_path / "cross.nix"
    module.write_text(
        "{ lib, ... }:\n"
        "let stub = import " + str(HERE / "stub-pkgs.nix") + " { inherit lib; }; in {\n"
        "  _module.args.pkgs = lib.mkForce (stub // {\n"
        '    stdenv = stub.stdenv // { hostPlatform = lib.systems.elaborate "aarch64-linux"; };\n'
        "  });\n"
        "  services.llmhop.enable = true;\n"
        "}\n"
    )
    assert evaluate(module=module)["etc"]["llmhop/llmhop.json"]["checkPhase"] == ""


def test_listener_settings_warn() -> None:
    result = evaluate(llmhop(settings={"port": 9000}))
    assert "are ignored" in result["warnings"][0]


def test_router_hardening() -> None:
    config = service(evaluate(llmhop()))
    for key, value in {
        "CapabilityBoundingSet": "",
        "PrivateUsers": True,
        "PrivateDevices": True,
        "ProtectClock": True,
        "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": True,
        "SocketBindDeny": "any",
        "UMask": "0077",
    }.items():
        assert config[key] == value, key
    assert config["SystemCallFilter"] == ["@system-service", "~@privileged", "~@resources"]


# --- llama.cpp workers ------------------------------------------------------------------------


QUICKSTART = {
    "qwen3-8b": {"port": 18001, "settings": {"hf-repo": "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL"}}
}


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
        "--port",
        "18001",
    ]
    config = service(result, "llama-cpp-qwen3-8b")
    assert config["SocketBindAllow"] == "tcp:18001"
    assert config["UMask"] == "0077"
    assert "RuntimeDirectory" not in config
    assert config_file(result)["models"] == {"qwen3-8b": {"url": "http://127.0.0.1:18001"}}
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
    assert (unit["startLimitBurst"], unit["startLimitIntervalSec"]) == (3, 3600)
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
    assert "User" not in config
    args = argv(result, "llama-cpp-m")
    assert args[1:3] == ["-url", "unix:///run/llmhop/llama-cpp-m/http.sock"]
    assert args[-4:] == ["--alias", "m", "--host", "/run/llmhop/llama-cpp-m/http.sock"]
    assert config_file(result)["models"]["m"] == {"url": "unix:///run/llmhop/llama-cpp-m/http.sock"}
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
        "--port",
        "18002",
        "--threads",
        "4",
    ]
    assert config_file(result)["models"] == {"served": {"url": "http://127.0.0.1:18002"}}


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
            "unitConfig": {"ConditionPathExists": "/dev/dri"},
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
    assert unit["unitConfig"] == {"ConditionPathExists": "/dev/dri"}


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
        },
    }
