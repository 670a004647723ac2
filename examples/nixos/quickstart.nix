# The shortest useful configuration: one llama.cpp model natively, one vLLM model in a container,
# both routed (docs/module.md shows it).
{
  services.llmhop = {
    enable = true;
    llama-cpp.models."qwen3-8b" = {
      port = 18001;
      settings.hf-repo = "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL";
    };
    vllm.models."llama-3-8b" = {
      port = 20001;
      model = "meta-llama/Meta-Llama-3-8B-Instruct";
    };
  };
}
