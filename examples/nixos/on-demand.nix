# One 24 GiB GPU, three models: a coder and a chat model that each need most of it, started
# when a request names them and swapped for each other, and a small embedding model that
# stays loaded beside whichever of them runs.
{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1";
    # A request waits up to 15 minutes for its model's turn (the default is 10).
    settings.queueTimeout = 900;

    llama-cpp = {
      modelSettings.n-gpu-layers = 99;
      environment.CUDA_VISIBLE_DEVICES = "0";
      models = {
        qwen3-coder = {
          gpu = true;
          group = "gpu0";
          onDemand = {
            enable = true;
            idleTimeout = "15min";
          };
          settings.hf-repo = "unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF:UD-Q4_K_XL";
        };
        gemma-3-27b = {
          gpu = true;
          group = "gpu0";
          onDemand.enable = true; # stopped after 10 idle minutes
          settings.hf-repo = "unsloth/gemma-3-27b-it-GGUF:Q4_K_M";
        };
        embed = {
          gpu = true;
          settings = {
            hf-repo = "Qwen/Qwen3-Embedding-0.6B-GGUF:Q8_0";
            embeddings = true;
          };
        };
      };
    };
  };
}
