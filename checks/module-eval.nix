# The module's smoke tests in Nix: evaluates the module with the harness' stubs
# (tests/nix/evaluate.nix) and checks the results with lib.runTests. It runs while the flake
# is evaluated, so `nix flake check` enforces it even with a lib-only nixpkgs and no Python:
# the module evaluates (off, and on with the router alone), the router is socket-activated,
# the quickstart's two models get their units and routes, and a port claimed twice fails.
# Every other module test (each option, refusal and helper) is pytest's, in tests/nix.
#
# Returns { ok = true; summary = "…"; } or throws naming the failed tests.
{ lib, quadlet-nix }:
let
  evaluate = import ../tests/nix/evaluate.nix { inherit lib quadlet-nix; };

  router = extra: evaluate {
    modules = [
      { services.llmhop.enable = true; }
      extra
    ];
  };

  base = router { };
  service = base.services.llmhop;

  tests = {
    testDisabledIsEmpty = {
      expr = (evaluate { }).services;
      expected = { };
    };
    testSocketActivated = {
      expr = {
        inherit (service.serviceConfig) Type Sockets SocketBindDeny;
        inherit (base.sockets.llmhop-default) listenStreams wantedBy socketConfig;
      };
      expected = {
        Type = "notify";
        Sockets = [ "llmhop-default.socket" ];
        SocketBindDeny = "any";
        listenStreams = [ "8080" ];
        wantedBy = [ "sockets.target" ];
        socketConfig.Service = "llmhop.service";
      };
    };
    testExecStart = {
      expr = builtins.match "/nix/store/[^ ]+-llmhop/bin/llmhop --config /etc/llmhop/llmhop.json" service.serviceConfig.ExecStart != null;
      expected = true;
    };
    # The quickstart's llama.cpp model (examples/nixos/quickstart.nix).
    testQuickstartLlamaModel = {
      expr =
        let
          result = router {
            services.llmhop.llama-cpp.models."qwen3-8b" = {
              port = 18001;
              settings.hf-repo = "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL";
            };
            services.llmhop.llama-cpp.enable = true;
          };
          exec = result.services.llama-cpp-qwen3-8b.serviceConfig.ExecStart;
        in
        {
          flags = lib.hasSuffix ''"--alias" "qwen3-8b" "--hf-repo" "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL" "--host" "127.0.0.1" "--metrics" "--port" "18001"'' exec;
          notify = lib.hasInfix ''"-url" "http://127.0.0.1:18001" "-health-path" "/health" "--"'' exec;
          ports = result.registries.portsRegistry;
        };
      expected = {
        flags = true;
        notify = true;
        ports = {
          "llama-cpp.models.qwen3-8b" = 18001;
          "llmhop.listen.default" = 8080;
        };
      };
    };
    testPortCollision = {
      expr =
        (router {
          services.llmhop.llama-cpp = {
            enable = true;
            models.a.port = 8080;
          };
        }).assertions;
      expected = [
        "services.llmhop: port 8080 is claimed more than once, by llama-cpp.models.a, llmhop.listen.default."
      ];
    };
    # The quickstart's vLLM model: a rootless container under its lingering user, routed.
    testQuickstartVllmContainer = {
      expr =
        let
          result = router {
            services.llmhop.vllm.models."llama-3-8b" = {
              port = 20001;
              model = "meta-llama/Meta-Llama-3-8B-Instruct";
            };
          };
        in
        {
          inherit (result.users.vllm) uid linger;
          user = lib.hasInfix "ConditionUser=60602" result.quadlet.vllm-llama-3-8b;
          published = lib.hasInfix "PublishPort=127.0.0.1:20001:8000" result.quadlet.vllm-llama-3-8b;
          route = result.registries.modelsRegistry."vllm.models.llama-3-8b".route.url;
        };
      expected = {
        uid = 60602;
        linger = true;
        user = true;
        published = true;
        route = "http://127.0.0.1:20001";
      };
    };
  };

  failures = lib.runTests tests;
  names = lib.attrNames tests;
in
{
  ok =
    if failures == [ ] then
      true
    else
      throw "llmhop module-eval failed:\n${lib.generators.toPretty { } failures}";
  summary = "llmhop module-eval: ${toString (lib.length names)} tests passed: ${lib.concatStringsSep " " names}\n";
}
