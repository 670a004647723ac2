# vLLM workers (services.llmhop.vllm): `vllm serve` per model, by default in the upstream image
# as rootless Podman containers of the `vllm` user; natively (`runtime = "native"`, per backend
# or per model) as hardened units of that user, on a port or a unix socket (`--uds`).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  llmhopLib = import ../lib lib;
  framework = import ../framework { inherit lib llmhopLib; };

  backend = "vllm";
  routerCfg = config.services.llmhop;
  cfg = routerCfg.${backend};

  listenFlags =
    {
      socket,
      port,
      host ? "127.0.0.1",
    }:
    if socket != null then { uds = socket; } else { inherit host port; };
in
{
  options.services.llmhop.${backend} = framework.backendOptions {
    inherit backend cfg;
    displayName = "vLLM";
    inherit (routerCfg) socketDirectory;
    nvidiaToolkit = config.hardware.nvidia-container-toolkit.enable;
    image = "docker.io/vllm/vllm-openai";
    tag = "latest";
    defaultRuntime = "container";
    gpuDefault = true;
    parallelFlags = [
      "tensor-parallel-size"
      "pipeline-parallel-size"
      "data-parallel-size"
    ];
    modelOptions = framework.modelOption;
    extraOptions = {
      package = lib.mkPackageOption pkgs "vllm" {
        extraDescription = ''
          For the native runtime: any package or Python environment with {command}`bin/vllm`,
          e.g. `python3.withPackages (ps: [ ps.vllm ])`.
        '';
      };
    }
    // framework.native.namedUserOptions backend;
  };

  config = lib.mkIf cfg.enable (
    framework.backendConfig {
      inherit
        config
        backend
        cfg
        routerCfg
        ;
      socketGroup = cfg.group;
      nativeSystem = framework.native.namedUserConfig backend cfg;
      native =
        { model, cacheDirectory, ... }:
        framework.native.pythonServer {
          inherit cfg pkgs cacheDirectory;
          environment = {
            VLLM_CACHE_ROOT = "${cacheDirectory}/vllm";
            OUTLINES_CACHE_DIR = "${cacheDirectory}/outlines";
          };
        }
        // {
          description = "vLLM worker ${model.name}";
          command = [
            (lib.getExe' cfg.package "vllm")
            "serve"
            model.model
          ];
          dialect = "vllm";
          managedFlags = {
            served-model-name = model.name;
          }
          // listenFlags { inherit (model) socket port; };
        };
      container =
        { model, ... }:
        {
          dialect = "vllm";
          containerPort = 8000;
          cacheDirectory = "/root/.cache/huggingface";
          # Older images start the API server module, which takes no positional model.
          entrypoint = ''["vllm","serve"]'';
          positional = [ model.model ];
          managedFlags = {
            served-model-name = model.name;
          }
          // listenFlags (framework.container.listen model 8000);
        };
    }
  );
}
