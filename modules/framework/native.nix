# The native runtime of the backend framework: each model a hardened system unit in the sandbox
# shared with the router (llmhopLib.hardening), started through `llmhop-notify`, which holds
# the unit in `activating` until the server's /health answers. `service` builds the unit;
# vLLM and SGLang add `pythonServer` (their environment, compilers and restart policy) and
# run under a named account (`namedUserConfig`; its options are options.nix's `namedUserOptions`).
{
  lib,
  llmhopLib,
  containerOptions,
  onDemand,
  weightsLib,
}:
{
  # A native model's systemd.services entry, in the sandbox shared with the router
  # (llmhopLib.hardening). `command` is the server's argv before its flags; `managedFlags` win
  # over the model's settings, which win over the backend's modelSettings.
  service =
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
      inherit (workload) model weights;
      # Every replica waits for the model's weights.
      fetch = lib.optional (weights != null && weights.fetch) "${weightsLib.fetchUnit model}.service";
      # `%d` is escaped with the rest of ExecStart=, so a placeholder stands for it until then.
      settings = workload.settingsIn llmhopLib.credentialsDirectoryPlaceholder;
      argv = command ++ llmhopLib.renderCliArgs dialect (settings // managedFlags);
      onSocket = workload.listen.socket != null;
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
            workload.serverUrl
            "-health-path"
            workload.healthPath
            "--"
          ]
          ++ argv
        );
      };
    in
    {
      inherit description path;
      restartIfChanged = onDemand.workerRestartIfChanged workload.onDemand;
      # On demand, its proxy starts it.
      wantedBy = lib.optional (!workload.onDemand) "multi-user.target";
      wants = [ "network-online.target" ];
      requires = fetch;
      after = [
        "network-online.target"
      ]
      ++ fetch
      ++ lib.optional (workload.previous != null) "${workload.previous}.service"
      ++ workload.peersBefore;
      conflicts = workload.peers;
      environment =
        environment
        // lib.optionalAttrs model.gpu (llmhopLib.gpuEnvironment workload.cacheDirectory)
        // lib.optionalAttrs model.nccl llmhopLib.ncclEnvironment
        // cfg.environment
        // model.environment
        // weightsLib.offlineEnvironment weights;
      unitConfig = onDemand.workerUnitConfig workload.onDemand // model.unitConfig;
      serviceConfig =
        llmhopLib.withCredentials model.credentials (
          llmhopLib.hardening
          // {
            # Servers stop gracefully on SIGINT. One that dies of it instead makes llmhop-notify
            # exit 128 + 2, which is a clean stop too.
            KillSignal = "SIGINT";
            SuccessExitStatus = 130;
            Restart = onDemand.workerRestart workload.onDemand restart;
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
                # <socketDirectory>/<unit>/ (on demand …/<unit>/worker/), removed on every stop:
                # no stale socket survives.
                RuntimeDirectory = lib.removePrefix "/run/" (dirOf workload.listen.socket);
                RuntimeDirectoryMode = "0710";
                UMask = "0007";
              }
            else
              {
                SocketBindAllow = "tcp:${toString workload.listen.port}";
                UMask = "0077";
              }
          )
          // lib.optionalAttrs model.gpu llmhopLib.gpuRelaxations
          // lib.optionalAttrs model.nccl llmhopLib.ncclRelaxations
          // model.serviceConfig
        )
        // fixed;
    };

  namedUserConfig =
    backend: cfg:
    let
      # The container user of the same name (models of both runtimes) lends its IDs.
      containerUser = cfg.quadlet.user;
      shared = what: containerUser != null && containerUser.manage && containerUser.${what} == backend;
      defaultId = containerOptions.defaultUids.${backend};
    in
    {
      users.users = lib.mkIf (cfg.user == backend) {
        ${backend} = {
          isSystemUser = true;
          uid = if shared "name" then containerUser.uid else defaultId;
          inherit (cfg) group;
          description = "${backend} workers";
        };
      };
      users.groups = lib.mkIf (cfg.group == backend) {
        ${backend}.gid = if shared "group" then containerUser.gid else defaultId;
      };
    };

  # What the native units of vLLM and SGLang share, as service arguments: the backend's
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

}
