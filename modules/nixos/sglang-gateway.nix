# The SGL Model Gateway (services.llmhop.sglang.gateway): one container in front of the SGLang
# workers, run by the SGLang backend's container user (or rootful with it), on the host
# network. It routes to the worker serving a request's model; llmhop may route to it as one
# more upstream (`route`).
{
  config,
  lib,
  ...
}:
let
  inherit (lib) mkOption types;

  framework = import ../framework lib;
  inherit (framework) llmhopLib container containerOptions;

  sglang = config.services.llmhop.sglang;
  gateway = sglang.gateway;

  workers = lib.filter (m: m.enable) (lib.attrValues sglang.models);
  # Every unit serving a model: each replica apart.
  instances = framework.instances "sglang" sglang;
  workerUrls = map (i: "http://127.0.0.1:${toString i.model.port}") instances;
  # The gateway waits for the workers its manager knows: containers under the same user, and
  # native units only when the gateway itself is a system unit. Any other worker is waited
  # for by the gateway (its worker startup timeout).
  rootless = sglang.quadlet.user != null;
  workerUnits = map (i: "${i.unit}.service") (
    lib.filter (i: i.model.runtime == "container" || !rootless) instances
  );

  tls = gateway.settings.tls-cert-path or null != null;
  url = "${if tls then "https" else "http"}://${container.reachable gateway.bindAddress}:${toString gateway.port}";

  settings = llmhopLib.resolveCredentialRefs {
    names = lib.attrNames gateway.credentials;
    directory = container.credentialsMount;
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
{
  options.services.llmhop.sglang.gateway =
    containerOptions.imageOptions {
      image = "docker.io/lmsysorg/sgl-model-gateway";
      tag = "latest";
      what = "the gateway";
    }
    // {
      enable = lib.mkEnableOption "the SGL Model Gateway in front of the SGLang workers (a container)";
      digest = containerOptions.digestOption;
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
      environment = framework.environmentOption "the gateway";
      environmentFile = framework.environmentFileOption "the gateway";
      credentials = llmhopLib.mkCredentialsOption "the gateway";
      settings = mkOption {
        type = framework.settingsType;
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
      quadlet = containerOptions.quadletLayers "the gateway's container";
    };

  # The SGLang backend provides the container runtime's system part (its user, Quadlet) for it.
  config = lib.mkIf (sglang.enable && gateway.enable) {
    assertions =
      llmhopLib.credentialNameAssertions "services.llmhop.sglang.gateway" gateway.credentials
      ++ [
        (
          let
            onDemand = map (m: m.name) (lib.filter (m: m.onDemand.enable) workers);
          in
          {
            assertion = onDemand == [ ];
            message = "services.llmhop.sglang.gateway: the models ${lib.concatStringsSep ", " onDemand} are on demand, which the gateway's Requires= and health checks would keep loaded; turn it off or run them always on.";
          }
        )
      ];
    warnings = container.unpinnedWarning {
      optionPath = "services.llmhop.sglang.gateway";
      backendCfg = gateway;
      model = gateway;
    };

    virtualisation.quadlet = {
      enable = true;
      containers.sglang-gateway = container.quadletContainer {
        inherit (sglang.quadlet) user;
        layers = [ gateway.quadlet ];
        inherit (gateway) credentials;
        containerConfig =
          container.imageOf {
            model = gateway;
            backendCfg = gateway;
          }
          // container.containerBase {
            # The gateway's image removes curl once built; it runs python3.
            healthCmd = container.pythonHealthCheck {
              url = "${url}/health";
              insecure = tls;
            };
            inherit (gateway) environment;
            environmentFiles = [ gateway.environmentFile ];
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
          };
        volumes = [ ];
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
          route.url = url;
        };
      };
    };
  };
}
