# treefmt-nix configuration: `nix fmt` and the `treefmt` check.
{
  projectRootFile = "flake.nix";
  programs = {
    nixfmt.enable = true;
    ruff-check.enable = true;
    ruff-format.enable = true;
  };
}
