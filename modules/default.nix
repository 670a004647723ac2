# services.llmhop: the router and the backends that run its workers. The NixOS modules are in
# nixos/; they are built from the backend framework (framework/) and pure helpers (lib/).
{
  imports = [
    ./nixos/router.nix
    ./nixos/registries.nix
    ./nixos/llama-cpp.nix
    ./nixos/vllm.nix
    ./nixos/sglang.nix
    ./nixos/sglang-gateway.nix
  ];
}
