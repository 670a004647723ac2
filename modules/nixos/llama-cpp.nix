# llama.cpp workers (services.llmhop.llama-cpp): `llama-server` per model, natively under
# DynamicUser with the static group `llama-cpp` owning the sockets, or in the upstream image.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  llmhopLib = import ../lib lib;
  framework = import ../framework { inherit lib llmhopLib; };

  backend = "llama-cpp";
  routerCfg = config.services.llmhop;
  cfg = routerCfg.${backend};
  nvidiaToolkit = config.hardware.nvidia-container-toolkit.enable;

  # llama-server binds a unix socket when --host ends in .sock.
  listenFlags =
    {
      socket,
      port,
      host ? "127.0.0.1",
    }:
    if socket != null then { host = socket; } else { inherit host port; };
in
{
  options.services.llmhop.${backend} = framework.backendOptions {
    inherit backend cfg nvidiaToolkit;
    displayName = "llama.cpp";
    inherit (routerCfg) socketDirectory;
    image = "ghcr.io/ggml-org/llama.cpp";
    tag = if nvidiaToolkit then "server-cuda" else "server";
    extraOptions = {
      package = lib.mkPackageOption pkgs "llama-cpp" {
        extraDescription = "It provides {command}`bin/llama-server`.";
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
      (framework.backendConfig {
        inherit
          config
          backend
          cfg
          routerCfg
          ;
        socketGroup = cfg.group;
        # Rebuilt from every commit; `server-b<build>` and `server-cuda-b<build>` stay put.
        movingTags = [
          "server"
          "server-cuda"
          "server-rocm"
          "server-vulkan"
          "server-intel"
          "server-musa"
        ];
        native =
          { model, cacheDirectory, ... }:
          {
            description = "llama.cpp worker ${model.name}";
            command = [ (lib.getExe' cfg.package "llama-server") ];
            dialect = "llama-cpp";
            managedFlags = {
              alias = model.name;
            }
            // listenFlags { inherit (model) socket port; };
            environment.LLAMA_CACHE = cacheDirectory;
            identity =
              {
                Group = cfg.group;
              }
              // (if cfg.user == null then { DynamicUser = true; } else { User = cfg.user; });
          };
        container =
          { model, ... }:
          {
            dialect = "llama-cpp";
            containerPort = 8080;
            cacheDirectory = "/root/.cache/llama.cpp";
            cacheVariable = "LLAMA_CACHE";
            managedFlags = {
              alias = model.name;
            }
            // listenFlags (framework.container.listen model 8080);
          };
      })
      { users.groups = lib.mkIf (cfg.group == backend) { ${backend} = { }; }; }
    ]
  );
}
