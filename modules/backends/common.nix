# The backend framework. Every backend (llama-cpp.nix, …) takes its options from
# `backendOptions` (the shared ones are defined once, here) and its config from `backendConfig`,
# giving only what is its own: the server's argv and managed flags, its environment and
# identity. `runtime` picks how models run: "native" (hardened system units, `nativeService`)
# or "container" (Podman through quadlet-nix, `containerService`; see container.nix).
{ lib, llmhopLib }:
let
  inherit (lib) mkOption types;

  containerLib = import ./container.nix { inherit lib llmhopLib; };

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
      socketCapable,
      parallelFlags,
      backendCfg,
    }:
    { name, config, ... }:
    {
      options = containerLib.modelOptions { inherit backendCfg; } // {
        enable = lib.mkEnableOption "this model" // {
          default = true;
        };
        name = mkOption {
          type = types.strMatching llmhopLib.modelNamePattern;
          default = name;
          defaultText = lib.literalMD "the attribute name";
          description = "The routing key of the model and the `<name>` in its unit `${backend}-<name>`.";
        };
        port =
          if socketCapable then
            mkOption {
              type = types.nullOr types.port;
              default = null;
              example = 18001;
              description = ''
                The loopback port the server listens on; `null` serves on the unix socket
                `socket` instead.
              '';
            }
          else
            mkOption {
              type = types.port;
              example = 30001;
              description = "The loopback port the server listens on (required: it serves no unix socket).";
            };
        socket = mkOption {
          type = types.nullOr types.str;
          default =
            if socketCapable && config.port == null then
              "${socketDirectory}/${backend}-${config.name}/http.sock"
            else
              null;
          defaultText = lib.literalMD "{file}`<socketDirectory>/${backend}-<name>/http.sock` while `port` is `null`, else `null`";
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
        runtime = mkOption {
          type = types.enum [
            "native"
            "container"
          ];
          default = backendCfg.runtime;
          defaultText = lib.literalMD "the backend's `runtime`";
          description = "How this model runs (a native vLLM beside vLLM containers, say).";
        };
        nccl = mkOption {
          type = types.bool;
          default = lib.any (
            flag:
            let
              value = (backendCfg.modelSettings // config.settings).${flag} or 1;
            in
            lib.isInt value && value > 1
          ) parallelFlags;
          defaultText = lib.literalMD "whether a parallelism flag in the settings exceeds 1";
          description = ''
            Whether a native model talks NCCL between its GPU processes: netlink, binds on any
            TCP port (the ephemeral rendezvous), `NCCL_SOCKET_IFNAME=lo` and no InfiniBand.
            On when a parallelism flag (${lib.concatStringsSep ", " parallelFlags}) exceeds 1.
          '';
        };
        gpu = mkOption {
          type = types.bool;
          default = gpuDefault;
          description = ''
            Whether the model runs on a GPU. Natively: device nodes, the `render` and `video`
            groups (`PrivateUsers=identity`, systemd ≥ 257), JIT, unlimited locked memory, all
            of {file}`/proc`; pick devices with `CUDA_VISIBLE_DEVICES` and friends in
            `environment`. In a container: a warning when `devices` gives it none.
          '';
        };
      };
    };
in
rec {
  inherit unitValue settingsType containerLib;

  # Options of services.llmhop.<backend>: the shared ones plus `extraOptions` (runtime-specific
  # ones such as `package`, `user`) and `modelOptions` (a module added to every model).
  backendOptions =
    {
      backend,
      displayName,
      socketDirectory,
      # This backend's config (option defaults refer to it).
      cfg,
      # The image (without tag) and default tag of the container runtime.
      image,
      tag,
      # Whether the NVIDIA container toolkit is enabled (the default `devices`).
      nvidiaToolkit,
      defaultRuntime ? "native",
      gpuDefault ? false,
      # False for servers without unix sockets: `port` is then required.
      socketCapable ? true,
      # Flags whose value above 1 spreads a model over GPUs that talk NCCL.
      parallelFlags ? [ ],
      extraOptions ? { },
      modelOptions ? { },
    }:
    containerLib.backendOptions {
      inherit
        backend
        displayName
        image
        tag
        nvidiaToolkit
        ;
      defaultUid = containerLib.defaultUids.${backend};
    }
    // {
      enable = lib.mkEnableOption "${displayName} workers" // {
        default = cfg.models != { };
        defaultText = lib.literalExpression "models != { }";
        description = ''
          Whether to run the ${displayName} workers; on as soon as `models` has an entry, so a
          model alone is enough and `false` turns declared models off.
        '';
      };

      startupOrdering = mkOption {
        type = types.bool;
        default = cfg.runtime == "container" || gpuDefault;
        defaultText =
          if gpuDefault then lib.literalExpression "true" else lib.literalExpression ''runtime == "container"'';
        description = ''
          Whether the models start one after another, sorted by `name` (`After=` the previous
          one of the same runtime: containers and native units have separate managers). Units
          become active only once healthy, so big models never load (or profile a GPU) at the
          same time.
        '';
      };

      runtime = mkOption {
        type = types.enum [
          "native"
          "container"
        ];
        default = defaultRuntime;
        description = ''
          How the models run by default: hardened system units (`native`) or Podman containers
          (`container`); each model's `runtime` may differ.
        '';
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
            (modelModule {
              inherit
                backend
                socketDirectory
                gpuDefault
                socketCapable
                parallelFlags
                ;
              backendCfg = cfg;
            })
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
  # `native` and `container` hold the units of each runtime, sorted by unit name (so by model
  # name), each knowing its predecessor in the same runtime for startupOrdering.
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
      units = lib.attrValues (
        lib.foldl' (acc: w: if acc ? ${w.unit} then acc else acc // { ${w.unit} = w; }) { } all
      );
      chain =
        runtime:
        let
          chained = lib.filter (w: w.model.runtime == runtime) units;
        in
        lib.imap0 (
          i: w:
          w
          // {
            previous = if cfg.startupOrdering && i > 0 then (lib.elemAt chained (i - 1)).unit else null;
          }
        ) chained;
    in
    {
      inherit all;
      native = chain "native";
      container = chain "container";
    };

  # A native model's systemd.services entry, in the sandbox shared with the router
  # (llmhopLib.hardening). `command` is the server's argv before its flags; `managedFlags` win
  # over the model's settings, which win over the backend's modelSettings.
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
      # Programs on PATH (compilers of a JIT).
      path ? [ ],
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
      inherit description path;
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ lib.optional (workload.previous != null) "${workload.previous}.service";
      startLimitBurst = 3;
      startLimitIntervalSec = 3600;
      environment =
        environment
        // lib.optionalAttrs model.gpu (llmhopLib.gpuEnvironment workload.cacheDirectory)
        // lib.optionalAttrs model.nccl llmhopLib.ncclEnvironment
        // cfg.environment
        // model.environment;
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
          // lib.optionalAttrs model.nccl llmhopLib.ncclRelaxations
          // model.serviceConfig
        )
        // fixed;
    };

  # A container model's virtualisation.quadlet.containers entry.
  # `positional` are the arguments before the flags; `managedFlags` (the listener inside the
  # container, the served name) win over the settings; the model's `socket` is mounted at
  # containerLib.socketMount.
  containerService =
    {
      cfg,
      routerCfg,
      podman,
      workload,
      dialect,
      managedFlags,
      containerPort,
      cacheDirectory,
      cacheVariable ? "HF_HOME",
      positional ? [ ],
      entrypoint ? null,
      environment ? { },
    }:
    let
      inherit (workload) model;
      inherit (containerLib) socketMount credentialsMount;
      rootless = cfg.quadlet.user != null;
      onSocket = model.socket != null;
      merged = cfg.modelSettings // model.settings;
      settings = llmhopLib.resolveCredentialRefs {
        names = llmhopLib.credentialRefs merged;
        directory = credentialsMount;
      } merged;
      health =
        if onSocket then
          containerLib.healthCheck {
            unixSocket = "${socketMount}/http.sock";
            url = "http://localhost/health";
          }
        else
          containerLib.healthCheck { url = "http://localhost:${toString containerPort}/health"; };
      devices = if model.devices != null then model.devices else cfg.devices;
    in
    containerLib.quadletContainer {
      uid = if rootless then cfg.quadlet.user.uid else null;
      layers = [
        cfg.quadlet
        model.quadlet
      ];
      inherit (model) credentials;
      containerConfig =
        containerLib.imageOf { inherit model; backendCfg = cfg; }
        // {
          Exec = llmhopLib.escapeSystemdValue (
            lib.concatStringsSep " " (
              map lib.escapeShellArg positional
              ++ [ (llmhopLib.renderCliArgsShell dialect (settings // managedFlags)) ]
            )
          );
          Environment = lib.mapAttrs (_: llmhopLib.escapeSystemdValue) (
            {
              ${cacheVariable} = cacheDirectory;
            }
            // environment
            // cfg.environment
            // model.environment
          );
          EnvironmentFile = lib.filter (f: f != null) [
            cfg.environmentFile
            model.environmentFile
          ];

          # Hardening
          NoNewPrivileges = true;
          DropCapability = "all";
          Tmpfs = "/tmp";

          # Ready once healthy; loading weights may take long.
          Notify = "healthy";
          HealthCmd = health;
          HealthStartPeriod = "30m";
          HealthInterval = "10s";
          HealthTimeout = "5s";

          AddDevice = devices;
          Ulimit = "host";
        }
        // lib.optionalAttrs (entrypoint != null) { Entrypoint = entrypoint; }
        // lib.optionalAttrs (model.shmSize != null) { ShmSize = model.shmSize; }
        // (
          if onSocket then
            # Quadlet has no Umask= key; podman's flag leaves the socket group-accessible
            # for the router.
            { PodmanArgs = [ "--umask=0007" ]; }
          else
            { PublishPort = "127.0.0.1:${toString model.port}:${toString containerPort}"; }
        );
      volumes = [
        "${cfg.cache.directory}:${cacheDirectory}"
      ]
      ++ lib.optional onSocket "${dirOf model.socket}:${socketMount}${
        lib.optionalString (
          model.quadlet.mountOptions.socket != [ ]
        ) ":${lib.concatStringsSep "," model.quadlet.mountOptions.socket}"
      }"
      ++ lib.optional (
        model.credentials != { }
      ) "%d:${credentialsMount}:${lib.concatStringsSep "," ([ "ro" ] ++ model.quadlet.mountOptions.credentials)}";
      serviceConfig = {
        Restart = "always";
        RestartSec = 30;
        TimeoutStartSec = 3600;
        LimitNOFILE = cfg.openFilesLimit;
      }
      // lib.optionalAttrs onSocket (
        if rootless then
          {
            # The user manager cannot create directories below /run: tmpfiles made this one.
            # A socket left by a crash would make the server fail with EADDRINUSE.
            ExecStartPre = [ "${lib.getExe' podman "podman"} unshare rm -f ${model.socket}" ];
          }
        else
          {
            RuntimeDirectory = "${lib.removePrefix "/run/" routerCfg.socketDirectory}/${workload.unit}";
            RuntimeDirectoryMode = "0710";
          }
      );
      unitConfig = {
        StartLimitBurst = 3;
        StartLimitIntervalSec = 3600;
      }
      // lib.optionalAttrs (workload.previous != null) { After = "${workload.previous}.service"; };
    };

  # --- Native Python servers (vLLM, SGLang) -------------------------------------------------

  # `user` and `group` of a backend whose native units run under a named account.
  namedUserOptions = backend: {
    user = mkOption {
      type = types.str;
      default = backend;
      description = ''
        The user of every native model: a real account rather than `DynamicUser=`, whose
        private mounts are noexec while the runtime loads kernels it compiled into its cache.
        Declared by the module under its default name (UID and GID
        ${toString containerLib.defaultUids.${backend}}, as the container user's).
      '';
    };
    group = mkOption {
      type = types.str;
      default = backend;
      description = "The group of every native model, owning its socket directory; the router joins it.";
    };
  };

  namedUserConfig =
    backend: cfg:
    let
      # The container user of the same name (models of both runtimes) lends its IDs.
      container = cfg.quadlet.user;
      shared = what: container != null && container.manage && container.${what} == backend;
      defaultId = containerLib.defaultUids.${backend};
    in
    {
      users.users = lib.mkIf (cfg.user == backend) {
        ${backend} = {
          isSystemUser = true;
          uid = if shared "name" then container.uid else defaultId;
          inherit (cfg) group;
          description = "${backend} workers";
        };
      };
      users.groups = lib.mkIf (cfg.group == backend) {
        ${backend}.gid = if shared "group" then container.gid else defaultId;
      };
    };

  # What the native units of vLLM and SGLang share, as nativeService arguments: the backend's
  # named account; every cache in the unit's cache directory (it is also HOME) and the host's
  # GPU driver libraries (Triton would run /sbin/ldconfig), plus `environment`; what Triton,
  # torch's C++ extensions and the flashinfer JIT call (a compiler, ninja, sh); and
  # Restart=always, as both drain and exit 0 when their engine dies.
  pythonServer =
    {
      cfg,
      pkgs,
      cacheDirectory,
      environment ? { },
    }:
    {
      environment = {
        HOME = cacheDirectory;
        XDG_CACHE_HOME = cacheDirectory;
        HF_HOME = cacheDirectory;
        HF_HUB_CACHE = "${cacheDirectory}/hub";
        LD_LIBRARY_PATH = "/run/opengl-driver/lib";
        TRITON_LIBCUDA_PATH = "/run/opengl-driver/lib";
      }
      // environment;
      path = [
        pkgs.stdenv.cc
        pkgs.ninja
        pkgs.bash
      ];
      identity = {
        User = cfg.user;
        Group = cfg.group;
      };
      restart = "always";
    };

  # The `model` option of vLLM and SGLang models.
  modelOption = {
    options.model = mkOption {
      type = types.str;
      example = "meta-llama/Meta-Llama-3-8B-Instruct";
      description = "The model to serve: a Hugging Face repository or a path.";
    };
  };

  # Where a containerised server listens: the mounted socket, or every interface of the
  # container (published on the host's loopback only).
  containerListen = model: port: {
    socket = if model.socket != null then "${containerLib.socketMount}/http.sock" else null;
    inherit port;
    host = "0.0.0.0";
  };

  # What the container runtime of a backend adds to the system: Quadlet itself, the rootless
  # user (lingering, with sub-UID/GID ranges) and its assertions, the cache, the rootless
  # socket directories and the ACL through which the router reaches container sockets.
  containerSystem =
    {
      config,
      backend,
      cfg,
      routerCfg,
      workloads,
    }:
    let
      user = cfg.quadlet.user;
      rootless = user != null;
      owner = if rootless then user else { name = "root"; group = "root"; };
      sockets = lib.filter (wl: wl.model.socket != null) workloads;
      clashes =
        what: entries: id:
        lib.attrNames (lib.filterAttrs (n: e: n != what && e.${id} or null == user.${id}) entries);
    in
    {
      virtualisation.quadlet.enable = true;

      assertions = lib.optionals (rootless && user.manage) [
        {
          assertion = clashes user.name config.users.users "uid" == [ ];
          message = "services.llmhop.${backend}.quadlet.user.uid ${toString user.uid} is taken by users.users.{${lib.concatStringsSep "," (clashes user.name config.users.users "uid")}}; choose another.";
        }
        {
          assertion = clashes user.group config.users.groups "gid" == [ ];
          message = "services.llmhop.${backend}.quadlet.user.gid ${toString user.gid} is taken by users.groups.{${lib.concatStringsSep "," (clashes user.group config.users.groups "gid")}}; choose another.";
        }
      ];

      users = lib.mkIf (rootless && user.manage) {
        users.${user.name} = {
          isSystemUser = true;
          inherit (user) uid group home;
          createHome = true;
          # Its systemd instance runs the containers from boot on.
          linger = true;
          autoSubUidGidRange = lib.mkDefault true;
          # As namedUserConfig's: native models of the backend share the account.
          description = "${backend} workers";
        };
        groups.${user.group}.gid = user.gid;
      };

      systemd.tmpfiles.rules = [
        "d ${cfg.cache.directory} 0700 ${owner.name} ${owner.group} - -"
      ]
      ++ lib.optionals rootless (
        map (wl: "d ${dirOf wl.model.socket} 0710 ${owner.name} ${owner.group} - -") sockets
      );

      # The container's UID is not known in advance: an inherited ACL lets the router in.
      # A setting rather than a rule, so backends that both want it merge into one line.
      systemd.tmpfiles.settings.llmhop = lib.mkIf (sockets != [ ]) {
        ${routerCfg.socketDirectory}."a+".argument = "default:user:${routerCfg.user}:-wx";
      };
    };

  # The config of a backend: registries, routes, the router's group, assertions and units.
  # `native` maps a workload to nativeService's arguments (minus cfg, routerCfg, workload),
  # `container` to containerService's (minus cfg, routerCfg, podman, workload).
  backendConfig =
    {
      config,
      backend,
      cfg,
      routerCfg,
      native,
      # The group owning the worker sockets; the router joins it (native runtime).
      socketGroup,
      container,
      # An assertion that the native runtime cannot work (a missing package), or null.
      nativeUnavailable ? null,
      # Whether the container runtime is needed without container models (the gateway).
      containersWanted ? false,
      # What native models add to the system besides their units (their account).
      nativeSystem ? { },
      # The backend's own tags that move between releases (besides `latest`).
      movingTags ? [ ],
    }:
    let
      w = workloads backend cfg;
      optionPath = workload: "services.llmhop.${workload.owner}";
      nativeSockets = lib.any (wl: wl.model.runtime == "native" && wl.model.socket != null) w.all;
    in
    lib.mkMerge [
      {
        assertions =
          lib.optional (w.native != [ ] && nativeUnavailable != null) {
            assertion = false;
            message = nativeUnavailable;
          }
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
              {
                assertion = model.tag == null || model.digest == null;
                message = "${optionPath workload}: set either tag or digest, not both.";
              }
            ]
          ) w.all;

        warnings = lib.concatMap (
          workload:
          let
            args = {
              optionPath = optionPath workload;
              backendCfg = cfg;
              inherit (workload) model;
            };
          in
          containerLib.gpuWarning args ++ containerLib.unpinnedWarning (args // { inherit movingTags; })
        ) w.container;

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
          supplementaryGroups = lib.mkIf nativeSockets [ socketGroup ];
        };
      }

      (lib.mkIf (w.native != [ ]) nativeSystem)

      (lib.mkIf (nativeUnavailable == null) {
        systemd.services = lib.listToAttrs (
          map (
            workload:
            lib.nameValuePair workload.unit (
              nativeService ({ inherit cfg routerCfg workload; } // native workload)
            )
          ) w.native
        );
      })

      (lib.mkIf (w.container != [ ] || containersWanted) (
        lib.mkMerge [
          (containerSystem {
            inherit
              config
              backend
              cfg
              routerCfg
              ;
            workloads = w.container;
          })
          {
            virtualisation.quadlet.containers = lib.listToAttrs (
              map (
                workload:
                lib.nameValuePair workload.unit (
                  containerService (
                    {
                      inherit cfg routerCfg workload;
                      podman = config.virtualisation.podman.package;
                    }
                    // container workload
                  )
                )
              ) w.container
            );
          }
        ]
      ))
    ];
}
