# The backend framework. Every backend (llama-cpp.nix, …) takes its options from
# `backendOptions` (the shared ones are defined once, here) and its config from `backendConfig`,
# giving only what is its own: the server's argv and managed flags, its environment and
# identity. `runtime` picks how models run: "native" (hardened system units, `nativeService`)
# or "container" (Quadlet; a backend passes `container` once that runtime exists).
{ lib, llmhopLib }:
let
  inherit (lib) mkOption types;

  # A [Service]/[Unit] value as NixOS accepts it.
  unitValue = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    (types.listOf (
      types.oneOf [
        types.int
        types.str
        types.path
      ]
    ))
  ];

  # A CLI setting: anything JSON-like (rendered per dialect, see lib.renderCliArgs).
  settingsType = types.attrsOf types.anything;

  environmentOption =
    what:
    mkOption {
      type = types.attrsOf types.str;
      default = { };
      description = "Environment variables of ${what}.";
    };

  environmentFileOption =
    what:
    mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/llmhop.env";
      description = "An `EnvironmentFile=` of ${what}, kept out of the Nix store.";
    };

  # Options of services.llmhop.<backend>.models.<name>.
  modelModule =
    {
      backend,
      socketDirectory,
      gpuDefault,
    }:
    { name, config, ... }:
    {
      options = {
        enable = lib.mkEnableOption "this model" // {
          default = true;
        };
        name = mkOption {
          type = types.strMatching llmhopLib.modelNamePattern;
          default = name;
          defaultText = lib.literalExpression "<name>";
          description = "The routing key of the model and the `<name>` in its unit `${backend}-<name>`.";
        };
        port = mkOption {
          type = types.nullOr types.port;
          default = null;
          example = 18001;
          description = ''
            The loopback port the server listens on; `null` serves on the unix socket
            `socket` instead.
          '';
        };
        socket = mkOption {
          type = types.nullOr types.str;
          default =
            if config.port == null then "${socketDirectory}/${backend}-${config.name}/http.sock" else null;
          defaultText = lib.literalExpression ''"''${socketDirectory}/${backend}-<name>/http.sock" or null'';
          readOnly = true;
          description = "The unix socket of the server while `port` is `null`.";
        };
        settings = mkOption {
          type = settingsType;
          default = { };
          example = {
            hf-repo = "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL";
            ctx-size = 16384;
            jinja = true;
          };
          description = ''
            Command-line flags of the server: `key = value` becomes `--key value`, `true`
            `--key`, `false` `--no-key` (SGLang: dropped), `null` nothing; lists repeat or
            follow the flag as the server expects. `''${cred:name}` becomes the path of the
            model's credential `name`. Managed flags (listener, served name) cannot be set.
          '';
        };
        environment = environmentOption "this model (over the backend's)";
        environmentFile = environmentFileOption "this model (after the backend's)";
        credentials = llmhopLib.mkCredentialsOption "this model (never inherited from the backend)";
        serviceConfig = mkOption {
          type = types.attrsOf unitValue;
          default = { };
          example = {
            MemoryMax = "24G";
            RestartSec = 10;
          };
          description = ''
            `[Service]` settings over the module's, except `ExecStart`, `Type` and `KillMode`.
            Credential directives are appended to any given here.
          '';
        };
        unitConfig = mkOption {
          type = types.attrsOf unitValue;
          default = { };
          description = "`[Unit]` settings of the model's unit (dependencies belong in `systemd.services`).";
        };
        gpu = mkOption {
          type = types.bool;
          default = gpuDefault;
          description = ''
            Whether the model runs on a GPU: device nodes, the `render` and `video` groups
            (`PrivateUsers=identity`, systemd ≥ 257), JIT, unlimited locked memory, all of
            {file}`/proc`. Pick devices with `CUDA_VISIBLE_DEVICES` and friends in `environment`.
          '';
        };
      };
    };
in
rec {
  inherit unitValue settingsType;

  # Options of services.llmhop.<backend>: the shared ones plus `extraOptions` (runtime-specific
  # ones such as `package`, `user`) and `modelOptions` (a module added to every model).
  backendOptions =
    {
      backend,
      displayName,
      socketDirectory,
      defaultRuntime ? "native",
      gpuDefault ? false,
      extraOptions ? { },
      modelOptions ? { },
    }:
    {
      enable = lib.mkEnableOption "${displayName} workers";

      runtime = mkOption {
        type = types.enum [
          "native"
          "container"
        ];
        default = defaultRuntime;
        description = "How the models run: hardened system units (`native`) or Podman containers (`container`).";
      };

      environment = environmentOption "every model";
      environmentFile = environmentFileOption "every model";

      modelSettings = mkOption {
        type = settingsType;
        default = { };
        example = {
          ctx-size = 8192;
        };
        description = "Flags of every model; a model's `settings` win over them.";
      };

      openFilesLimit = mkOption {
        type = types.ints.positive;
        default = 1048576;
        description = "`LimitNOFILE=` of every model.";
      };

      models = mkOption {
        type = types.attrsOf (
          types.submodule [
            (modelModule { inherit backend socketDirectory gpuDefault; })
            modelOptions
          ]
        );
        default = { };
        description = "The models, each a `${backend}-<name>` unit registered as route `<name>`.";
      };
    }
    // extraOptions;

  # The enabled models of a backend with what the framework derives for each; when two share
  # a unit name only the first (by attribute name) gets a unit, the registries report both.
  workloads =
    backend: cfg:
    let
      all = lib.mapAttrsToList (attr: model: rec {
        inherit attr model backend;
        owner = "${backend}.models.${attr}";
        unit = "${backend}-${model.name}";
        url = llmhopLib.workerUrl { inherit (model) socket port; };
        cacheDirectory = "/var/cache/${backend}/${model.name}";
      }) (lib.filterAttrs (_: m: m.enable) cfg.models);
    in
    {
      inherit all;
      units = lib.attrValues (
        lib.foldl' (acc: w: if acc ? ${w.unit} then acc else acc // { ${w.unit} = w; }) { } all
      );
    };

  # A native model's systemd.services entry, hardened as §3.6 of the reference. `command` is
  # the server's argv before its flags; `managedFlags` win over the model's settings, which
  # win over the backend's modelSettings.
  nativeService =
    {
      cfg,
      routerCfg,
      workload,
      command,
      dialect,
      managedFlags,
      identity,
      environment ? { },
      restart ? "on-failure",
      description,
    }:
    let
      inherit (workload) model;
      credentialsDir = llmhopLib.credentialsDirectoryPlaceholder;
      # Unknown references fail an assertion (backendConfig) rather than a throw.
      merged = cfg.modelSettings // model.settings;
      settings = llmhopLib.resolveCredentialRefs {
        names = llmhopLib.credentialRefs merged;
        directory = credentialsDir;
      } merged;
      argv = command ++ llmhopLib.renderCliArgs dialect (settings // managedFlags);
      onSocket = model.socket != null;
      # The module's keys: a model's serviceConfig cannot replace them.
      fixed = {
        Type = "notify";
        # SIGINT to llmhop-notify only, which passes it on once: llama-server exits 1 at a
        # second interrupt. The final SIGKILL still reaches the whole group.
        KillMode = "mixed";
        ExecStart = llmhopLib.escapeExecArgs (
          [
            (lib.getExe' routerCfg.package "llmhop-notify")
            "-url"
            workload.url
            "-health-path"
            "/health"
            "--"
          ]
          ++ argv
        );
      };
    in
    {
      inherit description;
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      startLimitBurst = 3;
      startLimitIntervalSec = 3600;
      environment = environment // lib.optionalAttrs model.gpu (llmhopLib.gpuEnvironment workload.cacheDirectory) // cfg.environment // model.environment;
      inherit (model) unitConfig;
      serviceConfig =
        llmhopLib.withCredentials model.credentials (
          llmhopLib.hardening
          // {
            # Servers stop gracefully on SIGINT. One that dies of it instead makes llmhop-notify
            # exit 128 + 2, which is a clean stop too.
            KillSignal = "SIGINT";
            SuccessExitStatus = 130;
            Restart = restart;
            RestartSec = 30;
            # Loading (or downloading) weights may take long; readiness ends it.
            TimeoutStartSec = 3600;
            TasksMax = 4096;
            LimitNOFILE = cfg.openFilesLimit;
            PrivateDevices = true;
            # Not with `gpu`: its implied DeviceAllow= would hide the GPU.
            ProtectClock = true;

            CacheDirectory = "${workload.backend}/${model.name}";
            StateDirectory = "${workload.backend}/${model.name}";
            WorkingDirectory = "/var/lib/${workload.backend}/${model.name}";
            EnvironmentFile = lib.filter (f: f != null) [
              cfg.environmentFile
              model.environmentFile
            ];

            SocketBindDeny = "any";
          }
          // identity
          // (
            if onSocket then
              {
                # <socketDirectory>/<unit>/, removed on every stop: no stale socket survives.
                RuntimeDirectory = "${lib.removePrefix "/run/" routerCfg.socketDirectory}/${workload.unit}";
                RuntimeDirectoryMode = "0710";
                UMask = "0007";
              }
            else
              {
                SocketBindAllow = "tcp:${toString model.port}";
                UMask = "0077";
              }
          )
          // lib.optionalAttrs model.gpu llmhopLib.gpuRelaxations
          // model.serviceConfig
        )
        // fixed;
    };

  # The config of a backend: registries, routes, the router's group, assertions and units.
  # `native` maps a workload to nativeService's arguments (minus cfg, routerCfg, workload).
  backendConfig =
    {
      backend,
      cfg,
      routerCfg,
      native,
      # The group owning the worker sockets; the router joins it.
      socketGroup,
      # Container runtime: maps a workload to its config (the GPU-workers issue).
      container ? null,
    }:
    let
      w = workloads backend cfg;
      optionPath = workload: "services.llmhop.${workload.owner}";
    in
    {
      assertions = [
        {
          assertion = cfg.runtime == "native" || container != null;
          message = ''services.llmhop.${backend}.runtime = "${cfg.runtime}" is not implemented yet; use "native".'';
        }
      ]
      ++ lib.concatMap (
        workload:
        let
          inherit (workload) model;
          known = lib.attrNames model.credentials;
          unknown = lib.subtractLists known (
            lib.unique (llmhopLib.credentialRefs (cfg.modelSettings // model.settings))
          );
        in
        map (name: {
          assertion = false;
          message = ''${optionPath workload}.credentials."${name}": a credential name is one path component matching ${llmhopLib.credentialNamePattern}.'';
        }) (llmhopLib.invalidCredentialNames model.credentials)
        ++ map (name: {
          assertion = false;
          message = "${optionPath workload}.settings: \${cred:${name}} names no credential of this model (it has: ${lib.concatStringsSep ", " known}).";
        }) unknown
        ++ [
          {
            assertion = model.socket == null || lib.stringLength model.socket <= llmhopLib.maxSocketPathLength;
            message = "${optionPath workload}: the socket ${model.socket} is longer than ${toString llmhopLib.maxSocketPathLength} bytes; shorten the name or services.llmhop.socketDirectory.";
          }
        ]
      ) w.all;

      services.llmhop = {
        portsRegistry = lib.listToAttrs (
          map (wl: lib.nameValuePair wl.owner wl.model.port) (lib.filter (wl: wl.model.port != null) w.all)
        );
        unitsRegistry = lib.listToAttrs (map (wl: lib.nameValuePair wl.owner "${wl.unit}.service") w.all);
        modelsRegistry = lib.listToAttrs (
          map (
            wl:
            lib.nameValuePair wl.owner {
              inherit (wl.model) name;
              route.url = wl.url;
            }
          ) w.all
        );
        supplementaryGroups = lib.mkIf (lib.any (wl: wl.model.socket != null) w.all) [ socketGroup ];
      };

      systemd.services = lib.mkIf (cfg.runtime == "native") (
        lib.listToAttrs (
          map (
            workload:
            lib.nameValuePair workload.unit (
              nativeService ({ inherit cfg routerCfg workload; } // native workload)
            )
          ) w.units
        )
      );
    };
}
