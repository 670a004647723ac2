# llama.cpp workers (services.llmhop.llama-cpp): `llama-server` per model, natively under
# DynamicUser with the static group `llama-cpp` owning the sockets.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  llmhopLib = import ../lib.nix lib;
  common = import ./common.nix { inherit lib llmhopLib; };

  backend = "llama-cpp";
  routerCfg = config.services.llmhop;
  cfg = routerCfg.${backend};
in
{
  options.services.llmhop.${backend} = common.backendOptions {
    inherit backend;
    displayName = "llama.cpp";
    inherit (routerCfg) socketDirectory;
    extraOptions = {
      package = lib.mkPackageOption pkgs "llama-cpp" { } // {
        description = "The llama.cpp package; it provides {command}`bin/llama-server`.";
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "llama";
        description = "The user of every model; `null` gives each unit a `DynamicUser=`.";
      };
      group = mkOption {
        type = types.str;
        default = backend;
        description = ''
          The group of every model, owning its socket directory; the router joins it.
          Declared by the module under its default name, even with `DynamicUser=`.
        '';
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (common.backendConfig {
        inherit backend cfg routerCfg;
        socketGroup = cfg.group;
        native =
          { model, cacheDirectory, ... }:
          {
            description = "llama.cpp worker ${model.name}";
            command = [ (lib.getExe' cfg.package "llama-server") ];
            dialect = "llama-cpp";
            # llama-server binds a unix socket when --host ends in .sock.
            managedFlags = {
              alias = model.name;
            }
            // (
              if model.socket != null then
                { host = model.socket; }
              else
                {
                  host = "127.0.0.1";
                  inherit (model) port;
                }
            );
            environment.LLAMA_CACHE = cacheDirectory;
            identity =
              {
                Group = cfg.group;
              }
              // (if cfg.user == null then { DynamicUser = true; } else { User = cfg.user; });
          };
      })
      { users.groups = lib.mkIf (cfg.group == backend) { ${backend} = { }; }; }
    ]
  );
}
