"""Every container file the module renders, through Podman's own Quadlet generator.

quadlet-nix writes the `.container` files and, at build time, runs Podman's generator on them
(`podman-system-generator` for rootful ones, `podman-user-generator` for rootless ones, each
over all of them at once). The generator refuses a file with a key it does not know, and then
no unit exists: these tests run the real generator, built from Podman's source at the version
the locked nixpkgs packages (tests/nix/setup-quadlet.sh), in the same two batches, on the
complete example, on every backend's port and socket models, rootless and rootful, and on the
SGL Model Gateway. A rejected key, any warning, or a missing service fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from module_configs import llmhop
from nix_harness import REPO, evaluate, temp_dir
from quadlet_generator import QUADLET_VERSION, Generated, generate, run_generator

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]

EXAMPLES = REPO / "examples" / "nixos"

# Each configuration, its containers as rootless user units and as rootful system units.
ROOTLESS_AND_ROOTFUL = pytest.mark.parametrize(
    "rootless", [True, False], ids=["rootless", "rootful"]
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = temp_dir("quadlet-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def service(runs: dict[str, Generated], name: str) -> tuple[Generated, str]:
    [run] = [run for run in runs.values() if f"{name}.service" in run.texts]
    return run, f"{name}.service"


def podman_run(runs: dict[str, Generated], name: str) -> list[str]:
    run, unit = service(runs, name)
    argv = run.exec_start(unit)
    assert argv[:2] == ["/usr/bin/podman", "run"], argv
    return argv


# --- the configurations ---------------------------------------------------------------------


def quadlet_user(rootless: bool) -> dict[str, Any]:
    """A backend's options for its containers: the default rootless user's, or rootful ones."""
    return {} if rootless else {"quadlet": {"user": None}}


def every_backend(*, rootless: bool) -> dict[str, Any]:
    """Each backend with a port model and (all but SGLang, which needs a port) a socket model,
    the gateway, credentials, a digest, a shm size, extra devices, and the user's own layers."""
    user = quadlet_user(rootless)
    digest = "sha256:" + "ab" * 32
    return llmhop(
        **{
            "llama-cpp": {
                **user,
                "runtime": "container",
                "models": {
                    "l-port": {"port": 18001, "settings": {"hf-repo": "org/m-GGUF:Q4_K_M"}},
                    "l-sock": {
                        "settings": {
                            "hf-repo": "org/s-GGUF:Q4_K_M",
                            "api-key-file": "${cred:k}",
                        },
                        "credentials": {"k": "/run/secrets/k"},
                        "devices": ["/dev/dri/renderD128"],
                    },
                },
            },
            "vllm": {
                **user,
                "quadlet": {
                    **user.get("quadlet", {}),
                    # vLLM's docs run it with --ipc=host; the module's own flags stay.
                    "containerConfig": {
                        "Volume": ["/srv/models:/models:ro"],
                        "PodmanArgs": ["--ipc=host"],
                    },
                    "serviceConfig": {"MemoryMax": "64G"},
                },
                "models": {
                    "v-port": {"port": 20001, "model": "org/p", "digest": digest},
                    "v-sock": {
                        "model": "/models/s",
                        "shmSize": "16g",
                        "credentials": {"hf": {}},
                        "environment": {"NOTE": "100% $HOME"},
                        "settings": {"chat-template": "/models/%s-$x.jinja"},
                        "quadlet": {
                            "containerConfig": {"UserNS": "auto"},
                            "unitConfig": {"DefaultDependencies": False},
                            "quadletConfig": {"DefaultDependencies": False},
                            "extraConfig": {"Install": {"WantedBy": "gpu.target"}},
                        },
                    },
                },
            },
            "sglang": {
                **user,
                "models": {
                    "a": {"port": 30001, "model": "org/a"},
                    "b": {"port": 30002, "model": "org/b", "tag": "v0.5.5"},
                },
                "gateway": {"enable": True, "port": 19000, "route": "sglang"},
            },
        }
    )


def tls_gateway(*, rootless: bool) -> dict[str, Any]:
    user = quadlet_user(rootless)
    gateway = {
        "enable": True,
        "port": 19000,
        "bindAddress": "::",
        "enableMetrics": False,
        "credentials": {"tls.key": "/run/secrets/tls.key"},
        "settings": {"tls-cert-path": "/etc/ssl/gw.pem", "tls-key-path": "${cred:tls.key}"},
    }
    models = {"a": {"port": 30001, "model": "org/a"}}
    return llmhop(sglang={**user, "models": models, "gateway": gateway})


# --- the tests ------------------------------------------------------------------------------


def test_the_generator_is_the_version_nixpkgs_packages(generator: Path) -> None:
    if os.environ.get("LLMHOP_QUADLET"):
        pytest.skip("LLMHOP_QUADLET names another build of the generator")
    proc = subprocess.run(
        [str(generator), "-version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.strip() == QUADLET_VERSION


def test_the_examples(generator: Path, workdir: Path) -> None:
    containers = {}
    for example in sorted(EXAMPLES.glob("*.nix")):
        result = evaluate(module=example)
        generate(generator, result, workdir / example.stem)
        containers[example.name] = sorted(result["quadlet"])
    assert containers["complete.nix"] == [
        "sglang-gateway",
        "sglang-gemma-3-27b",
        "sglang-mistral-small",
        "vllm-llama-3-8b",
        "vllm-qwen3-32b",
    ]


@ROOTLESS_AND_ROOTFUL
def test_every_backend_port_and_socket(generator: Path, workdir: Path, rootless: bool) -> None:
    result = evaluate(every_backend(rootless=rootless))
    runs = generate(generator, result, workdir)
    assert list(runs) == (["user"] if rootless else ["system"])
    assert len(result["quadlet"]) == 7

    # Sockets: group-accessible for the router through podman's --umask (Quadlet has no Umask=).
    for name in ("llama-cpp-l-sock", "vllm-v-sock"):
        argv = podman_run(runs, name)
        assert "--umask=0007" in argv
        assert not any(a.startswith("--publish") for a in argv)
    # Ports: published on loopback, the default umask.
    published = {
        "llama-cpp-l-port": "127.0.0.1:18001:8080",
        "vllm-v-port": "127.0.0.1:20001:8000",
        "sglang-a": "127.0.0.1:30001:30000",
        "sglang-b": "127.0.0.1:30002:30000",
    }
    for name, publish in published.items():
        argv = podman_run(runs, name)
        assert argv[argv.index("--publish") + 1] == publish
        assert not any(a.startswith("--umask") for a in argv)

    vllm = podman_run(runs, "vllm-v-sock")
    # The user's flags come last: podman takes the last of a repeated flag.
    assert vllm.index("--umask=0007") < vllm.index("--ipc=host")
    assert "--ipc=host" in podman_run(runs, "vllm-v-port")
    assert "--uds=/run/llmhop/socket/http.sock" in vllm
    assert vllm[vllm.index("--shm-size") + 1] == "16g"
    assert vllm[vllm.index("--userns") + 1] == "auto"
    # What the module escaped for Quadlet reaches systemd's ExecStart= escaped for systemd.
    assert "--chat-template=/models/%%s-$$x.jinja" in vllm
    assert "NOTE=100%% $$HOME" in vllm
    run, unit = service(runs, "vllm-v-sock")
    assert run.section(unit, "Install")["WantedBy"] == ["gpu.target"]
    assert "-v" in vllm and "/srv/models:/models:ro" in vllm

    digest = podman_run(runs, "vllm-v-port")
    assert any(a.startswith("docker.io/vllm/vllm-openai@sha256:") for a in digest)

    llama = podman_run(runs, "llama-cpp-l-sock")
    assert "--api-key-file=/run/llmhop/credentials/k" in llama
    assert "%d:/run/llmhop/credentials:ro" in llama
    assert llama[llama.index("--device") + 1] == "/dev/dri/renderD128"

    gateway = podman_run(runs, "sglang-gateway")
    assert gateway[gateway.index("--network") + 1] == "host"
    assert "--worker-urls" in gateway


@ROOTLESS_AND_ROOTFUL
def test_the_gateway_with_tls(generator: Path, workdir: Path, rootless: bool) -> None:
    runs = generate(generator, evaluate(tls_gateway(rootless=rootless)), workdir)
    gateway = podman_run(runs, "sglang-gateway")
    assert "--tls-key-path=/run/llmhop/credentials/tls.key" in gateway
    assert "%d:/run/llmhop/credentials:ro" in gateway


def replicas(*, rootless: bool) -> dict[str, Any]:
    """Container replicas of each backend: by GPU, by device, on ports and on sockets."""
    user = quadlet_user(rootless)
    gpus = [{"gpus": ["0"]}, {"gpus": ["1"]}]
    return llmhop(
        **{
            "llama-cpp": {
                **user,
                "runtime": "container",
                "models": {"l": {"replicas": [{"devices": ["/dev/dri/renderD128"]}, {}]}},
            },
            "vllm": {
                **user,
                "models": {"v": {"port": 20001, "model": "org/v", "replicas": gpus}},
            },
            "sglang": {
                **user,
                "models": {"s": {"port": 30001, "model": "org/s", "replicas": gpus}},
                "gateway": {"enable": True, "port": 19000},
            },
        }
    )


@ROOTLESS_AND_ROOTFUL
def test_replicas(generator: Path, workdir: Path, rootless: bool) -> None:
    result = evaluate(replicas(rootless=rootless))
    runs = generate(generator, result, workdir)
    assert sorted(result["quadlet"]) == [
        "llama-cpp-l-0",
        "llama-cpp-l-1",
        "sglang-gateway",
        "sglang-s-0",
        "sglang-s-1",
        "vllm-v-0",
        "vllm-v-1",
    ]
    for backend, port, inside in (("vllm-v", 20001, 8000), ("sglang-s", 30001, 30000)):
        for index in (0, 1):
            argv = podman_run(runs, f"{backend}-{index}")
            assert argv[argv.index("--device") + 1] == f"nvidia.com/gpu={index}"
            assert argv[argv.index("--publish") + 1] == f"127.0.0.1:{port + index}:{inside}"
    for index in (0, 1):
        argv = podman_run(runs, f"llama-cpp-l-{index}")
        assert f"/run/llmhop/llama-cpp-l-{index}:/run/llmhop/socket:U" in argv
        assert "--umask=0007" in argv
    assert "/dev/dri/renderD128" in podman_run(runs, "llama-cpp-l-0")
    gateway = podman_run(runs, "sglang-gateway")
    urls = gateway[gateway.index("--worker-urls") + 1 :][:2]
    assert urls == ["http://127.0.0.1:30001", "http://127.0.0.1:30002"]


def test_a_rejected_key_fails(generator: Path, workdir: Path) -> None:
    # The container file of a socket model as the module wrote it before: Umask= in [Container].
    result = evaluate(every_backend(rootless=True))
    new = result["quadlet"]["vllm-v-sock"]
    assert "PodmanArgs=--umask=0007\n" in new
    old = new.replace("PodmanArgs=--umask=0007\n", "Umask=0007\n")
    run = run_generator(generator, {"vllm-sock.container": old}, workdir, user=True)
    assert run.returncode == 1
    assert "unsupported key 'Umask' in group 'Container'" in run.stderr
    assert run.texts == {}


def on_demand(*, rootless: bool) -> dict[str, Any]:
    """vLLM `x` (socket) and `y` (port) started on demand, in one group."""
    user = quadlet_user(rootless)
    on = {"enable": True, "idleTimeout": "2s"}
    models = {
        "x": {"model": "org/x", "onDemand": on, "group": "gpu"},
        "y": {"port": 20002, "model": "org/y", "onDemand": on, "group": "gpu"},
    }
    vllm = {**user, "tag": "v0.11.0", "devices": ["nvidia.com/gpu=0"], "models": models}
    return llmhop(vllm=vllm)


@ROOTLESS_AND_ROOTFUL
def test_containers_on_demand(generator: Path, workdir: Path, rootless: bool) -> None:
    runs = generate(generator, evaluate(on_demand(rootless=rootless)), workdir)
    for name, peer in (("vllm-x", "vllm-y"), ("vllm-y", "vllm-x")):
        run, unit = service(runs, name)
        section = run.section(unit, "Unit")
        # Started by its proxy only, stopped once the proxy is gone, and never beside its peer.
        assert section["StopWhenUnneeded"] == ["true"]
        assert section["Conflicts"] == [f"{peer}.service"]
        assert run.section(unit, "Install") == {}
        argv = podman_run(runs, name)
        # Its own socket behind the proxy: the worker directory, nothing published.
        assert f"/run/llmhop/{name}/worker:/run/llmhop/socket:U" in argv
        assert "--uds=/run/llmhop/socket/http.sock" in argv
        assert not any(a.startswith("--publish") for a in argv)
    run, unit = service(runs, "vllm-y")
    assert "vllm-x.service" in run.section(unit, "Unit")["After"]
