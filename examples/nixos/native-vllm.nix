{ pkgs, ... }:
{
  services.llmhop = {
    enable = true;
    vllm = {
      runtime = "native";
      package = pkgs.vllm; # the default; any Python environment with bin/vllm works
      environment.CUDA_VISIBLE_DEVICES = "0";
      models.llama-3-8b.model = "meta-llama/Meta-Llama-3-8B-Instruct";
    };
  };
}
