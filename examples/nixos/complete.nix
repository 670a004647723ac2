{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1"; # the default listener: TCP 127.0.0.1:8080
    listen.caddy.socketGroup = "caddy"; # and /run/llmhop/caddy.sock for a reverse proxy

    # systemd credentials: a file, an encrypted file, or imported from /etc/credstore.
    credentials = {
      "llmhop.client-token" = { };
      "llmhop.openai-key" = "/run/secrets/openai-key";
      "llmhop.worker-key" = "/run/secrets/worker-key";
    };

    settings = {
      authTokens = [ "\${cred:llmhop.client-token}" ];
      maxConcurrentRequests = 32;
      shutdownTimeout = 120; # TimeoutStopSec= becomes 130
      metricsAuth = true;
      models = {
        openai-gpt-4o = {
          url = "https://api.openai.com";
          headers.Authorization = "Bearer \${cred:llmhop.openai-key}";
        };
        # Extends the route the worker below registers (a second `url` would be a collision).
        gemma.headers.Authorization = "Bearer \${cred:llmhop.worker-key}";
      };
    };

    # vLLM in rootless containers (the default runtime) of the user `vllm`, on the GPUs whose
    # CDI names hardware.nvidia-container-toolkit provides, and one model natively.
    vllm = {
      tag = "v0.11.0";
      models = {
        "llama-3-8b" = {
          port = 20001;
          model = "meta-llama/Meta-Llama-3-8B-Instruct";
          devices = [ "nvidia.com/gpu=0" ];
          # GPU 0 is shared with llama.cpp's gemma: vLLM takes three quarters of it.
          settings.gpu-memory-utilization = 0.75;
        };
        # On a unix socket (--uds), pinned by digest, with the Hugging Face token.
        qwen3-32b = {
          model = "Qwen/Qwen3-32B-FP8"; # 33 GB of weights leave an 80 GB card room for cache
          digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
          devices = [ "nvidia.com/gpu=1" ];
          shmSize = "16g";
          # Loaded by the user's manager: the file must be readable by the user vllm.
          credentials."llmhop.hf-token" = "/run/secrets/vllm/hf-token";
          environment.HF_TOKEN_PATH = "/run/llmhop/credentials/llmhop.hf-token";
          settings.max-model-len = 32768;
        };
        # A hardened system unit of the same user running pkgs.vllm, on a unix socket, tensor
        # parallel over four GPUs (so NCCL, over loopback): 35 GB of weights on each.
        llama-3-70b = {
          runtime = "native";
          model = "meta-llama/Llama-3.3-70B-Instruct";
          environment.CUDA_VISIBLE_DEVICES = "3,4,5,6";
          settings = {
            tensor-parallel-size = 4;
            max-model-len = 32768;
          };
        };
      };
    };

    # SGLang containers (always on a port), started after one another, behind the SGL Model
    # Gateway, which llmhop routes to as `sglang`; a GPU each.
    sglang = {
      tag = "v0.5.10.post1-cu130"; # a release, not the moving `latest`
      devices = [ "nvidia.com/gpu=2" ];
      models = {
        gemma-3-27b = {
          port = 30001;
          model = "google/gemma-3-27b-it";
        };
        mistral-small = {
          port = 30002;
          model = "mistralai/Mistral-Small-3.2-24B-Instruct-2506";
          devices = [ "nvidia.com/gpu=7" ];
          settings.mem-fraction-static = 0.85; # weights and cache: 48 + 20 GB
        };
      };
      gateway = {
        enable = true;
        tag = "v0.3.2";
        port = 30000;
        route = "sglang";
        settings.policy = "cache_aware";
      };
    };

    llama-cpp = {
      enable = true;
      modelSettings.ctx-size = 8192; # every model
      models = {
        # On a loopback port, as in the quickstart.
        "qwen3-8b" = {
          port = 18001;
          settings.hf-repo = "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL";
        };
        # On a unix socket (no port), with an API key and a GPU.
        gemma = {
          gpu = true;
          environment.CUDA_VISIBLE_DEVICES = "0";
          credentials.api-keys = "/run/secrets/worker-key";
          settings = {
            hf-repo = "unsloth/gemma-3-4b-it-GGUF:Q4_K_M";
            api-key-file = "\${cred:api-keys}"; # --api-key-file %d/api-keys
            n-gpu-layers = 99;
            jinja = true;
          };
          serviceConfig.MemoryMax = "24G";
        };
      };
    };
  };
}
