"""The router module (modules/nixos/router.nix), option by option: listeners, identity,
credentials, settings and the config file, hardening; rendered units and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from module_configs import assertions, config_file, llmhop, service
from nix_harness import HERE, NixEvalError, evaluate, locked_store_path

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


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


@pytest.mark.parametrize(
    "route",
    [{"unlisted": True}, {"url": "http://127.0.0.1:1", "urls": ["http://127.0.0.1:2"]}],
    ids=["neither", "both"],
)
def test_a_route_needs_a_url_or_urls(route: dict[str, Any]) -> None:
    assert assertions(llmhop(settings={"models": {"m": route}})) == [
        "services.llmhop.settings.models.m: set exactly one of url and urls."
    ]


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
