"""Rendered unit files: NixOS-like rendering, systemd-analyze verify and security."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nix_harness import analyze_security, analyze_verify, evaluate, mk_force, render_units

pytestmark = [
    pytest.mark.nix,
    pytest.mark.systemd,
    pytest.mark.usefixtures("nix_inputs", "systemd_analyze"),
]

ROUTER_UNITS = ["llmhop.service", "llmhop-default.socket"]
# The exposure scores the units must not exceed (systemd-analyze 252: 0 best, 10 worst); the
# router's is 1.1 with or without the group of socket workers (docs/module.md).
MAX_EXPOSURE = 1.1
MAX_EXPOSURE_WITH_WORKERS = 1.1
MAX_WORKER_EXPOSURE = 1.2


def with_workers() -> dict[str, Any]:
    """The router with two listeners and credentials, llama.cpp on a socket and on a port."""
    return {
        "services": {
            "llmhop": {
                "enable": True,
                "listen": {"local": {"socketGroup": "nogroup"}},
                # Not `{ }` (ImportCredential=): systemd 252 here predates it (254).
                "credentials": {"token": "/run/secrets/token"},
                "llama-cpp": {
                    "enable": True,
                    "models": {
                        "sock": {
                            "credentials": {"key": "/run/secrets/key"},
                            "settings": {"api-key-file": "${cred:key}"},
                        },
                        "tcp": {"port": 18001, "serviceConfig": {"MemoryMax": "8G"}},
                    },
                },
            }
        }
    }


WORKER_UNITS = [
    *ROUTER_UNITS,
    "llmhop-local.socket",
    "llama-cpp-sock.service",
    "llama-cpp-tcp.service",
]


def router(**service_config: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"services": {"llmhop": {"enable": True}}}
    if service_config:
        config["systemd"] = {"services": {"llmhop": {"serviceConfig": service_config}}}
    return config


# --- the renderer -----------------------------------------------------------------------


def test_rendering_like_nixos(tmp_path: Path) -> None:
    module = tmp_path / "units.nix"
    module.write_text(
        """{
  systemd.services.demo = {
    description = "demo";
    after = [ "a.service" "b.service" ];
    wantedBy = [ "multi-user.target" ];
    aliases = [ "demo-alias.service" ];
    environment.GREETING = "hello world";
    path = [ ];
    serviceConfig = {
      ExecStart = "/bin/true";
      PrivateTmp = true;
      ProtectHome = false;
      BindReadOnlyPaths = [ "/a" "/b" ];
      SupplementaryGroups = [ ];
      RestartSec = 5;
    };
  };
  systemd.services.nightly = {
    script = "echo hi";
    startAt = "daily";
  };
  systemd.services.extra = {
    overrideStrategy = "asDropin";
    serviceConfig.TimeoutStartSec = 60;
  };
}
"""
    )
    units = evaluate(module=module)["units"]["system"]
    demo = units["files"]["demo.service"]
    assert demo.startswith("[Unit]\nAfter=a.service b.service\nDescription=demo\n\n[Service]\n")
    assert 'Environment="GREETING=hello world"\n' in demo
    assert "PrivateTmp=true\n" in demo
    assert "ProtectHome=false\n" in demo
    assert "BindReadOnlyPaths=/a\nBindReadOnlyPaths=/b\n" in demo
    assert "SupplementaryGroups" not in demo
    assert "RestartSec=5\n" in demo
    assert "[Install]" not in demo
    assert units["links"]["multi-user.target.wants/demo.service"] == "demo.service"
    assert units["links"]["demo-alias.service"] == "demo.service"
    assert "ExecStart=/nix/store/" in units["files"]["nightly.service"]
    assert "[Timer]\nOnCalendar=daily\n" in units["files"]["nightly.timer"]
    assert units["links"]["timers.target.wants/nightly.timer"] == "nightly.timer"
    assert "TimeoutStartSec=60\n" in units["files"]["extra.service.d/overrides.conf"]


def test_router_unit_text(scratch: Path) -> None:
    text = (render_units(router(), scratch) / "llmhop.service").read_text()
    assert "Type=notify\n" in text
    assert "RestrictAddressFamilies=AF_INET\nRestrictAddressFamilies=AF_INET6\n" in text
    assert "CapabilityBoundingSet=\n" in text
    assert "NoNewPrivileges=true\n" in text
    socket = (scratch / "units" / "llmhop-default.socket").read_text()
    assert "[Socket]\nListenStream=8080\nService=llmhop.service\n" in socket


# --- systemd-analyze --------------------------------------------------------------------


def test_router_units_verify(scratch: Path) -> None:
    result = analyze_verify(render_units(router(), scratch), ROUTER_UNITS)
    assert result.clean, result.stderr


def test_router_exposure(scratch: Path, record_property: pytest.RecordProperty) -> None:
    score, report = analyze_security(render_units(router(), scratch), "llmhop.service")
    record_property("llmhop.service exposure", score)
    print(f"systemd-analyze security: llmhop.service exposure {score}")
    assert score <= MAX_EXPOSURE, report


def test_worker_units_verify(scratch: Path) -> None:
    result = analyze_verify(render_units(with_workers(), scratch), WORKER_UNITS)
    assert result.clean, result.stderr


def test_exposure_with_workers(scratch: Path, record_property: pytest.RecordProperty) -> None:
    units = render_units(with_workers(), scratch)
    scores = {unit: analyze_security(units, unit)[0] for unit in WORKER_UNITS if ".service" in unit}
    record_property("exposure", scores)
    print(f"systemd-analyze security: {scores}")
    assert scores["llmhop.service"] <= MAX_EXPOSURE_WITH_WORKERS
    assert scores["llama-cpp-sock.service"] <= MAX_WORKER_EXPOSURE
    assert scores["llama-cpp-tcp.service"] <= MAX_WORKER_EXPOSURE


def test_weaker_hardening_scores_worse(scratch: Path) -> None:
    """The score reacts to the unit: the check is not vacuous."""
    hardened, _ = analyze_security(render_units(router(), scratch), "llmhop.service")
    weakened = _force(PrivateUsers=False, ProtectSystem=False, PrivateDevices=False)
    weak, _ = analyze_security(render_units(weakened, scratch / "weak"), "llmhop.service")
    assert weak > hardened


def _force(**service_config: Any) -> dict[str, Any]:
    config = router()
    config["systemd"] = {
        "services": {
            "llmhop": {"serviceConfig": {k: mk_force(v) for k, v in service_config.items()}}
        }
    }
    return config


@pytest.mark.parametrize(
    ("service_config", "complaint"),
    [
        ({"ProtectSytem": "strict"}, "Unknown key 'ProtectSytem'"),
        ({"RestrictAddressFamilies": ["AF_NOPE"]}, "AF_NOPE"),
        ({"ExecStartPre": "/nonexistent/bin/prepare"}, "/nonexistent/bin/prepare"),
    ],
    ids=["unknown-key", "bad-value", "missing-program"],
)
def test_a_wrong_unit_fails_verify(
    scratch: Path, service_config: dict[str, Any], complaint: str
) -> None:
    result = analyze_verify(render_units(router(**service_config), scratch), ROUTER_UNITS)
    assert not result.clean
    assert complaint in result.stderr
