# The module-evaluation suite in Nix: evaluates the module with the harness' stubs
# (tests/nix/evaluate.nix) and checks the results with lib.runTests. It runs while the flake
# is evaluated, so `nix flake check` enforces it even with a lib-only nixpkgs.
#
# Returns { ok = true; summary = "…"; } or throws naming the failed tests.
{ lib, quadlet-nix }:
let
  evaluate = import ../tests/nix/evaluate.nix { inherit lib quadlet-nix; };
  llmhopLib = import ../modules/lib lib;

  router = extra: evaluate {
    modules = [
      { services.llmhop.enable = true; }
      extra
    ];
  };

  # True when evaluating the configuration fails (a type error, a conflict, a throw).
  fails = extra: !(builtins.tryEval (builtins.deepSeq (router extra) null)).success;

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
    testUserDeclared = {
      expr = {
        inherit (base.users.llmhop) isSystemUser group;
        user = service.serviceConfig.User;
        groups = lib.attrNames base.groups;
      };
      expected = {
        isSystemUser = true;
        group = "llmhop";
        user = "llmhop";
        groups = [ "llmhop" ];
      };
    };
    testListenHosts = {
      expr = map (host: (router { services.llmhop = { inherit host; }; }).sockets.llmhop-default.listenStreams) [
        "127.0.0.1"
        "::1"
      ];
      expected = [
        [ "127.0.0.1:8080" ]
        [ "[::1]:8080" ]
      ];
    };
    testBadHostAsserts = {
      expr = (router { services.llmhop.host = "localhost"; }).assertions;
      expected = [ ''services.llmhop.host must be empty or an IP literal, not "localhost".'' ];
    };
    testListenSettingWarns = {
      expr = lib.length (router { services.llmhop.settings.listen = ":9000"; }).warnings;
      expected = 1;
    };
    testListsConcatenate = {
      expr = lib.sort lib.lessThan (router { systemd.services.llmhop.after = [ "extra.service" ]; })
        .services.llmhop.after;
      expected = [
        "extra.service"
        "network-online.target"
      ];
    };
    testConflictingScalarsFail = {
      expr = fails { systemd.services.llmhop.serviceConfig.Type = "simple"; };
      expected = true;
    };
    testMkForceWins = {
      expr =
        (router { systemd.services.llmhop.serviceConfig.Type = lib.mkForce "simple"; })
        .services.llmhop.serviceConfig.Type;
      expected = "simple";
    };
    testTypeErrorFails = {
      expr = fails { services.llmhop.port = 70000; };
      expected = true;
    };
    testQuadletInert = {
      expr = base.quadlet == { } && base.userServices == { };
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
          flags = lib.hasSuffix ''"--alias" "qwen3-8b" "--hf-repo" "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL" "--host" "127.0.0.1" "--port" "18001"'' exec;
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
    # A GPU container without a device, and an image that moves, are warned about; a device and
    # a pinned image are not.
    testContainerWarnings = {
      expr =
        let
          warned =
            model:
            map (w: lib.head (lib.splitString " " w))
              (router {
                services.llmhop.vllm.models.m = {
                  port = 20001;
                  model = "org/m";
                }
                // model;
              }).warnings;
        in
        {
          bare = warned { };
          pinned = warned { tag = "v0.11.0"; };
          ready = warned {
            digest = "sha256:${lib.fixedWidthString 64 "0" ""}";
            devices = [ "nvidia.com/gpu=0" ];
          };
        };
      expected = {
        bare = [
          "services.llmhop.vllm.models.m:"
          "services.llmhop.vllm.models.m"
        ];
        pinned = [ "services.llmhop.vllm.models.m:" ];
        ready = [ ];
      };
    };
    # A native vLLM beside vLLM containers; NCCL follows tensor-parallel-size.
    testPerModelRuntime = {
      expr =
        let
          result = router {
            services.llmhop.vllm.models = {
              box = {
                port = 20001;
                model = "org/box";
              };
              native = {
                runtime = "native";
                port = 20002;
                model = "org/native";
                settings.tensor-parallel-size = 2;
              };
            };
          };
          native = result.services.vllm-native;
        in
        {
          containers = lib.attrNames result.quadlet;
          nativeUser = native.serviceConfig.User;
          nccl = native.environment.NCCL_SOCKET_IFNAME;
          bind = native.serviceConfig.SocketBindAllow;
        };
      expected = {
        containers = [ "vllm-box" ];
        nativeUser = "vllm";
        nccl = "lo";
        bind = "tcp";
      };
    };
    # Quadlet copies Exec= into ExecStart=: `%` and `$` must reach the server as written.
    testContainerValuesEscaped = {
      expr =
        lib.hasInfix "'--chat-template=100%% $$x'"
          (router {
            services.llmhop.vllm.models.m = {
              port = 20001;
              model = "org/m";
              settings.chat-template = "100% $x";
            };
          }).quadlet.vllm-m;
      expected = true;
    };
    testGatewayCredentialNameAsserts = {
      expr = lib.length (router {
        services.llmhop.sglang = {
          models.m = {
            port = 30001;
            model = "org/m";
          };
          gateway = {
            enable = true;
            port = 19000;
            credentials."a/b" = "/run/secrets/x";
          };
        };
      }).assertions;
      expected = 1;
    };
    testCliDialects = {
      expr = {
        vllm = llmhopLib.renderCliArgs "vllm" {
          max-model-len = 8192;
          enable-prefix-caching = false;
          lora-paths = [
            "x=/p/x"
            "y=/p/y"
          ];
          speculative-config = {
            model = "d";
            num_speculative_tokens = 3;
          };
          temperature = 0.6;
          dropped = null;
        };
        llama = llmhopLib.renderCliArgs "llama-cpp" {
          lora = [
            "a"
            "b"
          ];
          no-mmap = false;
          jinja = true;
        };
        sglang = llmhopLib.renderCliArgsShell "sglang" {
          port = 30000;
          worker-urls = [
            "http://a"
            "http://b"
          ];
          enable-metrics = false;
        };
      };
      expected = {
        vllm = [
          "--no-enable-prefix-caching"
          "--lora-paths"
          "x=/p/x"
          "y=/p/y"
          "--max-model-len"
          "8192"
          "--speculative-config"
          ''{"model":"d","num_speculative_tokens":3}''
          "--temperature"
          "0.6"
        ];
        llama = [
          "--jinja"
          "--lora"
          "a"
          "--lora"
          "b"
          "--mmap"
        ];
        sglang = "'--port=30000' --worker-urls http://a http://b";
      };
    };
    testUnknownCredentialReferenceThrows = {
      expr =
        (builtins.tryEval (
          llmhopLib.resolveCredentialRefs {
            names = [ "a" ];
            directory = "%d";
          } { key = "\${cred:missing}"; }
        ).key).success;
      expected = false;
    };
    testIpLiterals = {
      expr = map llmhopLib.isListenHost [
        ""
        "0.0.0.0"
        "::"
        "fe80::1"
        "2001:db8:0:0:0:0:0:1"
        "256.1.1.1"
        "localhost"
        "[::1]"
        "1:2:3:4:5:6:7:8:9"
      ];
      expected = [
        true
        true
        true
        true
        true
        false
        false
        false
        false
      ];
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
