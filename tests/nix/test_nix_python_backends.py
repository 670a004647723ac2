"""vLLM and SGLang (modules/nixos/{vllm,sglang}.nix): their required options, natively
(units, NCCL, packages, systemd-analyze verify) and beside their containers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from module_configs import WATCHED, assertions, config_file, container, llmhop
from nix_harness import NixEvalError, analyze_verify, evaluate, render_units, stand_in

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def test_sglang_needs_a_port() -> None:
    with pytest.raises(
        NixEvalError, match=r"sglang\.models\.m\.port.*accessed but has no value defined"
    ):
        evaluate(llmhop(sglang={"models": {"m": {"model": "org/m"}}}))


def test_vllm_needs_a_model_or_weights() -> None:
    assert assertions(llmhop(vllm={"models": {"m": {"port": 20001}}})) == [
        "services.llmhop.vllm.models.m: set `model` (a repository or a path) or `weights`."
    ]


def native_vllm() -> dict[str, Any]:
    return llmhop(
        vllm={
            "runtime": "native",
            "models": {
                "sock": {"model": "org/sock"},
                "tcp": {"port": 20001, "model": "org/tcp", "settings": {"tensor-parallel-size": 2}},
            },
        }
    )


def test_native_vllm() -> None:
    result = evaluate(native_vllm())
    assert result["quadlet"] == {}
    sock = result["services"]["vllm-sock"]["serviceConfig"]
    assert '-vllm/bin/vllm" "serve" "org/sock"' in sock["ExecStart"]
    assert '"-url" "unix:///run/llmhop/vllm-sock/http.sock"' in sock["ExecStart"]
    assert sock["ExecStart"].endswith(
        '"--served-model-name" "sock" "--uds" "/run/llmhop/vllm-sock/http.sock"'
    )
    assert (sock["User"], sock["Group"]) == ("vllm", "vllm")
    assert "DynamicUser" not in sock
    assert sock["Restart"] == "always"
    assert sock["KillMode"] == "mixed"
    assert sock["SuccessExitStatus"] == 130
    assert sock["RuntimeDirectory"] == "llmhop/vllm-sock"
    assert sock["PrivateDevices"] is False
    assert sock["SupplementaryGroups"] == ["render", "video"]
    assert sock["MemoryDenyWriteExecute"] is False
    tcp = result["services"]["vllm-tcp"]
    assert tcp["serviceConfig"]["ExecStart"].endswith(
        '"--host" "127.0.0.1" "--port" "20001" "--served-model-name" "tcp"'
        ' "--tensor-parallel-size" "2"'
    )
    assert tcp["after"] == ["network-online.target", "vllm-sock.service"]
    env = tcp["environment"]
    assert env["HF_HOME"] == "/var/cache/vllm/tcp"
    assert env["VLLM_CACHE_ROOT"] == "/var/cache/vllm/tcp/vllm"
    assert env["LD_LIBRARY_PATH"] == "/run/opengl-driver/lib"
    # tensor-parallel-size 2: NCCL between the two GPU processes.
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_DISABLE"]) == ("lo", "1")
    assert tcp["serviceConfig"]["RestrictAddressFamilies"][-1] == "AF_NETLINK"
    assert tcp["serviceConfig"]["SocketBindAllow"] == "tcp"
    assert "NCCL_SOCKET_IFNAME" not in result["services"]["vllm-sock"]["environment"]
    assert sock["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "SocketBindAllow" not in sock
    # Triton and the flashinfer JIT compile kernels at run time.
    assert [path.rsplit("-", 1)[-1] for path in tcp["path"]] == ["wrapper", "ninja", "bash"]
    assert result["users"]["vllm"]["uid"] == 60602
    assert result["users"]["vllm"]["linger"] is None
    assert result["services"]["llmhop"]["serviceConfig"]["SupplementaryGroups"] == ["vllm"]


def test_native_sglang_needs_a_package() -> None:
    config = llmhop(
        sglang={"runtime": "native", "models": {"m": {"port": 30001, "model": "org/m"}}}
    )
    messages = assertions(config)
    assert len(messages) == 1 and messages[0].startswith("services.llmhop.sglang.package is null")
    config["services"]["llmhop"]["sglang"]["package"] = "/opt/sglang-env"
    unit = evaluate(config)["services"]["sglang-m"]["serviceConfig"]
    assert unit["ExecStart"].endswith(
        '"/opt/sglang-env/bin/python" "-m" "sglang.launch_server" "--enable-metrics"'
        ' "--host" "127.0.0.1" "--model-path" "org/m" "--port" "30001" "--served-model-name" "m"'
    )
    assert unit["SocketBindAllow"] == "tcp:30001"
    assert unit["Restart"] == "always"


@pytest.mark.parametrize(
    ("settings", "nccl", "expected"),
    [
        ({"pipeline-parallel-size": 2}, None, True),
        ({"tensor-parallel-size": 1}, None, False),
        # Only numbers count: a string is the server's business.
        ({"tensor-parallel-size": "2"}, None, False),
        ({"tensor-parallel-size": 4}, False, False),
        ({}, True, True),
    ],
)
def test_nccl_follows_the_parallelism_flags(
    settings: dict[str, Any], nccl: bool | None, expected: bool
) -> None:
    model: dict[str, Any] = {"port": 20001, "model": "org/m", "settings": settings}
    if nccl is not None:
        model["nccl"] = nccl
    service = evaluate(llmhop(vllm={"runtime": "native", "models": {"m": model}}))["services"]
    assert ("NCCL_IB_DISABLE" in service["vllm-m"]["environment"]) is expected
    allowed = service["vllm-m"]["serviceConfig"]["SocketBindAllow"]
    assert allowed == ("tcp" if expected else "tcp:20001")


def test_per_model_runtime() -> None:
    """The complete example's arrangement: a native vLLM beside vLLM containers."""
    result = evaluate(
        llmhop(
            vllm={
                "models": {
                    "b-container": {"port": 20002, "model": "org/b"},
                    "a-container": {"port": 20001, "model": "org/a"},
                    "native": {"runtime": "native", "model": "org/n"},
                }
            }
        )
    )
    assert sorted(result["quadlet"]) == ["vllm-a-container", "vllm-b-container"]
    assert "vllm-native" in result["services"]
    assert "vllm-a-container" not in result["services"]
    # Chained within each runtime: a user manager cannot wait for a system unit.
    assert container(result, "vllm-b-container")["Unit"]["After"] == ["vllm-a-container.service"]
    assert "After" not in container(result, "vllm-a-container")["Unit"]
    assert result["services"]["vllm-native"]["after"] == ["network-online.target"]
    # One account for both: the container user (lingering) runs the native unit too.
    user = result["users"]["vllm"]
    assert (user["uid"], user["linger"], user["description"]) == (60602, True, "vllm workers")
    native = result["services"]["vllm-native"]["serviceConfig"]
    assert (native["User"], native["RuntimeDirectory"]) == ("vllm", "llmhop/vllm-native")
    assert result["services"]["llmhop"]["serviceConfig"]["SupplementaryGroups"] == ["vllm"]
    assert config_file(result)["models"] == {
        "a-container": {"url": "http://127.0.0.1:20001", **WATCHED},
        "b-container": {"url": "http://127.0.0.1:20002", **WATCHED},
        "native": {"url": "unix:///run/llmhop/vllm-native/http.sock", **WATCHED},
    }


def test_mixed_runtimes_share_a_custom_container_user() -> None:
    models = {
        "c": {"port": 20001, "model": "org/c"},
        "n": {"port": 20002, "model": "org/n", "runtime": "native"},
    }
    result = evaluate(llmhop(vllm={"quadlet": {"user": {"uid": 7001}}, "models": models}))
    assert (result["users"]["vllm"]["uid"], result["groups"]["vllm"]["gid"]) == (7001, 7001)
    assert container(result, "vllm-c")["Unit"]["ConditionUser"] == ["7001"]


def test_a_native_model_needs_the_package_only_when_present() -> None:
    config = llmhop(sglang={"models": {"c": {"port": 30001, "model": "org/c"}}})
    assert "sglang-c" in evaluate(config)["quadlet"]
    config["services"]["llmhop"]["sglang"]["models"]["n"] = {
        "port": 30002,
        "model": "org/n",
        "runtime": "native",
    }
    messages = assertions(config)
    assert len(messages) == 1 and messages[0].startswith("services.llmhop.sglang.package is null")


@pytest.mark.systemd
@pytest.mark.usefixtures("systemd_analyze")
def test_native_units_verify(tmp_path: Path) -> None:
    config = native_vllm()
    config["services"]["llmhop"]["sglang"] = {
        "runtime": "native",
        "package": stand_in(tmp_path, "sglang", "python"),
        "models": {"m": {"port": 30001, "model": "org/m"}},
    }
    # PrivateUsers=identity (the GPU relaxations) needs systemd >= 257; the host's is older.
    for backend in ("vllm", "sglang"):
        for model in config["services"]["llmhop"][backend]["models"].values():
            model["gpu"] = False
    units = render_units(config, tmp_path)
    result = analyze_verify(units, ["vllm-sock.service", "vllm-tcp.service", "sglang-m.service"])
    assert result.clean, result.stderr
