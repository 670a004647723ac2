# The container runtime of the backend framework: Podman containers through quadlet-nix,
# rootless by default (user units of a dedicated, lingering system user per backend). From the
# options of container-options.nix, what assembly.nix builds: one
# virtualisation.quadlet.containers entry per model (`service`; the gateway's through
# `quadletContainer`), and the user, cache, socket directories and ACL the runtime adds to the
# system (`system`).
{
  lib,
  llmhopLib,
  onDemand,
  weightsLib,
}:
let
  # Where the container sees its socket directory and its credentials.
  socketMount = "/run/llmhop/socket";
  credentialsMount = "/run/llmhop/credentials";

  # 127.0.0.1, [::1] or the address itself: where a health check reaches a bind address.
  reachable =
    address:
    if address == "0.0.0.0" || address == "" then
      "127.0.0.1"
    else if address == "::" then
      "[::1]"
    else if llmhopLib.isIPv6 address then
      "[${address}]"
    else
      address;
in
rec {
  inherit socketMount credentialsMount reachable;

  # Whether a model (or the gateway) runs a tag that a registry moves from release to release:
  # `latest` or one of `movingTags`, the backend's own floating defaults.
  unpinned =
    {
      backendCfg,
      model,
      movingTags ? [ ],
    }:
    let
      tag = if model.tag != null then model.tag else backendCfg.tag;
    in
    model.digest == null && lib.elem tag ([ "latest" ] ++ movingTags);

  # The warning of a model (or the gateway) that runs an unpinned image, naming the fix.
  unpinnedWarning =
    {
      optionPath,
      backendCfg,
      model,
      movingTags ? [ ],
    }:
    lib.optional (unpinned { inherit backendCfg model movingTags; }) ''
      ${optionPath} runs ${(imageOf { inherit backendCfg model; }).Image}, a tag that moves: with
      Pull=newer a restart may start another engine version. Pin it with
      `digest = "sha256:…"` (podman image inspect --format '{{.Digest}}' <image>) or a release `tag`.
    '';

  # The devices a model's container gets: `AddDevice=` of its raw Quadlet layers, else its
  # `devices`, else the backend's.
  devicesOf =
    { backendCfg, model }:
    let
      raw = backendCfg.quadlet.containerConfig // model.quadlet.containerConfig;
    in
    lib.toList (
      raw.AddDevice or (if model.devices != null then model.devices else backendCfg.devices)
    );

  # The warning of a GPU model whose container gets no device: it would run without a GPU.
  # Not an assertion: CPU images (`gpu` is on by default for vLLM and SGLang) and devices
  # added by other means (PodmanArgs=) are legitimate, and the message names the switch.
  gpuWarning =
    {
      optionPath,
      backendCfg,
      model,
    }:
    lib.optional (model.gpu && devicesOf { inherit backendCfg model; } == [ ]) ''
      ${optionPath}: gpu = true, but its container gets no device, so it runs without a GPU.
      Enable hardware.nvidia-container-toolkit (whose CDI specs make `devices` default to
      [ "nvidia.com/gpu=all" ]), or set `devices` to the CDI names or /dev paths of another
      provider (e.g. [ "amd.com/gpu=all" ]); set gpu = false for a model meant to run on the CPU.
    '';

  # A HealthCmd= probing `url` (through `unixSocket` if given) with curl, which the llama.cpp,
  # vLLM and SGLang images install.
  healthCheck =
    {
      unixSocket ? null,
      url,
      insecure ? false,
    }:
    lib.concatStringsSep " " (
      [
        "curl"
        "--fail"
        "--silent"
        "--show-error"
      ]
      ++ lib.optional insecure "--insecure"
      ++ lib.optionals (unixSocket != null) [
        "--unix-socket"
        unixSocket
      ]
      ++ [ url ]
    );

  # A HealthCmd= probing `url` with the image's python3, for images without curl: the SGL
  # Model Gateway's image removes curl once it has built, and runs python3 itself.
  pythonHealthCheck =
    {
      url,
      insecure ? false,
    }:
    let
      # Certificate checks off, as curl's --insecure: the address is a loopback or bind address.
      context = lib.optionalString insecure "c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; ";
      open = "urllib.request.urlopen(sys.argv[1], timeout=4${lib.optionalString insecure ", context=c"})";
    in
    "python3 -c 'import ${lib.optionalString insecure "ssl, "}sys, urllib.request; ${context}${open}' ${url}";

  # The image reference and pull policy of a model.
  imageOf =
    { backendCfg, model }:
    if model.digest != null then
      {
        Image = "${model.image}@${model.digest}";
        Pull = "missing";
      }
    else
      {
        Image = "${model.image}:${if model.tag != null then model.tag else backendCfg.tag}";
        Pull = "newer";
      };

  # What every container of the module runs with: no privileges, a private /tmp, and readiness
  # from its health check (`healthCmd`; quadletContainer gives it the start timeout to load);
  # `environment` and `environmentFiles` (nulls dropped) as Quadlet passes them on.
  containerBase =
    {
      healthCmd,
      environment,
      environmentFiles,
    }:
    {
      Environment = lib.mapAttrs (_: llmhopLib.escapeSystemdValue) environment;
      EnvironmentFile = lib.filter (f: f != null) environmentFiles;

      NoNewPrivileges = true;
      DropCapability = "all";
      Tmpfs = "/tmp";

      Notify = "healthy";
      HealthCmd = healthCmd;
      HealthInterval = "10s";
      HealthTimeout = "5s";
    };

  # A virtualisation.quadlet.containers entry, run by `user` (the backend's `quadlet.user`;
  # null: a rootful system unit). `containerConfig`, `serviceConfig` and `unitConfig` are the
  # caller's (health, network, exec…); the layers of the backend and the model go over them
  # key by key, except `Volume` (the module's mounts, then the credentials mounted read-only
  # with `credentialMountOptions`, after the user's), `PodmanArgs` (the module's flags before
  # the user's, so that a repeated flag is the user's) and credential directives.
  quadletContainer =
    {
      layers,
      user,
      containerConfig,
      serviceConfig,
      unitConfig,
      volumes,
      credentials,
      credentialMountOptions ? [ ],
    }:
    let
      over = key: lib.foldl' (acc: l: acc // l.${key}) { } layers;
      userContainer = over "containerConfig";
      service = llmhopLib.withCredentials credentials (serviceConfig // over "serviceConfig");
      # The health check's grace lasts as long as systemd waits for the start, whoever set
      # that: a server still loading within it is not marked unhealthy. A start timeout that is
      # no time span (`infinity`) leaves Podman's default.
      startTimeout = service.TimeoutStartSec or null;
      startSeconds =
        if lib.isInt startTimeout then
          startTimeout
        else if
          lib.isString startTimeout && builtins.match llmhopLib.timeSpanPattern startTimeout != null
        then
          builtins.ceil (llmhopLib.timeSpanSeconds startTimeout)
        else
          null;
      healthStartPeriod = lib.optionalAttrs (containerConfig ? HealthCmd && startSeconds != null) {
        HealthStartPeriod = "${toString startSeconds}s";
      };
    in
    {
      uid = if user != null then user.uid else null;
      containerConfig =
        containerConfig
        // healthStartPeriod
        // removeAttrs userContainer [
          "Volume"
          "PodmanArgs"
        ]
        // {
          Volume =
            lib.toList (userContainer.Volume or [ ])
            ++ volumes
            ++ lib.optional (
              credentials != { }
            ) "%d:${credentialsMount}:${lib.concatStringsSep "," ([ "ro" ] ++ credentialMountOptions)}";
        }
        // (
          let
            podmanArgs =
              lib.toList (containerConfig.PodmanArgs or [ ]) ++ lib.toList (userContainer.PodmanArgs or [ ]);
          in
          lib.optionalAttrs (podmanArgs != [ ]) { PodmanArgs = podmanArgs; }
        );
      # quadlet-nix sets Restart=always without a priority; ours (or the user's) wins.
      serviceConfig = service // { Restart = lib.mkOverride 90 service.Restart; };
      unitConfig = unitConfig // over "unitConfig";
      quadletConfig = over "quadletConfig";
      extraConfig = lib.foldl' lib.recursiveUpdate { } (map (l: l.extraConfig) layers);
    };

  # Where a containerised server listens: the mounted socket, or every interface of the
  # container (published on the host's loopback only).
  listen = workload: port: {
    socket = if workload.listen.socket != null then "${socketMount}/http.sock" else null;
    inherit port;
    host = "0.0.0.0";
  };
  # A container model's virtualisation.quadlet.containers entry. `positional` are the
  # arguments before the flags; `managedFlags` (the listener inside the container, the served
  # name) win over the settings; the model's `socket` is mounted at socketMount.
  service =
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
      inherit (workload) model weights;
      rootless = cfg.quadlet.user != null;
      # A rootful container is a system unit, which can require the fetch unit; a rootless
      # one's manager starts after it (assembly.nix).
      fetch = lib.optional (
        weights != null && weights.fetch && !rootless
      ) "${weightsLib.fetchUnit model}.service";
      # The server's own socket (on demand, the private one behind the proxy).
      socket = workload.listen.socket;
      onSocket = socket != null;
      health =
        if onSocket then
          healthCheck {
            unixSocket = "${socketMount}/http.sock";
            url = "http://localhost${workload.healthPath}";
          }
        else
          healthCheck {
            url = "http://localhost:${toString containerPort}${workload.healthPath}";
          };
    in
    quadletContainer {
      inherit (cfg.quadlet) user;
      layers = [
        cfg.quadlet
        model.quadlet
      ];
      inherit (model) credentials;
      credentialMountOptions = model.quadlet.mountOptions.credentials;
      containerConfig =
        imageOf {
          inherit model;
          backendCfg = cfg;
        }
        // containerBase {
          healthCmd = health;
          environment = {
            ${cacheVariable} = cacheDirectory;
          }
          // environment
          // cfg.environment
          // model.environment
          // weightsLib.offlineEnvironment weights;
          environmentFiles = [
            cfg.environmentFile
            model.environmentFile
          ];
        }
        // {
          Exec = llmhopLib.escapeSystemdValue (
            lib.concatStringsSep " " (
              map lib.escapeShellArg positional
              ++ [ (llmhopLib.renderCliArgsShell dialect (workload.settingsIn credentialsMount // managedFlags)) ]
            )
          );
          AddDevice = if model.devices != null then model.devices else cfg.devices;
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
            { PublishPort = "127.0.0.1:${toString workload.listen.port}:${toString containerPort}"; }
        );
      volumes = [
        "${cfg.cache.directory}:${cacheDirectory}"
      ]
      ++ lib.optionals (weights != null) weights.volumes
      ++ lib.optional onSocket "${dirOf socket}:${socketMount}${
        lib.optionalString (
          model.quadlet.mountOptions.socket != [ ]
        ) ":${lib.concatStringsSep "," model.quadlet.mountOptions.socket}"
      }";
      serviceConfig = {
        Restart = onDemand.workerRestart workload.onDemand "always";
        RestartSec = 30;
        TimeoutStartSec = 3600;
        LimitNOFILE = cfg.openFilesLimit;
      }
      # As NixOS writes `restartIfChanged = false`; the generator copies [Service] into the
      # unit that switch-to-configuration reads.
      // lib.optionalAttrs (!onDemand.workerRestartIfChanged workload.onDemand) {
        X-RestartIfChanged = false;
      }
      // lib.optionalAttrs onSocket (
        if rootless then
          {
            # The user manager cannot create directories below /run: tmpfiles made this one.
            # A socket left by a crash would make the server fail with EADDRINUSE.
            ExecStartPre = [ "${lib.getExe' podman "podman"} unshare rm -f ${socket}" ];
          }
        else
          {
            RuntimeDirectory = lib.removePrefix "/run/" (dirOf socket);
            RuntimeDirectoryMode = "0710";
          }
      );
      unitConfig =
        onDemand.workerUnitConfig workload.onDemand
        // (
          let
            after =
              fetch
              ++ lib.optional (workload.previous != null) "${workload.previous}.service"
              ++ workload.peersBefore;
          in
          lib.optionalAttrs (after != [ ]) { After = after; }
        )
        // lib.optionalAttrs (fetch != [ ]) { Requires = fetch; }
        // lib.optionalAttrs (workload.peers != [ ]) { Conflicts = workload.peers; };
    }
    # On demand, its proxy starts it.
    // lib.optionalAttrs workload.onDemand { autoStart = false; };

  # What the container runtime of a backend adds to the system: Quadlet itself, the rootless
  # user (lingering, with sub-UID/GID ranges) and its assertions, the cache, the rootless
  # socket directories and the ACL through which the router reaches container sockets.
  system =
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
      owner =
        if rootless then
          user
        else
          {
            name = "root";
            group = "root";
          };
      sockets = lib.filter (wl: wl.model.socket != null || wl.listen.socket != null) workloads;
      # The directories of rootless sockets, parents first: the registered socket's (bound
      # by the container, or on demand by the socket unit in the user's manager) and the
      # server's own behind the proxy.
      socketDirectories = lib.unique (
        lib.concatMap (
          wl:
          lib.optional (wl.model.socket != null) (dirOf wl.model.socket)
          ++ lib.optionals (wl.onDemand && wl.listen.socket != null) [
            (dirOf (dirOf wl.listen.socket))
            (dirOf wl.listen.socket)
          ]
        ) workloads
      );
      # The IDs of the managed user and group must be theirs alone.
      idClash =
        {
          entries,
          self,
          id,
          option,
        }:
        let
          holders = lib.attrNames (lib.filterAttrs (n: e: n != self && e.${id} or null == user.${id}) entries);
        in
        {
          assertion = holders == [ ];
          message = "services.llmhop.${backend}.quadlet.user.${id} ${toString user.${id}} is taken by ${option}.{${lib.concatStringsSep "," holders}}; choose another.";
        };
    in
    {
      virtualisation.quadlet.enable = true;

      assertions = lib.optionals (rootless && user.manage) [
        (idClash {
          entries = config.users.users;
          self = user.name;
          id = "uid";
          option = "users.users";
        })
        (idClash {
          entries = config.users.groups;
          self = user.group;
          id = "gid";
          option = "users.groups";
        })
      ];

      users = lib.mkIf (rootless && user.manage) {
        users.${user.name} = {
          isSystemUser = true;
          inherit (user) uid group home;
          createHome = true;
          # Its systemd instance runs the containers from boot on.
          linger = true;
          autoSubUidGidRange = lib.mkDefault true;
          # As native.nix's namedUser: native models of the backend share the account.
          description = "${backend} workers";
        };
        groups.${user.group}.gid = user.gid;
      };

      systemd.tmpfiles.rules = [
        "d ${cfg.cache.directory} 0700 ${owner.name} ${owner.group} - -"
      ]
      ++ lib.optionals rootless (
        map (directory: "d ${directory} 0710 ${owner.name} ${owner.group} - -") socketDirectories
      );

      # The container's UID is not known in advance: an inherited ACL lets the router in.
      # A setting rather than a rule, so backends that both want it merge into one line.
      systemd.tmpfiles.settings.llmhop = lib.mkIf (sockets != [ ]) {
        ${routerCfg.socketDirectory}."a+".argument = "default:user:${routerCfg.user}:-wx";
      };
    };
}
