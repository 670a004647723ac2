{
  description = "llmhop: one OpenAI-compatible endpoint in front of many local LLM servers";

  inputs = {
    nixpkgs.url = "github:nixos/nixpkgs/nixos-unstable";
    flake-parts.url = "github:hercules-ci/flake-parts";
    systems.url = "github:nix-systems/default";
    quadlet-nix = {
      url = "github:mirkolenz/quadlet-nix/v1";
      inputs.nixpkgs.follows = "nixpkgs";
      inputs.flake-parts.follows = "flake-parts";
    };
    treefmt-nix = {
      url = "github:numtide/treefmt-nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    inputs@{
      self,
      flake-parts,
      nixpkgs,
      quadlet-nix,
      treefmt-nix,
      ...
    }:
    flake-parts.lib.mkFlake { inherit inputs; } (
      { lib, ... }:
      {
        systems = import inputs.systems;

        flake = {
          # The whole module, quadlet-nix included; quadlet-nix stays inert until a
          # backend runs containers.
          nixosModules.default = {
            imports = [
              quadlet-nix.nixosModules.quadlet
              ./modules
            ];
          };

          overlays.default = final: _prev: {
            llmhop = final.callPackage ./pkgs/llmhop/package.nix { };
          };

          # Pure helpers of the module; they need nothing but nixpkgs' lib.
          lib = import ./modules/lib lib;
        };

        perSystem =
          { system, ... }:
          let
            # Full nixpkgs is absent when nixpkgs is overridden with a lib-only flake
            # (see docs/nix.md); everything that needs packages is guarded by `hasPkgs`.
            pkgs = nixpkgs.legacyPackages.${system} or { };
            hasPkgs = pkgs ? callPackage;
            isLinux = lib.hasSuffix "-linux" system;

            # The module-evaluation suite runs while the flake is evaluated, so it is
            # enforced even without packages.
            moduleEval = import ./checks/module-eval.nix {
              inherit lib;
              quadlet-nix = quadlet-nix.outPath;
            };

            llmhop = pkgs.callPackage ./pkgs/llmhop/package.nix { };

            treefmt = treefmt-nix.lib.evalModule pkgs ./checks/treefmt.nix;
          in
          {
            packages = lib.optionalAttrs hasPkgs {
              inherit llmhop;
              default = llmhop;
            };

            devShells = lib.optionalAttrs hasPkgs {
              default = pkgs.mkShell {
                packages = [
                  (pkgs.python3.withPackages (ps: [ ps.pytest ]))
                  pkgs.ruff
                  pkgs.nixfmt
                  pkgs.nix
                  treefmt.config.build.wrapper
                ];
              };
            };

            formatter = lib.mkIf hasPkgs treefmt.config.build.wrapper;

            checks = builtins.seq moduleEval.ok (
              lib.optionalAttrs hasPkgs {
                inherit llmhop;
                module-eval = pkgs.writeText "llmhop-module-eval" moduleEval.summary;
                treefmt = treefmt.config.build.check self;
              }
              // lib.optionalAttrs (isLinux && pkgs ? testers && pkgs.testers ? runNixOSTest) (
                import ./checks/vm.nix {
                  inherit pkgs;
                  module = self.nixosModules.default;
                }
              )
            );
          };
      }
    );
}
