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
        ]
        // {
          inherit cfg;
          inherit (routerCfg) socketDirectory;
          nvidiaToolkit = config.hardware.nvidia-container-toolkit.enable;
          extraOptions = extraOptions // lib.optionalAttrs namedUser (nativeRuntime.namedUserOptions backend);
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
        # The server's flags as the user wrote them: the model's over the backend's.
        settings = cfg.modelSettings // model.settings;
        # The same with `${cred:NAME}` as the path of the credential in `directory` (an
        # unknown NAME fails an assertion of backendConfig rather than a throw).
        settingsIn =
          directory:
          llmhopLib.resolveCredentialRefs {
            names = llmhopLib.credentialRefs settings;
            inherit directory;
          } settings;
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
              unknown = lib.subtractLists known (lib.unique (llmhopLib.credentialRefs workload.settings));
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
          containerRuntime.gpuWarning args ++ containerRuntime.unpinnedWarning (args // { inherit movingTags; })
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
