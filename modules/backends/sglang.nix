# SGLang workers (services.llmhop.sglang): one server per model, by default in the upstream
# image as rootless Podman containers of the `sglang` user, natively (`runtime = "native"`, per
# backend or per model) as hardened units of that user. SGLang serves no unix socket: every
# model needs a port. `gateway` runs the SGL Model Gateway in front of the workers.
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
  inherit (common) containerLib;

  backend = "sglang";
  routerCfg = config.services.llmhop;
  cfg = routerCfg.${backend};
  gateway = cfg.gateway;

  servedFlags = model: {
    model-path = model.model;
    served-model-name = model.name;
  };

  workers = lib.filter (m: m.enable) (lib.attrValues cfg.models);
  workerUrls = map (m: "http://127.0.0.1:${toString m.port}") workers;
  # The gateway waits for the workers its manager knows: containers under the same user, and
  # native units only when the gateway itself is a system unit. Any other worker is waited
  # for by the gateway (its worker startup timeout).
  rootless = cfg.quadlet.user != null;
  workerUnits = map (m: "${backend}-${m.name}.service") (
    lib.filter (m: m.runtime == "container" || !rootless) workers
  );

  gatewayTls = gateway.settings.tls-cert-path or null != null;
  gatewayUrl = "${if gatewayTls then "https" else "http"}://${containerLib.reachable gateway.bindAddress}:${toString gateway.port}";

  gatewayOptions =
    containerLib.imageOptions {
      image = "docker.io/lmsysorg/sgl-model-gateway";
      tag = "latest";
      what = "the gateway";
    }
    // {
      enable = lib.mkEnableOption "the SGL Model Gateway in front of the SGLang workers (a container)";
      digest = mkOption {
        type = types.nullOr containerLib.digestType;
        default = null;
        example = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        description = "The image digest, instead of `tag`: the same image on every start, never pulled again.";
      };
      bindAddress = mkOption {
        type = types.str;
        default = "127.0.0.1";
        description = "The address the gateway listens on (host network); its health check uses it, a wildcard as loopback.";
      };
      port = mkOption {
        type = types.port;
        example = 30000;
        description = "The gateway's port.";
      };
      enableMetrics = mkOption {
        type = types.bool;
        default = true;
        description = "Whether the gateway serves Prometheus metrics on `bindAddress`:`metricsPort`.";
      };
      metricsPort = mkOption {
        type = types.port;
        default = 29000;
        description = "The port of the gateway's metrics.";
      };
      route = mkOption {
        type = types.nullOr (types.strMatching llmhopLib.modelNamePattern);
        default = null;
        example = "sglang";
        description = "Register the gateway with llmhop under this routing key; `null` does not.";
      };
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = "Environment variables of the gateway.";
      };
      environmentFile = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        description = "An `EnvironmentFile=` of the gateway.";
      };
      credentials = llmhopLib.mkCredentialsOption "the gateway";
      settings = mkOption {
        type = common.settingsType;
        default = { };
        example = {
          policy = "cache_aware";
        };
        description = ''
          Flags of the gateway, over its defaults `enable-igw = true` and `worker-urls` (every
          enabled model). `false` is dropped (write `disable-x = true`). The listener and
          metrics flags are managed. `''${cred:name}` becomes the path of credential `name`.
        '';
      };
      quadlet = containerLib.quadletLayers "the gateway's container";
    };

  gatewayContainer =
    let
      settings = llmhopLib.resolveCredentialRefs {
        names = lib.attrNames gateway.credentials;
        directory = containerLib.credentialsMount;
      } gateway.settings;
      managedFlags = {
        host = gateway.bindAddress;
        inherit (gateway) port;
      }
      // lib.optionalAttrs gateway.enableMetrics {
        prometheus-host = gateway.bindAddress;
        prometheus-port = gateway.metricsPort;
      };
    in
    containerLib.quadletContainer {
      uid = if rootless then cfg.quadlet.user.uid else null;
      layers = [ gateway.quadlet ];
      inherit (gateway) credentials;
      containerConfig =
        containerLib.imageOf {
          model = gateway;
          backendCfg = gateway;
        }
        // {
          Network = "host";
          Exec = llmhopLib.escapeSystemdValue (
            llmhopLib.renderCliArgsShell "sglang-gateway" (
              {
                enable-igw = true;
                worker-urls = workerUrls;
              }
              // settings
              // managedFlags
            )
          );
          Environment = lib.mapAttrs (_: llmhopLib.escapeSystemdValue) gateway.environment;
          EnvironmentFile = lib.optional (gateway.environmentFile != null) gateway.environmentFile;
          NoNewPrivileges = true;
          DropCapability = "all";
          Tmpfs = "/tmp";
          Notify = "healthy";
          HealthCmd = containerLib.pythonHealthCheck {
            url = "${gatewayUrl}/health";
            insecure = gatewayTls;
          };
          HealthStartPeriod = "5m";
          HealthInterval = "10s";
          HealthTimeout = "5s";
        };
      volumes = lib.optional (gateway.credentials != { }) "%d:${containerLib.credentialsMount}:ro";
      serviceConfig = {
        Restart = "always";
        RestartSec = 10;
        TimeoutStartSec = 600;
      };
      unitConfig = {
        StartLimitBurst = 5;
        StartLimitIntervalSec = 600;
        After = workerUnits;
        Requires = workerUnits;
      };
    };
in
{
  options.services.llmhop.${backend} = common.backendOptions {
    inherit backend cfg;
    displayName = "SGLang";
    inherit (routerCfg) socketDirectory;
    nvidiaToolkit = config.hardware.nvidia-container-toolkit.enable;
    image = "docker.io/lmsysorg/sglang";
    tag = "latest";
    defaultRuntime = "container";
    gpuDefault = true;
    socketCapable = false;
    parallelFlags = [
      "tp-size"
      "tensor-parallel-size"
      "pp-size"
      "pipeline-parallel-size"
      "dp-size"
      "data-parallel-size"
    ];
    modelOptions = common.modelOption;
    extraOptions = {
      package = mkOption {
        type = types.nullOr (types.either types.package types.path);
        default =
          if (pkgs.python3Packages or { }) ? sglang then pkgs.python3.withPackages (ps: [ ps.sglang ]) else null;
        defaultText = lib.literalMD "`python3.withPackages (ps: [ ps.sglang ])` where nixpkgs has SGLang, else `null`";
        description = ''
          SGLang for the native runtime: a Python environment providing the `sglang` module
          (its {command}`bin/python` runs `-m sglang.launch_server`).
        '';
      };
      gateway = gatewayOptions;
    }
    // common.namedUserOptions backend;
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      (common.backendConfig {
        inherit
          config
          backend
          cfg
          routerCfg
          ;
        socketGroup = cfg.group;
        nativeSystem = common.namedUserConfig backend cfg;
        containersWanted = gateway.enable;
        nativeUnavailable =
          if cfg.package == null then
            ''services.llmhop.sglang.package is null (nixpkgs has no SGLang here): set it to a Python environment providing the sglang module, or use runtime = "container".''
          else
            null;
        native =
          { model, cacheDirectory, ... }:
          common.pythonServer { inherit cfg pkgs cacheDirectory; }
          // {
            description = "SGLang worker ${model.name}";
            command = [
              "${toString cfg.package}/bin/python"
              "-m"
              "sglang.launch_server"
            ];
            dialect = "sglang";
            managedFlags = servedFlags model // {
              host = "127.0.0.1";
              inherit (model) port;
            };
          };
        container =
          { model, ... }:
          {
            dialect = "sglang";
            containerPort = 30000;
            cacheDirectory = "/root/.cache/huggingface";
            # Every SGLang image has the module; `sglang serve` only the releases after 0.5.1.
            entrypoint = ''["python3","-m","sglang.launch_server"]'';
            managedFlags = servedFlags model // {
              host = "0.0.0.0";
              port = 30000;
            };
          };
      })
      (lib.mkIf gateway.enable {
        assertions = map (name: {
          assertion = false;
          message = ''services.llmhop.sglang.gateway.credentials."${name}": a credential name is one path component matching ${llmhopLib.credentialNamePattern}.'';
        }) (llmhopLib.invalidCredentialNames gateway.credentials);
        warnings = containerLib.unpinnedWarning {
          optionPath = "services.llmhop.sglang.gateway";
          backendCfg = gateway;
          model = gateway;
        };
        virtualisation.quadlet = {
          enable = true;
          containers.sglang-gateway = gatewayContainer;
        };
        services.llmhop = {
          portsRegistry = {
            "sglang.gateway" = gateway.port;
          }
          // lib.optionalAttrs gateway.enableMetrics { "sglang.gateway.metrics" = gateway.metricsPort; };
          unitsRegistry."sglang.gateway" = "sglang-gateway.service";
          modelsRegistry = lib.mkIf (gateway.route != null) {
            "sglang.gateway" = {
              name = gateway.route;
              route.url = gatewayUrl;
            };
          };
        };
      })
    ]
  );
}
