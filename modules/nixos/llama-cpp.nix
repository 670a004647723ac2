# llama.cpp workers (services.llmhop.llama-cpp): `llama-server` per model, natively under
# DynamicUser with the static group `llama-cpp` owning the sockets, or in the upstream image.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  framework = import ../framework lib;

  cfg = config.services.llmhop.llama-cpp;

  # llama-server binds a unix socket when --host ends in .sock.
  listenFlags = framework.listenFlags "host";

  # Declared weights: their file, as the server sees it.
  weightsFlags = weights: lib.optionalAttrs (weights != null) { model = weights.path; };
in
framework.backendModule {
  inherit config pkgs;
  backend = "llama-cpp";
  singleFileWeights = true;
  # Off by default in llama-server.
  metricsFlag = "metrics";
  displayName = "llama.cpp";
  image = "ghcr.io/ggml-org/llama.cpp";
  tag = if config.hardware.nvidia-container-toolkit.enable then "server-cuda" else "server";
  tagText = lib.literalExpression ''if config.hardware.nvidia-container-toolkit.enable then "server-cuda" else "server"'';
  # Rebuilt from every commit; `server-b<build>` and `server-cuda-b<build>` stay put.
  movingTags = [
    "server"
    "server-cuda"
    "server-rocm"
    "server-vulkan"
    "server-intel"
    "server-musa"
  ];

  extraOptions = {
    package = lib.mkPackageOption pkgs "llama-cpp" {
      extraDescription = "It provides {command}`bin/llama-server`.";
    };
    user = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "llama";
      description = ''
        The user of every model; `null` gives each model a `DynamicUser=` named
        `llama-cpp-<name>`, shared by its replicas (where systemd would refuse that name:
        shortened to 31 characters, `.` as `-`, with a hash of the name).
      '';
    };
    group = lib.mkOption {
      type = lib.types.str;
      default = "llama-cpp";
      description = ''
        The group of every model, owning its socket directory; the router joins it.
        Declared by the module under its default name, even with `DynamicUser=`.
      '';
    };
  };

  native =
    {
      model,
      cacheDirectory,
      listen,
      weights,
      ...
    }:
    {
      description = "llama.cpp worker ${model.name}";
      command = [ (lib.getExe' cfg.package "llama-server") ];
      dialect = "llama-cpp";
      managedFlags = {
        alias = model.name;
      }
      // weightsFlags weights
      // listenFlags listen;
      environment.LLAMA_CACHE = cacheDirectory;
      identity = {
        Group = cfg.group;
      }
      // (
        if cfg.user == null then
          {
            DynamicUser = true;
            # Named after the model, not the unit: its replicas share one UID, and so the
            # cache and state directories, which systemd would otherwise hand from one to the
            # other at every start.
            User = framework.llmhopLib.dynamicUserName "llama-cpp-${model.name}";
          }
        else
          { User = cfg.user; }
      );
    };

  container =
    { model, ... }@workload:
    {
      dialect = "llama-cpp";
      containerPort = 8080;
      cacheDirectory = "/root/.cache/llama.cpp";
      cacheVariable = "LLAMA_CACHE";
      managedFlags = {
        alias = model.name;
      }
      // weightsFlags workload.weights
      // listenFlags (framework.container.listen workload 8080);
    };

  extraConfig.users.groups = lib.mkIf (cfg.group == "llama-cpp") { llama-cpp = { }; };
}
