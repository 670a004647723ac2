"""Module evaluation: our modules + the real quadlet-nix module + NixOS option stubs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nix_harness import FailedAssertions, NixEvalError, evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def router(**options: Any) -> dict[str, Any]:
    return {"services": {"llmhop": {"enable": True, **options}}}


def test_disabled_module_writes_nothing() -> None:
    result = evaluate({})
    assert result["services"] == {}
    assert result["sockets"] == {}
    assert result["users"] == {}
    assert result["units"]["system"]["files"] == {}


def test_router_units() -> None:
    result = evaluate(router())
    service = result["services"]["llmhop"]
    config = service["serviceConfig"]
    assert config["Type"] == "notify"
    assert config["Sockets"] == ["llmhop-default.socket"]
    assert config["SocketBindDeny"] == "any"
    assert config["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert config["User"] == config["Group"] == "llmhop"
    assert config["ExecReload"].endswith("/bin/kill -HUP $MAINPID")
    assert service["wantedBy"] == ["multi-user.target"]
    socket = result["sockets"]["llmhop-default"]
    assert socket["listenStreams"] == ["8080"]
    assert socket["socketConfig"] == {"Service": "llmhop.service"}
    assert socket["wantedBy"] == ["sockets.target"]
    assert result["users"]["llmhop"]["isSystemUser"] is True
    assert "llmhop" in result["groups"]


def test_settings_become_the_config_file() -> None:
    settings = {"models": {"m": {"url": "http://127.0.0.1:18001"}}, "authTokens": ["t"]}
    result = evaluate(router(settings=settings))
    exec_start = result["services"]["llmhop"]["serviceConfig"]["ExecStart"]
    program, flag, path = exec_start.split()
    assert program.endswith("-llmhop/bin/llmhop")
    assert flag == "--config"
    # A stable path, so a new config means a reload, not a restart.
    assert path == "/etc/llmhop/llmhop.json"
    source = result["etc"]["llmhop/llmhop.json"]["source"]
    # The stub pkgs writes text files to the store for real (builtins.toFile).
    written = json.loads(Path(source).read_text())
    assert {k: written[k] for k in settings} == settings


def test_package_override_is_used() -> None:
    result = evaluate(router(), pkgs={"llmhop": "/opt/fake-llmhop"})
    exec_start = result["services"]["llmhop"]["serviceConfig"]["ExecStart"]
    assert exec_start == "/opt/fake-llmhop/bin/llmhop --config /etc/llmhop/llmhop.json"


@pytest.mark.parametrize(
    ("host", "stream"),
    [("", "8080"), ("127.0.0.1", "127.0.0.1:8080"), ("::1", "[::1]:8080")],
)
def test_listen_stream(host: str, stream: str) -> None:
    result = evaluate(router(host=host))
    assert result["sockets"]["llmhop-default"]["listenStreams"] == [stream]


def test_config_from_a_nix_file(tmp_path: Path) -> None:
    module = tmp_path / "config.nix"
    module.write_text(
        "{ lib, ... }: {\n"
        "  services.llmhop = { enable = true; port = 9001; };\n"
        '  systemd.services.llmhop.serviceConfig.Restart = lib.mkForce "always";\n'
        "}\n"
    )
    result = evaluate(module=module)
    assert result["sockets"]["llmhop-default"]["listenStreams"] == ["9001"]
    assert result["services"]["llmhop"]["serviceConfig"]["Restart"] == "always"


# --- NixOS-like merging ------------------------------------------------------------------


def test_lists_concatenate() -> None:
    config = router()
    config["systemd"] = {
        "services": {
            "llmhop": {
                "after": ["extra.service"],
                "serviceConfig": {"SystemCallFilter": ["~@mount"]},
            }
        }
    }
    service = evaluate(config)["services"]["llmhop"]
    assert sorted(service["after"]) == ["extra.service", "network-online.target"]
    assert sorted(service["serviceConfig"]["SystemCallFilter"]) == [
        "@system-service",
        "~@mount",
        "~@privileged",
        "~@resources",
    ]


def test_equal_scalars_merge() -> None:
    config = router()
    config["systemd"] = {"services": {"llmhop": {"serviceConfig": {"Type": "notify"}}}}
    assert evaluate(config)["services"]["llmhop"]["serviceConfig"]["Type"] == "notify"


def test_conflicting_scalars_are_an_error() -> None:
    config = router()
    config["systemd"] = {"services": {"llmhop": {"serviceConfig": {"Type": "simple"}}}}
    with pytest.raises(NixEvalError, match="conflicting definition values"):
        evaluate(config)


def test_mk_force_wins(tmp_path: Path) -> None:
    module = tmp_path / "force.nix"
    module.write_text(
        "{ lib, ... }: {\n"
        "  services.llmhop.enable = true;\n"
        '  systemd.services.llmhop.serviceConfig.Type = lib.mkForce "simple";\n'
        "  systemd.services.llmhop.wantedBy = lib.mkForce [ ];\n"
        "}\n"
    )
    result = evaluate(module=module)
    assert result["services"]["llmhop"]["serviceConfig"]["Type"] == "simple"
    assert "multi-user.target.wants/llmhop.service" not in result["units"]["system"]["links"]


# --- errors and assertions ---------------------------------------------------------------


def test_type_error_is_caught() -> None:
    with pytest.raises(NixEvalError, match=r"services\.llmhop\.port"):
        evaluate(router(port=70000))


def test_unknown_option_is_caught() -> None:
    with pytest.raises(NixEvalError, match=r"services\.llmhop\.no-such-option.*does not exist"):
        evaluate(router(**{"no-such-option": True}))


def test_violated_assertion_is_caught() -> None:
    with pytest.raises(FailedAssertions) as info:
        evaluate(router(host="localhost"))
    assert info.value.messages == [
        'services.llmhop.host must be empty or an IP literal, not "localhost".'
    ]
    # The evaluation itself is still there to inspect.
    assert info.value.result["sockets"]["llmhop-default"]["listenStreams"] == ["localhost:8080"]


def test_assertions_can_be_returned_instead() -> None:
    result = evaluate(router(host="example"), check_assertions=False)
    assert len(result["assertions"]) == 1


def test_warning() -> None:
    result = evaluate(router(settings={"listen": ":9000"}))
    assert len(result["warnings"]) == 1
    assert "settings.{host,port,listen} are ignored" in result["warnings"][0]


# --- the real quadlet-nix module ---------------------------------------------------------


def test_quadlet_is_inert_by_default() -> None:
    result = evaluate(router())
    assert result["quadlet"] == {}
    assert result["userServices"] == {}


def test_quadlet_container() -> None:
    config: dict[str, Any] = {
        "virtualisation": {
            "quadlet": {
                "enable": True,
                "containers": {
                    "demo": {
                        "containerConfig": {"Image": "docker.io/library/busybox:latest"},
                        "serviceConfig": {"TimeoutStartSec": 60},
                    }
                },
            }
        }
    }
    result = evaluate(config)
    text = result["quadlet"]["demo"]
    assert "[Container]\nImage=docker.io/library/busybox:latest\n" in text
    assert "TimeoutStartSec=60" in text
    # quadlet-nix installs the generated unit with a NixOS drop-in for wantedBy.
    demo = result["services"]["demo"]
    assert demo["overrideStrategy"] == "asDropin"
    assert demo["wantedBy"] == ["multi-user.target"]
    assert "demo.service.d/overrides.conf" in result["units"]["system"]["files"]


def test_quadlet_assertion_is_caught() -> None:
    config = {
        "virtualisation": {
            "quadlet": {
                "enable": True,
                "containers": {"same": {"containerConfig": {"Image": "a"}}},
                "pods": {"same": {}},
            }
        }
    }
    with pytest.raises(FailedAssertions) as info:
        evaluate(config)
    assert any("names should be unique" in m for m in info.value.messages)
