# The options of every backend (services.llmhop.<backend>) and of every model
# (services.llmhop.<backend>.models.<name>), defined once: each backend module passes what is
# its own (names, defaults, `extraOptions` such as `package`, `modelOptions` such as `model`),
# and the container runtime adds its own (container-options.nix). A new per-model option belongs in
# `modelModule`, a new backend-wide one in `backendOptions`.
{
  lib,
  llmhopLib,
  containerOptions,
}:
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

  # One of a model's replicas (services.llmhop.<backend>.models.<name>.replicas.*).
  replicaModule = {
    options = {
      gpus = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "0" ];
        description = ''
          The NVIDIA GPUs of this replica: natively its `CUDA_VISIBLE_DEVICES`, in a container
          the CDI devices `nvidia.com/gpu=<gpu>` (instead of the model's `devices`).
        '';
      };
      devices = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [ "amd.com/gpu=1" ];
        description = "Devices of this replica's container (`AddDevice=`), instead of those of `gpus` or the model.";
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
        example = 18011;
        description = ''
          The replica's loopback port; `null` takes the model's `port` plus the replica's index
          or, while the model has no port, the unix socket
          {file}`<socketDirectory>/<backend>-<name>-<index>/http.sock`.
        '';
      };
      environment = environmentOption "this replica (over the model's; e.g. `HIP_VISIBLE_DEVICES`)";
    };
  };

  # A model's `weights`: fetched from the hub by its fetch unit, or on disk.
  weightsModule = {
    options = {
      huggingface = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              repo = mkOption {
                type = types.strMatching "[^/]+/[^/]+";
                example = "unsloth/Qwen3-8B-GGUF";
                description = "The model repository on the Hugging Face hub.";
              };
              revision = mkOption {
                type = types.strMatching "[^[:space:]]+";
                example = "0123456789abcdef0123456789abcdef01234567";
                description = "The commit to fetch; a branch or tag is accepted with a warning.";
              };
              files = mkOption {
                type = types.nullOr (types.nonEmptyListOf types.str);
                default = null;
                example = [ "Qwen3-8B-Q4_K_M.gguf" ];
                description = ''
                  Globs of the files to fetch; `null` fetches every file. A server that loads
                  one file (a GGUF) loads the first, which must name it without a pattern.
                '';
              };
            };
          }
        );
        default = null;
        description = ''
          Weights fetched from the Hugging Face hub by `llmhop-fetch-<name>.service` before
          any worker of the model starts; the workers get the local snapshot and run offline.
        '';
      };
      path = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/srv/models/qwen3-8b";
        description = "Weights already on disk (or a derivation): the file (a GGUF) or directory the server loads.";
      };
      tokenCredential = mkOption {
        type = types.nullOr (
          types.either types.externalPath (types.strMatching llmhopLib.credentialNamePattern)
        );
        default = null;
        example = "/run/secrets/hf-token";
        description = ''
          The hub token of a gated or private repository, kept out of the Nix store: a file
          (`LoadCredential=`) or a credential name imported from the credential store
          (`ImportCredential=`). Only the fetch unit gets it.
        '';
      };
      prune = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Whether the fetch unit removes the repository's other revisions from the cache (those
          other models of the same cache declare are kept).
        '';
      };
    };
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
      options = containerOptions.modelOptions { inherit backendCfg; } // {
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
        weights = mkOption {
          type = types.submodule weightsModule;
          default = { };
          description = "The model's weights, declared so that they are there before its workers start.";
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
          defaultText =
            if parallelFlags == [ ] then
              lib.literalExpression "false"
            else
              lib.literalMD "whether a parallelism flag in the settings exceeds 1";
          description = ''
            Whether a native model talks NCCL between its GPU processes: netlink, binds on any
            TCP port (the ephemeral rendezvous), `NCCL_SOCKET_IFNAME=lo` and no InfiniBand.
          ''
          + (
            if parallelFlags == [ ] then
              "Off unless set: the server has no flag that spreads a model over GPU processes."
            else
              ''
                On when a parallelism flag (${lib.concatStringsSep ", " parallelFlags}) exceeds 1.
              ''
          );
        };
        onDemand = {
          enable = lib.mkEnableOption (
            lib.removeSuffix "\n" ''
              starting this model on its first connection and stopping it when idle: a socket
              unit owns its `socket` or `port`, and `systemd-socket-proxyd` in front of the
              server starts it and passes the connection on once it is healthy
            ''
          );
          idleTimeout = mkOption {
            type = types.strMatching llmhopLib.timeSpanPattern;
            default = "10min";
            example = "30min";
            description = ''
              How long the model stays loaded without a connection (a systemd time span); the
              router's `upstreamIdleTimeout` for it is set below it.
            '';
          };
          workerPort = mkOption {
            type = types.nullOr types.port;
            default = null;
            example = 30101;
            description = ''
              The loopback port the server listens on behind the proxy; `null` gives it a
              private unix socket, {file}`<socketDirectory>/${backend}-<name>/worker/http.sock`.
            ''
            + lib.optionalString (!socketCapable) "Required: the server serves no unix socket.";
          };
          trustLocalUsers = mkOption {
            type = types.bool;
            default = false;
            description = ''
              Whether every local user may be trusted with this model's `port`: its socket
              listens on 127.0.0.1, where anyone on the host can start the model, past the
              router's keys, and so stop the other models of its `group` mid-request. Without
              it a group member on a port draws a warning; a unix socket (`port = null`) is not
              open to every local user.
            '';
          };
        };
        group = mkOption {
          type = types.nullOr types.nonEmptyStr;
          default = null;
          example = "gpu0";
          description = ''
            The router's `group` of this model (not a unix group): models of one group are
            served one at a time, and their workers conflict, so starting one stops the
            other. Every member must be on demand and run under the same systemd manager.
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
        replicas = mkOption {
          type = types.listOf (types.submodule replicaModule);
          default = [ ];
          example = lib.literalExpression ''[ { gpus = [ "0" ]; } { gpus = [ "1" ]; } ]'';
          description = ''
            Several servers of this model, e.g. one per GPU: each replica is its own unit
            `${backend}-<name>-<index>` (from 0) on its own port or socket, and the router
            spreads requests over them all (the route's `urls`). Empty: one unit,
            `${backend}-<name>`.
          '';
        };
      };
    };
in
rec {
  inherit unitValue settingsType environmentOption environmentFileOption;

  # Options of services.llmhop.<backend>: the shared ones plus `extraOptions` (runtime-specific
  # ones such as `package`, `user`) and `modelOptions` (a module added to every model).
  backendOptions =
    {
      backend,
      displayName,
      socketDirectory,
      # This backend's config (option defaults refer to it).
      cfg,
      # The image (without tag) and default tag of the container runtime, and how the docs
      # show that tag when it depends on the configuration.
      image,
      tag,
      tagText ? null,
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
    containerOptions.backendOptions {
      inherit
        backend
        displayName
        image
        tag
        tagText
        nvidiaToolkit
        ;
      defaultUid = containerOptions.defaultUids.${backend};
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

  # `user` and `group` of a backend whose native units run under a named account.
  namedUserOptions = backend: {
    user = mkOption {
      type = types.str;
      default = backend;
      description = ''
        The user of every native model: a real account rather than `DynamicUser=`, whose
        private mounts are noexec while the runtime loads kernels it compiled into its cache.
        Declared by the module under its default name (UID and GID
        ${toString containerOptions.defaultUids.${backend}}, as the container user's).
      '';
    };
    group = mkOption {
      type = types.str;
      default = backend;
      description = "The group of every native model, owning its socket directory; the router joins it.";
    };
  };

  # The `model` option of vLLM and SGLang models.
  modelOption = {
    options.model = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "meta-llama/Meta-Llama-3-8B-Instruct";
      description = "The model to serve: a Hugging Face repository or a path; `weights` replace it.";
    };
  };

  # The hub client of the fetch units.
  hubPackageOption = pkgs: {
    huggingfaceHubPackage = lib.mkPackageOption pkgs [ "python3Packages" "huggingface-hub" ] {
      extraDescription = "The fetch units run it with its own Python (`weights.huggingface`).";
    };
  };

}
