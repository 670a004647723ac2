"""What can be checked here of the VM checks (checks/vm.nix), which need KVM and full nixpkgs:
their test scripts (syntax, ruff, the driver API they call, their expectations against the
evaluated node configurations), the nodes' llmhop configurations evaluated with the module, and
the packaging of the fakes (checks/vm/packages.nix) built and run with stub inputs."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nix_harness import HERE, REPO, eval_expression, evaluate, locked_store_path

VM = REPO / "checks" / "vm"
SCRIPTS = {name: VM / "scripts" / f"{name}.py" for name in ("native", "containers", "on-demand")}
DRIVER_GLOBALS = {"machine", "start_all", "subtest"}

# The Machine methods the scripts may call, with their keyword parameters, as in nixpkgs'
# nixos/lib/test-driver/src/test_driver/machine/__init__.py (BaseMachine).
DRIVER_API: dict[str, set[str]] = {
    "succeed": {"timeout"},
    "fail": {"timeout"},
    "execute": {"check_return", "check_output", "timeout"},
    "systemctl": {"user"},
    "wait_for_unit": {"user", "timeout"},
    "get_unit_info": {"user"},
    "get_unit_property": {"user"},
    "require_unit_state": {"require_state"},
    "wait_until_succeeds": {"timeout"},
    "wait_until_fails": {"timeout"},
    "wait_for_file": {"timeout"},
    "wait_for_open_port": {"addr", "timeout"},
    "wait_for_open_unix_socket": {"is_datagram", "timeout"},
    "start_job": {"user"},
    "stop_job": {"user"},
}

# The program of each fake mode in the fake engine's package, and the image tag of its backend.
PROGRAMS = {"llama-server": "llama-server", "vllm": "vllm", "sglang": "python"}
TAGS = {"llama-server": "llama-cpp", "vllm": "vllm", "sglang": "sglang"}

# Stand-ins for the fakes' packages in module evaluations.
STUB_MODULE = """
let
  package = name: extra: {{
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${{name}}";
  }} // extra;
  image = role: package "stream-llmhop-fake-engine-${{role}}" {{
    imageName = "llmhop-fake-engine";
    imageTag = role;
  }};
in
{{
  imports = [ {config} ];
  _module.args = {{
    fakeEngine = package "llmhop-fake-engine" {{ }};
    fakeImages = {{
      llama-cpp = image "llama-cpp";
      vllm = image "vllm";
      sglang = image "sglang";
      gateway = image "gateway";
    }};
  }};
}}
"""


def script_constants(name: str) -> dict[str, Any]:
    """The module-level constants of a test script (its imports, classes and assignments, run
    without the rest)."""
    tree = ast.parse(SCRIPTS[name].read_text())
    kinds = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.Assign, ast.AnnAssign)
    definitions = [node for node in tree.body if isinstance(node, kinds)]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(definitions, []), str(SCRIPTS[name]), "exec"), namespace)
    return namespace


def node_and_script(tmp_path: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A node's configuration evaluated with the module, and the constants of its script."""
    module = tmp_path / f"{name}.nix"
    module.write_text(STUB_MODULE.format(config=VM / f"{name}-config.nix"))
    return evaluate(module=module), script_constants(name)


def router_config(result: dict[str, Any]) -> dict[str, Any]:
    """The node's rendered llmhop.json."""
    return json.loads(Path(result["etc"]["llmhop/llmhop.json"]["source"]).read_text())


def run_ruff(ruff: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ruff), *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def stub_pkgs(overrides: str) -> str:
    """Nix bindings of `lib` and `pkgs`: the harness's stub packages with what the VM checks'
    files build scripts and images with, and `overrides`."""
    return f"""
        lib = import {locked_store_path("nixpkgs-lib")}/lib;
        stub = import {HERE}/stub-pkgs.nix {{ inherit lib; }};
        pkgs = stub // {{
          runtimeShell = "/bin/sh";
          dockerTools.streamLayeredImage = args: args;
          {overrides}
        }};"""


def quadlet_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals:
            keys.setdefault(key, []).append(value)
    return keys


# --- the test scripts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_compiles_as_the_driver_runs_it(name: str) -> None:
    source = SCRIPTS[name].read_text()
    compile(source, str(SCRIPTS[name]), "exec")
    # The driver prepends type stubs before mypy checks the script: a `from __future__` import
    # would no longer come first.
    tree = ast.parse(source)
    futures = [
        n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "__future__"
    ]
    assert futures == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_passes_ruff(name: str, ruff: Path) -> None:
    for command in (["check"], ["format", "--check"]):
        proc = run_ruff(ruff, *command, str(SCRIPTS[name]), cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_still_catches_undefined_names_in_scripts(tmp_path: Path, ruff: Path) -> None:
    """The driver's globals are declared as builtins (checks/vm/scripts/ruff.toml), nothing more."""
    scripts = tmp_path / "checks" / "vm" / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(VM / "scripts" / "ruff.toml", scripts)
    (scripts / "broken.py").write_text(
        'start_all()\nmachine.succeed("true")\nmachin.succeed("x")\n'
    )
    proc = run_ruff(ruff, "check", str(scripts / "broken.py"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "F821 Undefined name `machin`" in proc.stdout
    assert "`machine`" not in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_calls_only_the_driver_api(name: str) -> None:
    tree = ast.parse(SCRIPTS[name].read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "machine"
    ]
    assert calls
    for call in calls:
        method = call.func.attr  # type: ignore[attr-defined]
        assert method in DRIVER_API, f"line {call.lineno}: machine.{method}"
        keywords = {k.arg for k in call.keywords}
        assert keywords <= DRIVER_API[method], f"line {call.lineno}: {keywords}"
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in DRIVER_GLOBALS}
    assert used == DRIVER_GLOBALS


# --- the node configurations -----------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.usefixtures("nix_inputs")
def test_native_node_matches_its_script(tmp_path: Path) -> None:
    result, script = node_and_script(tmp_path, "native")
    config = router_config(result)
    assert sorted(config["models"]) == script["MODELS"]
    assert config["authTokens"] == ["${cred:llmhop.client-token}"]
    router = result["services"]["llmhop"]["serviceConfig"]
    assert router["ImportCredential"] == ["llmhop.client-token", "llmhop.upstream-key"]
    assert router["LoadCredential"] == ["llmhop.worker-key:/etc/llmhop/worker-key"]
    assert sorted(result["sockets"]) == ["llmhop-default", "llmhop-local"]
    services = result["services"]
    for unit, mode in script["WORKERS"].values():
        service = services[unit.removesuffix(".service")]
        assert service["wantedBy"] == ["multi-user.target"], unit
        program = f"-llmhop-fake-engine/bin/{PROGRAMS[mode]}"
        assert program in service["serviceConfig"]["ExecStart"], unit
    for unit in (script["LLAMA_SOCK"], script["DYING"]):
        assert "wantedBy" not in services[unit.removesuffix(".service")], unit
    sock = services["llama-cpp-llama-sock"]["serviceConfig"]
    assert '"--api-key-file" "%d/api-keys"' in sock["ExecStart"]
    assert '"--fake-ready-file" "/run/llmhop-vm/llama-sock.ready"' in sock["ExecStart"]
    assert '"--fake-die-while-loading"' in services["llama-cpp-dying"]["serviceConfig"]["ExecStart"]
    vllm = services["vllm-vllm-sock"]
    assert vllm["serviceConfig"]["LoadCredential"] == ["hf-token:/etc/llmhop/hf-token"]
    # The fake checks the token lies in the unit's credentials directory.
    assert (
        vllm["environment"]["HF_TOKEN_PATH"] == "/run/credentials/vllm-vllm-sock.service/hf-token"
    )
    groups = services["llmhop"]["serviceConfig"]["SupplementaryGroups"]
    assert sorted(groups) == ["llama-cpp", "vllm"]


@pytest.mark.nix
@pytest.mark.usefixtures("nix_inputs")
def test_containers_node_matches_its_script(tmp_path: Path) -> None:
    result, script = node_and_script(tmp_path, "containers")
    config = router_config(result)
    assert sorted(config["models"]) == sorted([*script["WORKERS"], "sglang"])
    quadlet = {name: quadlet_keys(text) for name, text in result["quadlet"].items()}
    uids = {user: uid for user, (uid, _) in script["USERS"].items()}
    for user, (uid, units) in script["USERS"].items():
        assert result["users"][user]["linger"] is True and result["users"][user]["uid"] == uid
        for unit in units:
            assert quadlet[unit.removesuffix(".service")]["ConditionUser"] == [str(uid)], unit
    for model, (unit, user, mode, gpu) in script["WORKERS"].items():
        keys = quadlet[unit.removesuffix(".service")]
        # quadlet-nix's imageStream sets Image= too; both agree, or evaluation fails.
        assert keys["Image"] == [f"{script['IMAGE']}:{TAGS[mode]}"], model
        assert keys["Pull"] == ["never"], model
        assert keys["Notify"] == ["healthy"], model
        assert (keys.get("AddDevice") == ["nvidia.com/gpu=all"]) is gpu, model
        assert keys.get("ConditionUser") == ([str(uids[user])] if user else None), model
    gateway = quadlet[script["GATEWAY"].removesuffix(".service")]
    assert gateway["Image"] == [f"{script['IMAGE']}:gateway"]
    assert "--worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002" in gateway["Exec"][0]
    rootful = quadlet[script["ROOTFUL"].removesuffix(".service")]
    assert rootful["RuntimeDirectory"] == ["llmhop/llama-cpp-llama-root"]
    assert "--api-key-file=/run/llmhop/credentials/api-keys" in rootful["Exec"][0]


# --- the fakes' packaging ----------------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.usefixtures("nix_inputs")
def test_packages_build_runnable_wrappers_and_images(tmp_path: Path) -> None:
    """packages.nix with stub inputs: its build scripts run here (host Python instead of
    nixpkgs'), the wrappers start the fakes, and each image runs the right program."""
    venv_python = Path(sys.executable)
    pkgs = stub_pkgs(
        f"""
          python3Minimal = {{ outPath = "/usr"; }};
          python3 = {{ withPackages = _: {{ outPath = "{venv_python.parent.parent}"; }}; }};
          bash = stub.bash;"""
    )
    expression = f"""
      let
        {pkgs}
        vm = import {VM}/packages.nix {{ inherit pkgs; }};
      in {{
        fakeEngine = vm.fakeEngine.text;
        client = vm.client.text;
        images = lib.mapAttrs (_: i: {{ inherit (i) name tag config; }}) vm.images;
      }}"""
    built = eval_expression(expression)
    for name in ("fakeEngine", "client"):
        out = tmp_path / name
        subprocess.run(
            ["bash", "-euo", "pipefail", "-c", built[name]],
            env={**os.environ, "out": str(out)},
            check=True,
            timeout=60,
        )
    engine = tmp_path / "fakeEngine" / "bin"
    assert sorted(p.name for p in engine.iterdir()) == [
        "fake-upstream",
        "llama-server",
        "python",
        "sgl-model-gateway",
        "sglang",
        "vllm",
    ]
    # bin/python is SGLang's launcher; a wrong command line fails as the real one does.
    wrong = subprocess.run(
        [engine / "python", "-m", "sglang.launch_server", "--model-path", "m"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert wrong.returncode == 2 and "--served-model-name" in wrong.stderr
    sock = tmp_path / "vllm.sock"
    server = subprocess.Popen(
        [engine / "vllm", "serve", "org/m", "--served-model-name", "m", "--uds", str(sock)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        assert "listening on unix:" in server.stderr.readline()
        assert sock.is_socket()
    finally:
        server.terminate()
        server.wait(10)
    assert server.returncode == 0
    help_text = subprocess.run(
        [tmp_path / "client" / "bin" / "llmhop-vm-client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "{chat,models,error}" in help_text
    images = built["images"]
    assert {role: i["tag"] for role, i in images.items()} == {r: r for r in images}
    assert {i["name"] for i in images.values()} == {"llmhop-fake-engine"}
    entrypoints = {role: i["config"]["Entrypoint"] for role, i in images.items()}
    assert entrypoints["vllm"] == ["/bin/vllm", "serve"]
    assert entrypoints["llama-cpp"] == ["/bin/llama-server"]
    assert entrypoints["gateway"] == ["/bin/sgl-model-gateway"]
    # The module must replace SGLang's entrypoint (with `python3 -m sglang.launch_server`): this
    # one does not exist.
    assert not (engine / Path(entrypoints["sglang"][0]).name).exists()


@pytest.mark.nix
@pytest.mark.usefixtures("nix_inputs")
def test_vm_checks_evaluate_with_stub_packages() -> None:
    """checks/vm.nix as flake.nix imports it, with runNixOSTest returning its arguments: the
    checks' names, their scripts and the nodes' own settings evaluate."""
    pkgs = stub_pkgs(
        """
          python3 = stub.python3 // { withPackages = _: stub.python3; };
          testers.runNixOSTest = args: args;"""
    )
    expression = f"""
      let
        {pkgs}
        checks = import {REPO}/checks/vm.nix {{ inherit pkgs; module = {{ }}; }};
        native = checks.vm-native.nodes.machine;
        containers = lib.head checks.vm-containers.nodes.machine.imports;
        routes = native.specialisation.extra-route.configuration.services.llmhop.settings;
      in {{
        names = builtins.attrNames checks;
        common = builtins.attrNames (lib.head native.imports).environment.etc;
        scripts = map (name: checks.${{name}}.testScript) [ "vm-native" "vm-containers" ];
        native = {{
          etc = builtins.attrNames native.environment.etc;
          hosted = native.systemd.services.fake-hosted.serviceConfig.ExecStart;
          extra = routes.models;
        }};
        containers = {{
          etc = builtins.attrNames containers.environment.etc;
          cdi = builtins.fromJSON containers.environment.etc."cdi/llmhop-fake-gpu.json".text;
          images = builtins.attrNames containers._module.args.fakeImages;
        }};
      }}"""
    result = eval_expression(expression)
    assert result["names"] == ["eval", "vm-containers", "vm-native", "vm-on-demand"]
    assert result["scripts"] == [SCRIPTS[n].read_text() for n in ("native", "containers")]
    native = result["native"]
    assert native["etc"] == [
        "credstore/llmhop.client-token",
        "credstore/llmhop.upstream-key",
        "llmhop/hf-token",
    ]
    assert result["common"] == ["llmhop/worker-key"]
    assert native["hosted"].endswith("/bin/fake-upstream --host 127.0.0.1 --port 9000")
    assert native["extra"] == {
        "extra-route": {
            "url": "http://127.0.0.1:9000",
            "headers": {"Authorization": "Bearer ${cred:llmhop.upstream-key}"},
        }
    }
    containers = result["containers"]
    assert containers["etc"] == ["cdi/llmhop-fake-gpu.json", "llmhop/hf-token"]
    device = containers["cdi"]["devices"][0]
    assert (containers["cdi"]["kind"], device["name"]) == ("nvidia.com/gpu", "all")
    assert device["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia-fake", "hostPath": "/dev/null"}
    ]
    assert containers["images"] == ["gateway", "llama-cpp", "sglang", "vllm"]


@pytest.mark.nix
@pytest.mark.usefixtures("nix_inputs")
def test_on_demand_node_matches_its_script(tmp_path: Path) -> None:
    result, script = node_and_script(tmp_path, "on-demand")
    services, sockets = result["services"], result["sockets"]
    assert sorted(f"{name}.socket" for name in sockets if name != "llmhop-default") == sorted(
        script["SOCKETS"]
    )
    for worker, proxy in ((script["A"], script["PROXY_A"]), (script["B"], script["PROXY_B"])):
        unit = services[worker.removesuffix(".service")]
        assert "wantedBy" not in unit and unit["unitConfig"]["StopWhenUnneeded"] is True
        assert services[proxy.removesuffix(".service")]["bindsTo"] == [worker]
        assert (
            f'"--fake-loading-probes" "{script["LOADING_PROBES"]}"'
            in (unit["serviceConfig"]["ExecStart"])
        )
    assert services["llama-cpp-b"]["conflicts"] == [script["A"]]
    broken = services[script["BROKEN"].removesuffix(".service")]
    assert '"--fake-die-while-loading"' in broken["serviceConfig"]["ExecStart"]
    proxy = services[script["PROXY_BROKEN"].removesuffix(".service")]
    assert proxy["bindsTo"] == [script["BROKEN"]]
    a = services["llama-cpp-a"]["serviceConfig"]["ExecStart"]
    assert f'"--host" "{script["SERVER_A"]}"' in a
    config = router_config(result)
    assert {name: route.get("group") for name, route in config["models"].items()} == {
        "a": "gpu",
        "b": "gpu",
        "broken": None,
    }
