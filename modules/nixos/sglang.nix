# SGLang workers (services.llmhop.sglang): one server per model, by default in the upstream
# image as rootless Podman containers of the `sglang` user, natively (`runtime = "native"`, per
# backend or per model) as hardened units of that user. SGLang serves no unix socket: every
# model needs a port. The SGL Model Gateway in front of them is sglang-gateway.nix.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  framework = import ../framework lib;

  cfg = config.services.llmhop.sglang;

  servedFlags = workload: {
    model-path = framework.modelPath workload;
    served-model-name = workload.model.name;
  };
in
framework.backendModule (
  framework.pythonBackend
  // {
    inherit config pkgs;
    backend = "sglang";
    displayName = "SGLang";
    image = "docker.io/lmsysorg/sglang";
    socketCapable = false;
    metricsFlag = "enable-metrics";
    parallelFlags = [
      "tp-size"
      "tensor-parallel-size"
      "pp-size"
      "pipeline-parallel-size"
      "dp-size"
      "data-parallel-size"
    ];

    extraOptions.package = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.package lib.types.path);
      default =
        if (pkgs.python3Packages or { }) ? sglang then pkgs.python3.withPackages (ps: [ ps.sglang ]) else null;
      defaultText = lib.literalMD "`python3.withPackages (ps: [ ps.sglang ])` where nixpkgs has SGLang, else `null`";
      description = ''
        SGLang for the native runtime: a Python environment providing the `sglang` module
        (its {command}`bin/python` runs `-m sglang.launch_server`).
      '';
    };

    nativeUnavailable =
      if cfg.package == null then
        ''services.llmhop.sglang.package is null (nixpkgs has no SGLang here): set it to a Python environment providing the sglang module, or use runtime = "container".''
      else
        null;
    # The gateway (sglang-gateway.nix) runs under the container runtime's user.
    containersWanted = cfg.gateway.enable;

    native =
      {
        model,
        cacheDirectory,
        listen,
        weights,
        ...
      }:
      framework.native.pythonServer { inherit cfg pkgs cacheDirectory; }
      // {
        description = "SGLang worker ${model.name}";
        command = [
          "${toString cfg.package}/bin/python"
          "-m"
          "sglang.launch_server"
        ];
        dialect = "sglang";
        managedFlags = servedFlags { inherit model weights; } // {
          host = "127.0.0.1";
          inherit (listen) port;
        };
      };

    container =
      workload:
      {
        dialect = "sglang";
        containerPort = 30000;
        cacheDirectory = "/root/.cache/huggingface";
        # Every SGLang image has the module; `sglang serve` only the releases after 0.5.1.
        entrypoint = ''["python3","-m","sglang.launch_server"]'';
        managedFlags = servedFlags workload // {
          host = "0.0.0.0";
          port = 30000;
        };
      };
  }
)
