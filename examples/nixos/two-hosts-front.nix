{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1";
    credentials."llmhop.gpu-host-token" = "/run/secrets/llmhop/gpu-host-token";

    # Served here: one vLLM container per GPU, both behind the route `qwen3-32b`.
    vllm = {
      tag = "v0.11.0";
      models.qwen3-32b = {
        port = 20001; # and 20002 for the second replica
        model = "Qwen/Qwen3-32B";
        replicas = [
          { gpus = [ "0" ]; }
          { gpus = [ "1" ]; }
        ];
      };
    };

    # Served by two GPU hosts (two-hosts-gpu.nix), through their routers.
    settings.models.llama-3-70b.urls = [
      {
        url = "http://10.0.0.2:8080";
        headers.Authorization = "Bearer \${cred:llmhop.gpu-host-token}";
      }
      {
        url = "http://10.0.0.3:8080";
        headers.Authorization = "Bearer \${cred:llmhop.gpu-host-token}";
      }
    ];
  };
}
