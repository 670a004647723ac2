"""The container runtime (modules/framework/container.nix) for every backend: Quadlet texts
(real quadlet-nix), images, devices, warnings, users, sockets, ACL, credentials, layers."""

from __future__ import annotations

import pytest
from module_configs import (
    DIGEST,
    WATCHED,
    acl_settings,
    assertions,
    config_file,
    container,
    llmhop,
    warnings,
)
from nix_harness import REPO, NixEvalError, evaluate, option_docs

pytestmark = [pytest.mark.nix, pytest.mark.usefixtures("nix_inputs")]


def test_the_quickstart_example() -> None:
    # docs/module.md shows it (tests/nix/test_nix_examples.py).
    result = evaluate(module=REPO / "examples" / "nixos" / "quickstart.nix")
    # llama.cpp: a native system unit.
    assert "llama-cpp-qwen3-8b" in result["services"]
    assert "--hf-repo" in result["services"]["llama-cpp-qwen3-8b"]["serviceConfig"]["ExecStart"]
    # vLLM: a rootless container, a user unit of the lingering `vllm` user.
    assert "vllm-llama-3-8b" not in result["services"]
    assert result["userServices"]["vllm-llama-3-8b"]["wantedBy"] == ["default.target"]
    unit = container(result, "vllm-llama-3-8b")
    assert unit["Unit"]["ConditionUser"] == ["60602"]
    assert unit["Container"]["Image"] == ["docker.io/vllm/vllm-openai:latest"]
    assert unit["Container"]["Pull"] == ["newer"]
    assert unit["Container"]["PublishPort"] == ["127.0.0.1:20001:8000"]
    assert unit["Container"]["Exec"] == [
        "meta-llama/Meta-Llama-3-8B-Instruct '--host=0.0.0.0' '--port=8000'"
        " '--served-model-name=llama-3-8b'"
    ]
    vllm = result["users"]["vllm"]
    assert (vllm["uid"], vllm["group"], vllm["home"]) == (60602, "vllm", "/var/lib/vllm")
    assert vllm["linger"] is True
    assert vllm["autoSubUidGidRange"] is True
    assert vllm["isSystemUser"] and vllm["createHome"]
    assert result["groups"]["vllm"]["gid"] == 60602
    assert "d /var/cache/vllm 0700 vllm vllm - -" in result["tmpfiles"]["rules"]
    # Both routed.
    assert config_file(result)["models"] == {
        "qwen3-8b": {"url": "http://127.0.0.1:18001", **WATCHED},
        "llama-3-8b": {"url": "http://127.0.0.1:20001", **WATCHED},
    }
    # It evaluates, and says what a production machine needs: a GPU for vLLM, a pinned image.
    found = [" ".join(w.split()) for w in result["warnings"]]
    assert len(found) == 2
    assert found[0].startswith("services.llmhop.vllm.models.llama-3-8b: gpu = true, but")
    assert found[1].startswith(
        "services.llmhop.vllm.models.llama-3-8b runs docker.io/vllm/vllm-openai:latest,"
    )


def test_container_hardening_health_and_mounts() -> None:
    result = evaluate(
        llmhop(
            vllm={
                "environment": {"VLLM_LOGGING_LEVEL": "DEBUG"},
                "environmentFile": "/run/secrets/vllm.env",
                "modelSettings": {"max-model-len": 8192},
                "models": {
                    "m": {
                        "port": 20001,
                        "model": "org/m",
                        "shmSize": "32g",
                        "settings": {"enable-prefix-caching": False, "max-model-len": 4096},
                        "environment": {"CUDA_VISIBLE_DEVICES": "1"},
                    }
                },
            }
        )
    )
    c = container(result, "vllm-m")["Container"]
    assert c["NoNewPrivileges"] == ["true"]
    assert c["DropCapability"] == ["all"]
    assert c["Tmpfs"] == ["/tmp"]
    assert c["Notify"] == ["healthy"]
    assert c["HealthCmd"] == ["curl --fail --silent --show-error http://localhost:8000/health"]
    # As long as systemd waits for the start (TimeoutStartSec=3600, below).
    assert c["HealthStartPeriod"] == ["3600s"]
    # Older images' entrypoint (the API server module) takes no positional model.
    assert c["Entrypoint"] == ['["vllm","serve"]']
    assert c["ShmSize"] == ["32g"]
    assert c["Ulimit"] == ["host"]
    assert c["Volume"] == ["/var/cache/vllm:/root/.cache/huggingface"]
    assert "AddDevice" not in c
    assert c["EnvironmentFile"] == ["/run/secrets/vllm.env"]
    assert sorted(c["Environment"]) == [
        '"CUDA_VISIBLE_DEVICES=1"',
        '"HF_HOME=/root/.cache/huggingface"',
        '"VLLM_LOGGING_LEVEL=DEBUG"',
    ]
    assert c["Exec"] == [
        "org/m --no-enable-prefix-caching '--host=0.0.0.0' '--max-model-len=4096'"
        " '--port=8000' '--served-model-name=m'"
    ]
    s = container(result, "vllm-m")["Service"]
    assert (s["Restart"], s["RestartSec"], s["TimeoutStartSec"]) == (["always"], ["30"], ["3600"])
    assert s["LimitNOFILE"] == ["1048576"]
    u = container(result, "vllm-m")["Unit"]
    assert (u["StartLimitBurst"], u["StartLimitIntervalSec"]) == (["3"], ["3600"])
    assert result["quadlet"].keys() == {"vllm-m"}


def test_gpus_through_cdi() -> None:
    models = {
        "a": {"port": 20001, "model": "org/a"},
        "b": {"port": 20002, "model": "org/b", "devices": ["/dev/dri/renderD128"]},
    }
    result = evaluate(
        {
            **llmhop(
                vllm={"models": models},
                **{"llama-cpp": {"runtime": "container", "models": {"l": {"port": 18001}}}},
            ),
            "hardware": {"nvidia-container-toolkit": {"enable": True}},
        }
    )
    assert container(result, "vllm-a")["Container"]["AddDevice"] == ["nvidia.com/gpu=all"]
    assert container(result, "vllm-b")["Container"]["AddDevice"] == ["/dev/dri/renderD128"]
    llama = container(result, "llama-cpp-l")["Container"]
    assert llama["Image"] == ["ghcr.io/ggml-org/llama.cpp:server-cuda"]
    result = evaluate(llmhop(vllm={"devices": ["amd.com/gpu=all"], "models": models}))
    assert container(result, "vllm-a")["Container"]["AddDevice"] == ["amd.com/gpu=all"]


def test_tag_digest_and_image() -> None:
    result = evaluate(
        llmhop(
            sglang={
                "tag": "v0.5.0-cu129",
                "models": {
                    "a": {"port": 30001, "model": "org/a"},
                    "b": {"port": 30002, "model": "org/b", "tag": "dev"},
                    "c": {"port": 30003, "model": "org/c", "digest": DIGEST},
                    "d": {"port": 30004, "model": "org/d", "image": "registry.example/sglang"},
                },
            }
        )
    )
    image = {n: container(result, f"sglang-{n}")["Container"] for n in "abcd"}
    assert image["a"]["Image"] == ["docker.io/lmsysorg/sglang:v0.5.0-cu129"]
    assert image["b"]["Image"] == ["docker.io/lmsysorg/sglang:dev"]
    assert image["c"]["Image"] == [f"docker.io/lmsysorg/sglang@{DIGEST}"]
    assert image["c"]["Pull"] == ["missing"]
    assert image["a"]["Pull"] == ["newer"]
    assert image["d"]["Image"] == ["registry.example/sglang:v0.5.0-cu129"]
    # Every SGLang image has the module; `sglang serve` only releases after 0.5.1.
    assert image["a"]["Entrypoint"] == ['["python3","-m","sglang.launch_server"]']
    assert image["a"]["Exec"] == [
        "--enable-metrics '--host=0.0.0.0' '--model-path=org/a' '--port=30000'"
        " '--served-model-name=a'"
    ]
    assert image["a"]["PublishPort"] == ["127.0.0.1:30001:30000"]


def test_tag_and_digest_together_are_rejected() -> None:
    messages = assertions(
        llmhop(vllm={"models": {"m": {"port": 1, "model": "x", "tag": "t", "digest": DIGEST}}})
    )
    assert messages == ["services.llmhop.vllm.models.m: set either tag or digest, not both."]
    with pytest.raises(NixEvalError, match=r"models\.m\.digest.*not of type"):
        evaluate(llmhop(vllm={"models": {"m": {"port": 1, "model": "x", "digest": "latest"}}}))


def test_a_gpu_container_without_devices_warns() -> None:
    model = {"port": 20001, "model": "org/m", "tag": "v0.11.0"}
    [message] = warnings(llmhop(vllm={"models": {"m": model}}))
    assert message.startswith(
        "services.llmhop.vllm.models.m: gpu = true, but its container gets no device,"
        " so it runs without a GPU. Enable hardware.nvidia-container-toolkit"
    )
    assert "set gpu = false for a model meant to run on the CPU" in message
    # Each way of giving it a device, or saying it needs none, silences it.
    for config in [
        {
            **llmhop(vllm={"models": {"m": model}}),
            "hardware": {"nvidia-container-toolkit": {"enable": True}},
        },
        llmhop(vllm={"devices": ["amd.com/gpu=all"], "models": {"m": model}}),
        llmhop(vllm={"models": {"m": {**model, "devices": ["/dev/dri/renderD128"]}}}),
        llmhop(vllm={"models": {"m": {**model, "gpu": False}}}),
        llmhop(
            vllm={
                "quadlet": {"containerConfig": {"AddDevice": "nvidia.com/gpu=0"}},
                "models": {"m": model},
            }
        ),
        # Natively, `gpu` relaxes the sandbox; there is no device list to miss.
        llmhop(vllm={"models": {"m": {**model, "runtime": "native"}}}),
    ]:
        assert warnings(config) == [], config
    # A raw AddDevice= that empties the list counts as none.
    emptied = {**model, "quadlet": {"containerConfig": {"AddDevice": []}}}
    config = llmhop(vllm={"devices": ["nvidia.com/gpu=0"], "models": {"m": emptied}})
    assert len(warnings(config)) == 1


def test_unpinned_images_warn() -> None:
    models = {
        "latest": {"port": 30001, "model": "org/a"},
        "tagged": {"port": 30002, "model": "org/b", "tag": "v0.5.5"},
        "digest": {"port": 30003, "model": "org/c", "digest": DIGEST},
        "mine": {"port": 30004, "model": "org/d", "image": "registry.example/sglang"},
    }
    config = llmhop(
        sglang={
            "devices": ["nvidia.com/gpu=0"],
            "models": models,
            "gateway": {"enable": True, "port": 19000},
        },
        **{
            "llama-cpp": {
                "runtime": "container",
                "models": {"l": {"port": 18001}, "b": {"port": 18002, "tag": "server-b6000"}},
            }
        },
    )
    found = {w.split(" runs ")[0].removeprefix("services.llmhop."): w for w in warnings(config)}
    assert sorted(found) == [
        "llama-cpp.models.l",
        "sglang.gateway",
        "sglang.models.latest",
        "sglang.models.mine",
    ]
    assert found["sglang.models.latest"] == (
        "services.llmhop.sglang.models.latest runs docker.io/lmsysorg/sglang:latest, a tag that"
        " moves: with Pull=newer a restart may start another engine version. Pin it with"
        " `digest = \"sha256:…\"` (podman image inspect --format '{{.Digest}}' <image>) or a"
        " release `tag`."
    )
    # llama.cpp's default tags are rebuilt from every commit too.
    assert found["llama-cpp.models.l"].startswith(
        "services.llmhop.llama-cpp.models.l runs ghcr.io/ggml-org/llama.cpp:server,"
    )
    assert "registry.example/sglang:latest" in found["sglang.models.mine"]
    assert "docker.io/lmsysorg/sgl-model-gateway:latest" in found["sglang.gateway"]
    pinned = llmhop(
        sglang={
            "tag": "v0.5.5",
            "devices": ["nvidia.com/gpu=0"],
            "models": models,
            "gateway": {"enable": True, "port": 19000, "digest": DIGEST},
        }
    )
    assert warnings(pinned) == []


def test_an_empty_tag_is_refused() -> None:
    """Podman reads `image:` as `image:latest`; a tag cannot smuggle in a digest either."""
    for tag in ["", "v1@sha256:00"]:
        with pytest.raises(NixEvalError, match=r"models\.m\.tag.*not of type"):
            evaluate(llmhop(vllm={"models": {"m": {"port": 1, "model": "x", "tag": tag}}}))


def test_rootless_socket() -> None:
    result = evaluate(llmhop(vllm={"models": {"s": {"model": "org/s"}}}))
    unit = container(result, "vllm-s")
    c = unit["Container"]
    assert "PublishPort" not in c
    assert "Umask" not in c
    assert c["PodmanArgs"] == ["--umask=0007"]
    assert c["Volume"] == [
        "/var/cache/vllm:/root/.cache/huggingface",
        "/run/llmhop/vllm-s:/run/llmhop/socket:U",
    ]
    assert c["HealthCmd"] == [
        "curl --fail --silent --show-error --unix-socket /run/llmhop/socket/http.sock"
        " http://localhost/health"
    ]
    assert "'--uds=/run/llmhop/socket/http.sock'" in c["Exec"][0]
    assert "--port" not in c["Exec"][0]
    pre = unit["Service"]["ExecStartPre"]
    assert pre[-1].endswith("-podman/bin/podman unshare rm -f /run/llmhop/vllm-s/http.sock")
    assert "RuntimeDirectory" not in unit["Service"]
    rules = result["tmpfiles"]["rules"]
    assert "d /run/llmhop/vllm-s 0710 vllm vllm - -" in rules
    acl = {"/run/llmhop": {"a+": {"argument": "default:user:llmhop:-wx"}}}
    assert acl_settings(result) == acl
    assert config_file(result)["models"]["s"] == {
        "url": "unix:///run/llmhop/vllm-s/http.sock",
        **WATCHED,
    }
    assert result["registries"]["portsRegistry"] == {"llmhop.listen.default": 8080}
    # No group to join: the ACL lets the router in.
    assert not result["services"]["llmhop"]["serviceConfig"].get("SupplementaryGroups")


def test_rootful_system_units() -> None:
    result = evaluate(
        llmhop(
            **{
                "llama-cpp": {
                    "runtime": "container",
                    "quadlet": {"user": None},
                    "models": {"b": {"quadlet": {"mountOptions": {"socket": ["U", "z"]}}}},
                }
            }
        )
    )
    unit = container(result, "llama-cpp-b")
    assert "ConditionUser" not in unit["Unit"]
    assert result["services"]["llama-cpp-b"]["wantedBy"] == ["multi-user.target"]
    assert "llama-cpp-b" not in result["userServices"]
    assert unit["Service"]["RuntimeDirectory"] == ["llmhop/llama-cpp-b"]
    assert unit["Service"]["RuntimeDirectoryMode"] == ["0710"]
    assert unit["Container"]["Volume"] == [
        "/var/cache/llama-cpp:/root/.cache/llama.cpp",
        "/run/llmhop/llama-cpp-b:/run/llmhop/socket:U,z",
    ]
    assert unit["Container"]["Image"] == ["ghcr.io/ggml-org/llama.cpp:server"]
    assert unit["Container"]["Environment"] == ['"LLAMA_CACHE=/root/.cache/llama.cpp"']
    assert "'--alias=b'" in unit["Container"]["Exec"][0]
    assert "'--host=/run/llmhop/socket/http.sock'" in unit["Container"]["Exec"][0]
    assert "llama-cpp" not in result["users"]
    assert "d /var/cache/llama-cpp 0700 root root - -" in result["tmpfiles"]["rules"]
    assert not any(r.startswith("d /run/llmhop/llama-cpp-b") for r in result["tmpfiles"]["rules"])


def test_one_acl_for_every_backend_with_container_sockets() -> None:
    result = evaluate(
        llmhop(
            vllm={"models": {"v": {"model": "org/v"}}},
            **{"llama-cpp": {"runtime": "container", "models": {"l": {}}}},
        )
    )
    assert acl_settings(result) == {"/run/llmhop": {"a+": {"argument": "default:user:llmhop:-wx"}}}
    assert not any(rule.startswith("a+") for rule in result["tmpfiles"]["rules"])


def test_custom_container_user() -> None:
    user = {"name": "gpu", "uid": 990, "gid": 991, "home": "/srv/gpu"}
    result = evaluate(
        llmhop(sglang={"quadlet": {"user": user}, "models": {"m": {"port": 30001, "model": "x"}}})
    )
    assert container(result, "sglang-m")["Unit"]["ConditionUser"] == ["990"]
    gpu = result["users"]["gpu"]
    assert (gpu["uid"], gpu["group"], gpu["home"], gpu["linger"]) == (990, "gpu", "/srv/gpu", True)
    assert result["groups"]["gpu"]["gid"] == 991
    assert "sglang" not in result["users"]
    unmanaged = {**user, "manage": False}
    result = evaluate(
        llmhop(
            sglang={"quadlet": {"user": unmanaged}, "models": {"m": {"port": 30001, "model": "x"}}}
        )
    )
    assert "gpu" not in result["users"]
    assert "d /var/cache/sglang 0700 gpu gpu - -" in result["tmpfiles"]["rules"]


def test_a_uid_clash_is_rejected() -> None:
    config = llmhop(vllm={"models": {"m": {"port": 20001, "model": "x"}}})
    config["users"] = {"users": {"alice": {"uid": 60602}}, "groups": {"staff": {"gid": 60602}}}
    assert assertions(config) == [
        "services.llmhop.vllm.quadlet.user.uid 60602 is taken by users.users.{alice};"
        " choose another.",
        "services.llmhop.vllm.quadlet.user.gid 60602 is taken by users.groups.{staff};"
        " choose another.",
    ]


def test_startup_is_chained_by_name() -> None:
    models = {
        "z-first-declared": {"name": "c", "port": 20003, "model": "x"},
        "a": {"name": "b", "port": 20002, "model": "x"},
        "m": {"name": "a", "port": 20001, "model": "x"},
    }
    result = evaluate(llmhop(vllm={"models": models}))
    after = {n: container(result, f"vllm-{n}")["Unit"].get("After") for n in "abc"}
    assert after == {"a": None, "b": ["vllm-a.service"], "c": ["vllm-b.service"]}
    result = evaluate(llmhop(vllm={"startupOrdering": False, "models": models}))
    assert all("After" not in container(result, f"vllm-{n}")["Unit"] for n in "abc")


def test_credentials_are_mounted_per_unit() -> None:
    models = {
        "k": {
            "port": 20001,
            "model": "x",
            "credentials": {"api-keys": "/run/secrets/keys", "hf": {}},
            "settings": {"api-key": "${cred:api-keys}"},
            "quadlet": {"mountOptions": {"credentials": ["idmap"]}},
        },
        "plain": {"port": 20002, "model": "x"},
    }
    result = evaluate(llmhop(vllm={"models": models}))
    unit = container(result, "vllm-k")
    assert unit["Service"]["LoadCredential"] == ["api-keys:/run/secrets/keys"]
    assert unit["Service"]["ImportCredential"] == ["hf"]
    assert unit["Container"]["Volume"][-1] == "%d:/run/llmhop/credentials:ro,idmap"
    assert "'--api-key=/run/llmhop/credentials/api-keys'" in unit["Container"]["Exec"][0]
    plain = container(result, "vllm-plain")
    assert "LoadCredential" not in plain["Service"]
    assert plain["Container"]["Volume"] == ["/var/cache/vllm:/root/.cache/huggingface"]
    bad = {"m": {"port": 20001, "model": "x", "settings": {"api-key": "${cred:nope}"}}}
    assert assertions(llmhop(vllm={"models": bad})) == [
        "services.llmhop.vllm.models.m.settings: ${cred:nope} names no credential"
        " of this model (it has: )."
    ]


def test_quadlet_layers() -> None:
    result = evaluate(
        llmhop(
            vllm={
                "quadlet": {
                    "containerConfig": {"UserNS": "keep-id", "Volume": ["/srv/models:/models:ro"]},
                    "serviceConfig": {"MemoryMax": "64G", "RestartSec": 5},
                },
                "models": {
                    "m": {
                        "port": 20001,
                        "model": "/models/m",
                        "quadlet": {
                            "containerConfig": {"UserNS": "auto"},
                            "serviceConfig": {"Restart": "on-failure"},
                            "unitConfig": {"DefaultDependencies": False},
                            "quadletConfig": {"DefaultDependencies": False},
                            "extraConfig": {"Install": {"WantedBy": "gpu.target"}},
                        },
                    }
                },
            }
        )
    )
    unit = container(result, "vllm-m")
    assert unit["Container"]["UserNS"] == ["auto"]
    assert unit["Container"]["Volume"] == [
        "/srv/models:/models:ro",
        "/var/cache/vllm:/root/.cache/huggingface",
    ]
    assert (unit["Service"]["MemoryMax"], unit["Service"]["RestartSec"]) == (["64G"], ["5"])
    assert unit["Service"]["Restart"] == ["on-failure"]
    assert unit["Unit"]["DefaultDependencies"] == ["false"]
    assert unit["Quadlet"]["DefaultDependencies"] == ["false"]
    assert unit["Install"]["WantedBy"] == ["gpu.target"]


@pytest.mark.parametrize(
    ("timeout", "period"),
    [(7200, "7200s"), ("2h 30min", "9000s"), ("1.5s", "2s"), ("infinity", None)],
)
def test_the_health_checks_grace_is_the_start_timeout(
    timeout: int | str, period: str | None
) -> None:
    model = {
        "port": 20001,
        "model": "org/m",
        "quadlet": {"serviceConfig": {"TimeoutStartSec": timeout}},
    }
    unit = container(evaluate(llmhop(vllm={"models": {"m": model}})), "vllm-m")
    assert unit["Service"]["TimeoutStartSec"] == [str(timeout)]
    assert unit["Container"].get("HealthStartPeriod") == (period and [period])


def test_a_health_start_period_of_ones_own_wins() -> None:
    quadlet = {"containerConfig": {"HealthStartPeriod": "5m"}}
    model = {"port": 20001, "model": "org/m", "quadlet": quadlet}
    unit = container(evaluate(llmhop(vllm={"models": {"m": model}})), "vllm-m")
    assert unit["Container"]["HealthStartPeriod"] == ["5m"]


def test_llama_cpps_default_tag_follows_the_nvidia_toolkit_and_says_so() -> None:
    [tag] = [o for o in option_docs() if o["name"] == "services.llmhop.llama-cpp.tag"]
    assert tag["default"]["text"] == (
        'if config.hardware.nvidia-container-toolkit.enable then "server-cuda" else "server"'
    )
    result = evaluate(
        llmhop(**{"llama-cpp": {"runtime": "container", "models": {"l": {"port": 18001}}}})
    )
    assert container(result, "llama-cpp-l")["Container"]["Image"] == [
        "ghcr.io/ggml-org/llama.cpp:server"
    ]


def test_values_reach_the_container_literally() -> None:
    """Quadlet copies Exec= and Environment= into ExecStart=, where systemd would expand
    `%` specifiers and `$` variables."""
    result = evaluate(
        llmhop(
            vllm={
                "environment": {"PROMPT_PREFIX": "50% off $HOME"},
                "models": {
                    "m": {
                        "port": 20001,
                        "model": "org/m",
                        "settings": {"chat-template": "{{ '%d' }} ${x}"},
                    }
                },
            },
            sglang={
                "gateway": {
                    "enable": True,
                    "port": 19000,
                    "environment": {"RUST_LOG": "info%"},
                    "settings": {"api-key": "a$b"},
                },
                "models": {"s": {"port": 30001, "model": "org/s"}},
            },
        )
    )
    c = container(result, "vllm-m")["Container"]
    assert "'--chat-template={{ '\\''%%d'\\'' }} $${x}'" in c["Exec"][0]
    assert any("PROMPT_PREFIX=50%% off $$HOME" in line for line in c["Environment"])
    gw = container(result, "sglang-gateway")["Container"]
    assert "'--api-key=a$$b'" in gw["Exec"][0]
    assert any("RUST_LOG=info%%" in line for line in gw["Environment"])
