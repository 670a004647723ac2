"""The SGL Model Gateway (modules/nixos/sglang-gateway.nix): its container in front of the
SGLang workers, its route, TLS, health check, ordering and refusals."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from module_configs import assertions, config_file, container, llmhop
from nix_harness import evaluate

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def gateway(**options: Any) -> dict[str, Any]:
    return llmhop(
        sglang={
            "gateway": {"enable": True, "port": 19000, **options},
            "models": {
                "a": {"port": 30001, "model": "org/a"},
                "b": {"port": 30002, "model": "org/b"},
            },
        }
    )


def test_gateway_in_front_of_the_workers() -> None:
    result = evaluate(gateway())
    unit = container(result, "sglang-gateway")
    c = unit["Container"]
    assert c["Network"] == ["host"]
    assert c["Image"] == ["docker.io/lmsysorg/sgl-model-gateway:latest"]
    assert c["Exec"] == [
        "--enable-igw '--host=127.0.0.1' '--port=19000' '--prometheus-host=127.0.0.1'"
        " '--prometheus-port=29000' --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002"
    ]
    # The gateway's image removes curl after its build; python3 is what it runs.
    assert c["HealthCmd"] == [
        "python3 -c 'import sys, urllib.request;"
        " urllib.request.urlopen(sys.argv[1], timeout=4)' http://127.0.0.1:19000/health"
    ]
    assert c["Notify"] == ["healthy"]
    assert unit["Unit"]["After"] == ["sglang-a.service", "sglang-b.service"]
    assert unit["Unit"]["Requires"] == ["sglang-a.service", "sglang-b.service"]
    assert unit["Unit"]["ConditionUser"] == ["60603"]
    assert unit["Service"]["TimeoutStartSec"] == ["600"]
    assert c["HealthStartPeriod"] == ["600s"]
    registries = result["registries"]
    assert registries["portsRegistry"]["sglang.gateway"] == 19000
    assert registries["portsRegistry"]["sglang.gateway.metrics"] == 29000
    assert registries["unitsRegistry"]["sglang.gateway"] == "sglang-gateway.service"
    assert "sglang.gateway" not in registries["modelsRegistry"]


def test_gateway_route_tls_and_wildcard() -> None:
    result = evaluate(
        gateway(
            route="sglang",
            bindAddress="::",
            enableMetrics=False,
            credentials={"tls.key": "/run/secrets/tls.key"},
            settings={"tls-cert-path": "/etc/ssl/gw.pem", "tls-key-path": "${cred:tls.key}"},
        )
    )
    c = container(result, "sglang-gateway")["Container"]
    assert c["HealthCmd"] == [
        "python3 -c 'import ssl, sys, urllib.request; c = ssl.create_default_context();"
        " c.check_hostname = False; c.verify_mode = ssl.CERT_NONE;"
        " urllib.request.urlopen(sys.argv[1], timeout=4, context=c)' https://[::1]:19000/health"
    ]
    assert "'--tls-key-path=/run/llmhop/credentials/tls.key'" in c["Exec"][0]
    assert "prometheus" not in c["Exec"][0]
    assert c["Volume"] == ["%d:/run/llmhop/credentials:ro"]
    assert config_file(result)["models"]["sglang"] == {"url": "https://[::1]:19000"}
    assert "sglang.gateway.metrics" not in result["registries"]["portsRegistry"]


def test_gateway_port_clash_and_bad_credential_names_are_rejected() -> None:
    messages = assertions(gateway(port=30001))
    assert messages == [
        "services.llmhop: port 30001 is claimed more than once, by sglang.gateway, sglang.models.a."
    ]
    messages = assertions(gateway(credentials={"tls/key": "/run/secrets/tls.key"}))
    assert messages == [
        'services.llmhop.sglang.gateway.credentials."tls/key": a credential name is one path'
        " component matching [[:alnum:]_][[:alnum:]_.-]{0,254}."
    ]


class Health(BaseHTTPRequestHandler):
    """/health answers `status` (of the server); anything else 404."""

    def do_GET(self) -> None:
        status = self.server.status if self.path == "/health" else 404  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def health_server(tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.status = 200  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def probe(command: str) -> int:
    """Run a HealthCmd= as podman does (`/bin/sh -c`), here with the host's python3."""
    return subprocess.run(
        ["/bin/sh", "-c", command], capture_output=True, timeout=30, check=False
    ).returncode


@pytest.mark.parametrize("tls", [False, True])
def test_the_gateway_health_check_runs(tls: bool, tmp_path: Path) -> None:
    """The gateway's probe is python3 (its image has no curl): run it against a server that is
    healthy, then unhealthy, then gone."""
    if shutil.which("python3") is None or (tls and shutil.which("openssl") is None):
        pytest.skip("LOUD SKIP: the probe needs python3 (and openssl for the TLS case) here")
    context = None
    settings: dict[str, Any] = {}
    if tls:
        key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
        openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        subprocess.run(
            [*openssl, "-subj", "/CN=gateway", "-keyout", str(key), "-out", str(cert)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        settings = {"tls-cert-path": str(cert), "tls-key-path": str(key)}
    with health_server(context) as server:
        port = server.server_address[1]
        result = evaluate(gateway(port=port, settings=settings))
        [command] = container(result, "sglang-gateway")["Container"]["HealthCmd"]
        scheme = "https" if tls else "http"
        assert command.endswith(f" {scheme}://127.0.0.1:{port}/health")
        assert probe(command) == 0
        server.status = 503  # type: ignore[attr-defined]
        assert probe(command) != 0
    assert probe(command) != 0


@pytest.mark.parametrize("rootless", [True, False])
def test_gateway_in_front_of_native_workers(rootless: bool) -> None:
    config = gateway()
    sglang = config["services"]["llmhop"]["sglang"]
    sglang["package"] = "/opt/sglang-env"
    sglang["models"]["a"]["runtime"] = "native"
    if not rootless:
        sglang["quadlet"] = {"user": None}
    result = evaluate(config)
    assert "sglang-a" in result["services"]
    unit = container(result, "sglang-gateway")
    workers = "--worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002"
    assert workers in unit["Container"]["Exec"][0]
    # A user manager cannot order itself after a system unit; a rootful gateway can.
    expected = ["sglang-b.service"] if rootless else ["sglang-a.service", "sglang-b.service"]
    assert unit["Unit"]["After"] == expected
    assert unit["Unit"]["Requires"] == expected
    assert ("ConditionUser" in unit["Unit"]) is rootless
