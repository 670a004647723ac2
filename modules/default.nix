# services.llmhop: the router and the backends that run its workers.
{
  imports = [
    ./router.nix
    ./backends/llama-cpp.nix
    ./backends/vllm.nix
    ./backends/sglang.nix
  ];
}
