# Checks that need full nixpkgs (flake.nix imports this file only when
# `pkgs.testers.runNixOSTest` exists), the first two also KVM:
#
# - vm-native: the router and native llama.cpp, vLLM and SGLang workers, whose servers are fakes
#   (tests/support/fake_engine.py), driven with the official openai client (vm/scripts/native.py).
# - vm-containers: vLLM and SGLang as rootless Podman containers, llama.cpp as a rootful one and
#   the SGL Model Gateway, from fake images, with a CDI spec standing in for a GPU
#   (vm/scripts/containers.py).
# - vm-on-demand: two native llama.cpp models of one group started on demand, stopped when idle
#   and swapped by the router's schedule; fakes that load for seconds (vm/scripts/on-demand.py).
# - eval: both node configurations and the documented examples (examples/nixos/) evaluated as
#   real NixOS systems; the router configs checked by `llmhop --check` and the Quadlet files by
#   podman's generator, no VM needed.
#
# The llmhop part of each node is vm/{native,containers}-config.nix, which
# tests/nix/test_nix_vm_checks.py also evaluates and the test scripts are checked against.
{ pkgs, module }:
let
  inherit (pkgs) lib;
  inherit (import ./vm/packages.nix { inherit pkgs; }) fakeEngine client images;

  # The tests' own secrets, in /etc; a real system keeps them out of the Nix store.
  secret = text: {
    inherit text;
    mode = "0400";
  };

  common = {
    imports = [ module ];
    environment.systemPackages = [
      client
      pkgs.curl
    ];
    environment.etc."llmhop/worker-key" = secret "worker-secret";
  };

  # nvidia.com/gpu=all as a harmless device node and a marker variable, so AddDevice= goes
  # through podman's CDI resolution without a GPU.
  fakeGpuSpec = {
    cdiVersion = "0.6.0";
    kind = "nvidia.com/gpu";
    devices = [
      {
        name = "all";
        containerEdits = {
          deviceNodes = [
            {
              path = "/dev/nvidia-fake";
              hostPath = "/dev/null";
            }
          ];
          env = [ "LLMHOP_FAKE_CDI=nvidia.com/gpu=all" ];
        };
      }
    ];
  };

  nativeNode = {
    imports = [
      common
      ./vm/native-config.nix
    ];
    _module.args = { inherit fakeEngine; };
    environment.etc = {
      "credstore/llmhop.client-token" = secret "client-secret";
      "credstore/llmhop.upstream-key" = secret "upstream-secret";
      "llmhop/hf-token" = secret "hf-secret";
    };
    # The hosted provider: echoes the Authorization header it receives.
    systemd.services.fake-hosted = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${fakeEngine}/bin/fake-upstream --host 127.0.0.1 --port 9000";
        DynamicUser = true;
      };
    };
    # `switch-to-configuration test` into this one must reload the router, not restart it.
    specialisation.extra-route.configuration.services.llmhop.settings.models.extra-route = {
      url = "http://127.0.0.1:9000";
      headers.Authorization = "Bearer \${cred:llmhop.upstream-key}";
    };
  };

  containersNode = {
    imports = [
      common
      ./vm/containers-config.nix
    ];
    _module.args.fakeImages = images;
    environment.etc = {
      # Loaded by the user manager of `vllm` for its rootless container, so it must read it.
      "llmhop/hf-token" = secret "hf-secret" // {
        user = "vllm";
        group = "vllm";
      };
      "cdi/llmhop-fake-gpu.json".text = builtins.toJSON fakeGpuSpec;
    };
  };

  # The node as a NixOS system of its own (no VM).
  evalNode =
    node:
    (pkgs.nixos {
      imports = [ node ];
      boot.isContainer = true;
      system.stateVersion = lib.trivial.release;
    }).config;

  unitFile = config: name: "${config.systemd.units.${name}.unit}/${name}";

  # What docs/module.md shows, every file of examples/nixos; no assertion of the module or
  # NixOS may fail on them.
  examples = lib.mapAttrs' (
    file: _:
    lib.nameValuePair (lib.removeSuffix ".nix" file) (evalNode {
      imports = [
        module
        (../examples/nixos + "/${file}")
      ];
    })
  ) (lib.filterAttrs (file: _: lib.hasSuffix ".nix" file) (builtins.readDir ../examples/nixos));
in
{
  vm-native = pkgs.testers.runNixOSTest {
    name = "llmhop-native";
    nodes.machine = nativeNode;
    testScript = builtins.readFile ./vm/scripts/native.py;
  };

  vm-on-demand = pkgs.testers.runNixOSTest {
    name = "llmhop-on-demand";
    nodes.machine = {
      imports = [
        common
        ./vm/on-demand-config.nix
      ];
      _module.args = { inherit fakeEngine; };
    };
    testScript = builtins.readFile ./vm/scripts/on-demand.py;
  };

  vm-containers = pkgs.testers.runNixOSTest {
    name = "llmhop-containers";
    nodes.machine = {
      imports = [ containersNode ];
      # Room for four images in three container storages.
      virtualisation = {
        memorySize = 3072;
        diskSize = 8192;
        cores = 2;
      };
    };
    testScript = builtins.readFile ./vm/scripts/containers.py;
  };

  eval =
    let
      native = evalNode nativeNode;
      containers = evalNode containersNode;
      quadlet = containers.virtualisation.quadlet.generatedUnits;
      # Evaluating a toplevel's drvPath fails on any failed assertion, the module's or NixOS'.
      evaluated = builtins.deepSeq (
        map (config: config.system.build.toplevel.drvPath) ([ native containers ] ++ lib.attrValues examples)
      ) true;
    in
    assert evaluated;
    pkgs.runCommand "llmhop-eval"
      {
        # Each is built with `llmhop --check`: the real router validates the rendered config.
        configs = map (config: config.environment.etc."llmhop/llmhop.json".source) (
          [ native containers ] ++ lib.attrValues examples
        );
      }
      ''
        set -euo pipefail
        router=${unitFile native "llmhop.service"}
        grep -Fx "ImportCredential=llmhop.client-token" "$router"
        grep -Fx "LoadCredential=llmhop.worker-key:/etc/llmhop/worker-key" "$router"
        grep -F '"--uds" "/run/llmhop/vllm-vllm-sock/http.sock"' ${unitFile native "vllm-vllm-sock.service"}
        grep -F '"-m" "sglang.launch_server"' ${unitFile native "sglang-sglang-a.service"}

        # Podman's generator made a unit of every Quadlet file: the rootful container a system
        # unit, the rootless ones user units.
        test -f ${quadlet}/lib/systemd/system/llama-cpp-llama-root.service
        test -f ${quadlet}/lib/systemd/user/sglang-gateway.service
        for unit in vllm-vllm-sock vllm-vllm-port sglang-sglang-a sglang-sglang-b; do
          grep -q "nvidia.com/gpu=all" ${quadlet}/lib/systemd/user/$unit.service
        done
        # And of the complete example's containers.
        for unit in vllm-llama-3-8b vllm-qwen3-32b sglang-gemma-3-27b sglang-gateway; do
          test -f ${examples.complete.virtualisation.quadlet.generatedUnits}/lib/systemd/user/$unit.service
        done
        touch $out
      '';
}
