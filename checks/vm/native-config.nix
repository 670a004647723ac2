# The llmhop part of the vm-native node (checks/vm.nix), also evaluated here by
# tests/nix/test_nix_vm_checks.py: the router on TCP and a unix socket, its token and the hosted
# provider's key imported from the system credstore, and native llama.cpp, vLLM and SGLang
# workers whose servers are fakes (`fakeEngine`: fake_engine.py under the real programs' names).
{ lib, fakeEngine, ... }:
{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1";
    port = 8080;
    listen.local = { }; # /run/llmhop/local.sock

    credentials = {
      # ImportCredential=: /etc/credstore/<name>.
      "llmhop.client-token" = { };
      "llmhop.upstream-key" = { };
      "llmhop.worker-key" = "/etc/llmhop/worker-key";
    };

    settings = {
      authTokens = [ "\${cred:llmhop.client-token}" ];
      models = {
        hosted = {
          url = "http://127.0.0.1:9000";
          headers.Authorization = "Bearer \${cred:llmhop.upstream-key}";
        };
        # Extends the route the worker registers.
        llama-sock.headers.Authorization = "Bearer \${cred:llmhop.worker-key}";
      };
    };

    llama-cpp = {
      package = fakeEngine;
      models = {
        # On a unix socket (no port), with an API key; loading until the test says so.
        llama-sock = {
          credentials.api-keys = "/etc/llmhop/worker-key";
          settings = {
            api-key-file = "\${cred:api-keys}";
            fake-ready-file = "/run/llmhop-vm/llama-sock.ready";
          };
        };
        llama-port = {
          port = 18001;
          settings = {
            hf-repo = "fake/llama-GGUF:Q4_K_M";
            ctx-size = 2048;
            jinja = true;
          };
        };
        dying.settings.fake-die-while-loading = true;
      };
    };

    vllm = {
      runtime = "native";
      package = fakeEngine;
      models = {
        # On a unix socket (--uds), with a Hugging Face token as a credential.
        vllm-sock = {
          model = "fake/vllm-sock";
          credentials.hf-token = "/etc/llmhop/hf-token";
          environment.HF_TOKEN_PATH = "/run/credentials/vllm-vllm-sock.service/hf-token";
        };
        vllm-port = {
          port = 20001;
          model = "fake/vllm-port";
          settings.max-model-len = 4096;
        };
      };
    };

    sglang = {
      runtime = "native";
      package = fakeEngine; # its bin/python takes `-m sglang.launch_server`
      models.sglang-a = {
        port = 30001;
        model = "fake/sglang-a";
        settings.mem-fraction-static = 0.5;
      };
    };
  };

  # Started by the test script: one is watched from `activating` on, one must fail.
  systemd.services = {
    llama-cpp-llama-sock.wantedBy = lib.mkForce [ ];
    llama-cpp-dying.wantedBy = lib.mkForce [ ];
  };
}
