# Pure helpers of the llmhop NixOS module, exported as the flake's `lib`; they need nothing but
# nixpkgs' lib. One file per concern, each given the whole set (`llmhopLib`) so that helpers
# may use each other across files.
lib:
lib.fix (
  llmhopLib:
  lib.foldl' (helpers: file: helpers // import file { inherit lib llmhopLib; }) { } [
    ./network.nix
    ./flags.nix
    ./credentials.nix
    ./systemd.nix
    ./assertions.nix
  ]
)
