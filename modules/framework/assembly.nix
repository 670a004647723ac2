# The assembly of a backend: from its options and what the backend module gives (its server's
# argv and flags for each runtime), the enabled models as workloads, their registry entries
# (the contract with the router, registries.nix), their assertions and warnings, and their
# units through the native runtime (native.nix) or the container runtime (container.nix).
{
  lib,
  llmhopLib,
  options,
  nativeRuntime,
  containerRuntime,
  onDemand,
  weightsLib,
}:
rec {
  # A backend as a NixOS module: its options (options.nix; with `namedUser`, the `user` and
  # `group` of the account its native models share with its container user) and, while it is
  # enabled, its config (backendConfig) merged with `extraConfig`. It takes backendConfig's
  # arguments, except what it reads from `config`, and passes the rest to backendOptions.
  backendModule =
    {
      config,
      backend,
      extraOptions ? { },
      namedUser ? false,
      native,
      container,
      nativeUnavailable ? null,
      containersWanted ? false,
      movingTags ? [ ],
      extraConfig ? { },
      socketCapable ? true,
      # Whether the server loads its weights from one file (`weights.huggingface.files`' first).
      singleFileWeights ? false,
      # Where the server answers 200 once it has loaded: its units wait for it, the router
      # probes it.
      healthPath ? "/health",
      # Where it serves Prometheus metrics, and the flag that turns them on (null: always on).
      metricsPath ? "/metrics",
      metricsFlag ? null,
      pkgs,
      ...
    }@args:
    let
      routerCfg = config.services.llmhop;
      cfg = routerCfg.${backend};
    in
    {
      options.services.llmhop.${backend} = options.backendOptions (
        removeAttrs args [
          "config"
          "namedUser"
          "native"
          "container"
          "nativeUnavailable"
          "containersWanted"
          "movingTags"
          "extraConfig"
          "singleFileWeights"
          "healthPath"
          "metricsPath"
          "metricsFlag"
          "pkgs"
        ]
        // {
          inherit cfg;
          inherit (routerCfg) socketDirectory;
          nvidiaToolkit = config.hardware.nvidia-container-toolkit.enable;
          extraOptions =
            extraOptions
            // options.hubPackageOption pkgs
            // lib.optionalAttrs namedUser (options.namedUserOptions backend);
        }
      );

      config = lib.mkIf cfg.enable (
        lib.mkMerge [
          (backendConfig {
            inherit
              config
              backend
              cfg
              routerCfg
              native
              container
              nativeUnavailable
              containersWanted
              movingTags
              socketCapable
              singleFileWeights
              healthPath
              metricsPath
              metricsFlag
              ;
            socketGroup = cfg.group;
            nativeSystem = lib.optionalAttrs namedUser (nativeRuntime.namedUserConfig backend cfg);
          })
          extraConfig
        ]
      );
    };

  # What vLLM and SGLang have in common as backends: Python servers of one model each (the
  # `model` option), on GPUs, in the upstream image by default, their native units under the
  # account of their container user.
  pythonBackend = {
    defaultRuntime = "container";
    gpuDefault = true;
    tag = "latest";
    modelOptions = options.modelOption;
    namedUser = true;
  };

  # The model a server loads: its declared weights, else its `model`.
  modelPath =
    { model, weights, ... }:
    if weights != null then weights.path else model.model;

  # The managed listener flags of a server: its unix socket as `--<socketFlag>`, else
  # `--host` and `--port`.
  listenFlags =
    socketFlag:
    {
      socket,
      port,
      host ? "127.0.0.1",
    }:
    if socket != null then { ${socketFlag} = socket; } else { inherit host port; };

  # The units that run the enabled models of a backend: each model, or each of its `replicas`
  # as the model with the replica's port or socket, devices and environment, in a unit
  # `<backend>-<name>-<index>`; `upstream` is the model's route (`url`, or `urls` of them all).
  instances =
    backend: cfg:
    lib.concatLists (
      lib.mapAttrsToList (
        attr: model:
        let
          replicas = lib.imap0 (
            index: replica:
            let
              unit = "${backend}-${model.name}-${toString index}";
              port =
                if replica.port != null then
                  replica.port
                else if model.port != null then
                  model.port + index
                else
                  null;
              native = model.runtime == "native";
            in
            {
              inherit attr unit;
              replica = index;
              model = model // {
                inherit port;
                # Beside the model's own socket directory, which stays unused.
                socket = if port == null then "${dirOf (dirOf model.socket)}/${unit}/http.sock" else null;
                devices =
                  if replica.devices != null then
                    replica.devices
                  else if replica.gpus != [ ] && !native then
                    map (gpu: "nvidia.com/gpu=${gpu}") replica.gpus
                  else
                    model.devices;
                environment =
                  model.environment
                  // lib.optionalAttrs (replica.gpus != [ ] && native) {
                    CUDA_VISIBLE_DEVICES = lib.concatStringsSep "," replica.gpus;
                  }
                  // replica.environment;
              };
            }
          ) model.replicas;
          url = instance: llmhopLib.workerUrl { inherit (instance.model) socket port; };
        in
        if replicas == [ ] then
          [
            {
              inherit attr model;
              replica = null;
              unit = "${backend}-${model.name}";
              upstream.url = llmhopLib.workerUrl { inherit (model) socket port; };
            }
          ]
        else
          map (instance: instance // { upstream.urls = map url replicas; }) replicas
      ) (lib.filterAttrs (_: m: m.enable) cfg.models)
    );

  # The enabled models of a backend (each replica apart) with what the framework derives for
  # each; when two share a unit name only the first (by attribute name) gets a unit, the
  # registries report both.
  # `native` and `container` hold the units of each runtime, sorted by unit name (so by model
  # name), each knowing its predecessor in the same runtime for startupOrdering.
  workloads =
    {
      backend,
      cfg,
      routerCfg,
      singleFileWeights,
      healthPath,
      metricsPath,
      metricsFlag,
    }:
    let
      all = map (instance: rec {
        inherit (instance)
          attr
          model
          replica
          unit
          upstream
          ;
        inherit backend healthPath;
        # The model's own owner: its route is registered under it, once for all replicas.
        modelOwner = "${backend}.models.${attr}";
        owner = modelOwner + lib.optionalString (replica != null) ".replicas.${toString replica}";
        # The route: the model's registered address.
        url = llmhopLib.workerUrl { inherit (model) socket port; };
        onDemand = model.onDemand.enable;
        # Where the server listens: the registered address, or, on demand, a private one
        # behind the proxy.
        listen =
          if onDemand then
            {
              socket =
                if model.onDemand.workerPort == null then
                  "${routerCfg.socketDirectory}/${unit}/worker/http.sock"
                else
                  null;
              port = model.onDemand.workerPort;
            }
          else
            { inherit (model) socket port; };
        serverUrl = llmhopLib.workerUrl listen;
        # The systemd manager of its units: BindsTo= and Conflicts= reach no further.
        manager =
          if model.runtime == "container" && cfg.quadlet.user != null then
            "the user manager of ${cfg.quadlet.user.name}"
          else
            "the system manager";
        # The other workers of its group in the same manager: starting it stops them, after
        # them (an ordering between each pair, one way: stops then precede starts).
        peers = lib.sort lib.lessThan (
          map (peer: peer.unit) (
            lib.filter (
              peer:
              model.group != null
              && peer.group == model.group
              && peer.manager == manager
              && peer.unit != "${unit}.service"
            ) (lib.attrValues routerCfg.workersRegistry)
          )
        );
        peersBefore = lib.filter (peer: peer < "${unit}.service") peers;
        cacheDirectory = "/var/cache/${backend}/${model.name}";
        # Native workers keep their weights in their own cache, containers in the backend's.
        weights =
          let
            container = model.runtime == "container";
          in
          weightsLib.of {
            inherit model container;
            hubCache = "${if container then cfg.cache.directory else cacheDirectory}/hub";
            singleFile = singleFileWeights;
          };
        # The server's flags as the user wrote them: the model's over the backend's.
        written = cfg.modelSettings // model.settings;
        # Metrics are on unless the user writes their flag false or null.
        metrics = metricsFlag == null || (written.${metricsFlag} or true) == true;
        # Its flags: the written ones with the metrics flag. Not `false` when off, which
        # llama-server would reject (it has no `--no-metrics`).
        settings =
          written
          // lib.optionalAttrs (metricsFlag != null) {
            ${metricsFlag} = if metrics then true else null;
          };
        # What the router probes and scrapes: nothing on demand, where every probe and scrape
        # would start the model, or keep it loaded past its idle timeout.
        watched = lib.optionalAttrs (!onDemand) (
          { inherit healthPath; } // lib.optionalAttrs metrics { inherit metricsPath; }
        );
        # The same with `${cred:NAME}` as the path of the credential in `directory` (an
        # unknown NAME fails an assertion of backendConfig rather than a throw).
        settingsIn =
          directory:
          llmhopLib.resolveCredentialRefs {
            names = llmhopLib.credentialRefs settings;
            inherit directory;
          } settings;
      }) (instances backend cfg);
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
            # A model's replicas start one after another even without startupOrdering: they
            # share its cache, so the first download serves them all.
            previous =
              if cfg.startupOrdering && i > 0 then
                (lib.elemAt chained (i - 1)).unit
              else if w.replica != null && w.replica > 0 then
                "${backend}-${w.model.name}-${toString (w.replica - 1)}"
              else
                null;
          }
        ) chained;
    in
    {
      inherit all;
      native = chain "native";
      container = chain "container";
    };

  # The config of a backend: registries, routes, the router's group, assertions and units.
  # `native` maps a workload to nativeRuntime.service's arguments (minus cfg, routerCfg, workload),
  # `container` to containerRuntime.service's (minus cfg, routerCfg, podman, workload).
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
      # False for servers without unix sockets: on demand they need onDemand.workerPort.
      socketCapable ? true,
      singleFileWeights ? false,
      healthPath ? "/health",
      metricsPath ? "/metrics",
      metricsFlag ? null,
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
      w = workloads {
        inherit
          backend
          cfg
          routerCfg
          singleFileWeights
          healthPath
          metricsPath
          metricsFlag
          ;
      };
      onDemandWorkloads = lib.filter (wl: wl.onDemand) w.all;
      # The proxies of the system manager (native and rootful container workers).
      systemProxies = lib.filter (wl: wl.manager == "the system manager") onDemandWorkloads;
      userProxies = lib.filter (wl: wl.manager != "the system manager") onDemandWorkloads;
      proxyUnits =
        wl: args:
        onDemand.units (
          {
            workload = wl;
            inherit routerCfg;
            systemd = config.systemd.package;
          }
          // args
        );

      optionPath = workload: "services.llmhop.${workload.modelOwner}";

      # One fetch unit per model, whatever its replicas.
      fetched = lib.attrValues (
        lib.foldl' (
          acc: wl:
          if wl.weights == null || !wl.weights.fetch || acc ? ${wl.modelOwner} then
            acc
          else
            acc // { ${wl.modelOwner} = wl; }
        ) { } w.all
      );
      hub = cfg.huggingfaceHubPackage;
      fetchService =
        wl:
        let
          inherit (wl) model;
          rootless = cfg.quadlet.user != null;
        in
        weightsLib.service {
          inherit model;
          inherit (wl) weights;
          identity =
            if model.runtime == "native" then
              (native wl).identity
            else if rootless then
              {
                User = cfg.quadlet.user.name;
                Group = cfg.quadlet.user.group;
              }
            else
              { User = "root"; };
          directories =
            if model.runtime == "native" then
              { CacheDirectory = "${backend}/${model.name}"; }
            else
              { ReadWritePaths = [ cfg.cache.directory ]; };
          python = hub.pythonModule.withPackages (_: [ hub ]);
          environment = cfg.environment // model.environment;
          keep = map (other: other.model.weights.huggingface.revision) (
            lib.filter (other: other.weights.storage == wl.weights.storage) fetched
          );
          systemdVersion = config.systemd.package.version;
        };
      # A rootless container runs in its user's manager, which a system unit cannot be a
      # dependency of: that whole manager starts after the fetches of its containers.
      rootlessFetches = lib.filter (
        wl: wl.model.runtime == "container" && cfg.quadlet.user != null
      ) fetched;
      nativeSockets = lib.any (wl: wl.model.runtime == "native" && wl.model.socket != null) w.all;
    in
    lib.mkMerge [
      {
        assertions = lib.unique (
          lib.optional (w.native != [ ] && nativeUnavailable != null) {
            assertion = false;
            message = nativeUnavailable;
          }
          ++ lib.concatMap (
            workload:
            let
              inherit (workload) model;
              known = lib.attrNames model.credentials;
              unknown = lib.subtractLists known (lib.unique (llmhopLib.credentialRefs workload.settings));
              gpusWithoutGpu =
                model.runtime == "native" && !model.gpu && lib.any (replica: replica.gpus != [ ]) model.replicas;
            in
            llmhopLib.credentialNameAssertions (optionPath workload) model.credentials
            ++ map (name: {
              assertion = false;
              message = "${optionPath workload}.settings: \${cred:${name}} names no credential of this model (it has: ${lib.concatStringsSep ", " known}).";
            }) unknown
            ++ [
              (llmhopLib.socketPathAssertion {
                inherit (model) socket;
                what = "${optionPath workload}: the socket ${toString model.socket}";
                hint = "; shorten the name or services.llmhop.socketDirectory";
              })
              {
                assertion = model.tag == null || model.digest == null;
                message = "${optionPath workload}: set either tag or digest, not both.";
              }
            ]
            ++ lib.optional gpusWithoutGpu {
              assertion = false;
              message = "${optionPath workload}: a replica has gpus, but the model has gpu = false and runs natively without any device (PrivateDevices=); set gpu = true.";
            }
            ++ lib.optionals workload.onDemand (onDemand.assertions {
              inherit workload routerCfg socketCapable;
              optionPath = optionPath workload;
            })
            ++ weightsLib.assertions {
              inherit model;
              optionPath = optionPath workload;
              singleFile = singleFileWeights;
            }
          ) w.all
        );

        warnings = lib.unique (
          lib.concatMap (
            workload:
            let
              args = {
                optionPath = optionPath workload;
                backendCfg = cfg;
                inherit (workload) model;
              };
            in
            containerRuntime.gpuWarning args
            ++ containerRuntime.unpinnedWarning (args // { inherit movingTags; })
          ) w.container
          ++ lib.concatMap (
            workload:
            onDemand.localTcpWarning {
              optionPath = optionPath workload;
              inherit (workload) model;
            }
            ++ lib.optionals workload.onDemand (
              onDemand.watchWarnings {
                optionPath = optionPath workload;
                inherit (workload) model;
                inherit routerCfg;
              }
            )
            ++ weightsLib.warnings {
              optionPath = optionPath workload;
              inherit (workload) model;
            }
          ) w.all
        );

        services.llmhop = {
          portsRegistry = lib.listToAttrs (
            map (wl: lib.nameValuePair wl.owner wl.model.port) (lib.filter (wl: wl.model.port != null) w.all)
            ++ map (wl: lib.nameValuePair "${wl.owner}.onDemand.workerPort" wl.listen.port) (
              lib.filter (wl: wl.onDemand && wl.listen.port != null) w.all
            )
          );
          unitsRegistry = lib.listToAttrs (
            map (wl: lib.nameValuePair wl.owner "${wl.unit}.service") w.all
            ++ map (wl: lib.nameValuePair "${wl.owner}.onDemand" "${onDemand.proxyName wl.unit}.service") onDemandWorkloads
          );
          modelsRegistry = lib.listToAttrs (
            map (
              wl:
              lib.nameValuePair wl.modelOwner {
                inherit (wl.model) name;
                route =
                  wl.upstream
                // lib.optionalAttrs (wl.model.group != null) { inherit (wl.model) group; }
                // lib.optionalAttrs wl.onDemand { upstreamIdleTimeout = onDemand.upstreamIdleTimeout wl.model; }
                // wl.watched;
              }
            ) w.all
          );
          workersRegistry = lib.listToAttrs (
            map (
              wl:
              lib.nameValuePair wl.owner {
                unit = "${wl.unit}.service";
                inherit (wl) manager onDemand;
                inherit (wl.model) group;
              }
            ) (lib.filter (wl: wl.model.group != null) w.all)
          );

          supplementaryGroups = lib.mkIf nativeSockets [ socketGroup ];
        };
      }

      (lib.mkIf (w.native != [ ]) nativeSystem)

      {
        systemd.sockets = lib.listToAttrs (
          map (
            wl:
            lib.nameValuePair (onDemand.proxyName wl.unit)
              (proxyUnits wl {
                socketConfig = lib.optionalAttrs (wl.model.runtime == "native") { SocketGroup = socketGroup; };
              }).socket
          ) systemProxies
        );
        systemd.services = lib.listToAttrs (
          map (
            wl:
            lib.nameValuePair (onDemand.proxyName wl.unit)
              (proxyUnits wl {
                serviceConfig = onDemand.systemServiceConfig {
                  inherit routerCfg;
                  groups = lib.optional (wl.model.runtime == "native") socketGroup;
                };
              }).service
          ) systemProxies
        );
        # A rootless container's proxy runs as its user, in its manager.
        systemd.user = lib.genAttrs [ "sockets" "services" ] (
          kind:
          lib.listToAttrs (
            map (
              wl:
              lib.nameValuePair (onDemand.proxyName wl.unit)
                (proxyUnits wl { unitConfig.ConditionUser = toString cfg.quadlet.user.uid; }).${
                  lib.removeSuffix "s" kind
                }
            ) userProxies
          )
        );
      }

      {
        systemd.services = lib.listToAttrs (
          map (wl: lib.nameValuePair (weightsLib.fetchUnit wl.model) (fetchService wl)) fetched
          ++ lib.optional (rootlessFetches != [ ]) (
            lib.nameValuePair "user@${toString cfg.quadlet.user.uid}" (
              let
                units = map (wl: "${weightsLib.fetchUnit wl.model}.service") rootlessFetches;
              in
              {
                # A drop-in of the template's instance, not a unit of its own.
                overrideStrategy = "asDropin";
                wants = units;
                after = units;
              }
            )
          )
        );
      }

      (lib.mkIf (nativeUnavailable == null) {
        systemd.services = lib.listToAttrs (
          map (
            workload:
            lib.nameValuePair workload.unit (
              nativeRuntime.service ({ inherit cfg routerCfg workload; } // native workload)
            )
          ) w.native
        );
      })

      (lib.mkIf (w.container != [ ] || containersWanted) (
        lib.mkMerge [
          (containerRuntime.system {
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
                  containerRuntime.service (
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
