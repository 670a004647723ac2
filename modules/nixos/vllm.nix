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
  framework = import ../framework lib;

  cfg = config.services.llmhop.vllm;

  listenFlags = framework.listenFlags "uds";
  servedFlags = model: { served-model-name = model.name; };
in
framework.backendModule (
  framework.pythonBackend
  // {
    inherit config pkgs;
    backend = "vllm";
    displayName = "vLLM";
    image = "docker.io/vllm/vllm-openai";
    parallelFlags = [
      "tensor-parallel-size"
      "pipeline-parallel-size"
      "data-parallel-size"
    ];

    extraOptions.package = lib.mkPackageOption pkgs "vllm" {
      extraDescription = ''
        For the native runtime: any package or Python environment with {command}`bin/vllm`,
        e.g. `python3.withPackages (ps: [ ps.vllm ])`.
      '';
    };

    native =
      {
        model,
        cacheDirectory,
        listen,
        weights,
        ...
      }:
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
          (framework.modelPath { inherit model weights; })
        ];
        dialect = "vllm";
        managedFlags = servedFlags model // listenFlags listen;
      };

    container =
      { model, ... }@workload:
      {
        dialect = "vllm";
        containerPort = 8000;
        cacheDirectory = "/root/.cache/huggingface";
        # Older images start the API server module, which takes no positional model.
        entrypoint = ''["vllm","serve"]'';
        positional = [ (framework.modelPath workload) ];
        managedFlags = servedFlags model // listenFlags (framework.container.listen workload 8000);
      };
  }
)
