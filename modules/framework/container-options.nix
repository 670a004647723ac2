# The options of the container runtime: backend-wide (`backendOptions`, with `defaultUids`
# for the container users) and per model (`modelOptions`), which options.nix adds to every
# backend, and the image and Quadlet options the SGL Model Gateway shares. container.nix
# builds the containers from them.
{ lib }:
let
  inherit (lib) mkOption types;

  # A Quadlet section value: a systemd value or, for Environment=, an attribute set.
  quadletValue = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    (types.attrsOf types.str)
    (types.listOf (
      types.oneOf [
        types.int
        types.str
        types.path
      ]
    ))
  ];

  sectionOption =
    section: what:
    mkOption {
      type = types.attrsOf quadletValue;
      default = { };
      description = "`[${section}]` keys (PascalCase, as Quadlet spells them) of ${what}.";
    };

  # The raw Quadlet layers; a model's win over the backend's key by key.
  quadletLayers = what: {
    containerConfig = sectionOption "Container" what;
    serviceConfig = sectionOption "Service" what;
    unitConfig = sectionOption "Unit" what;
    quadletConfig = sectionOption "Quadlet" what;
    extraConfig = mkOption {
      type = types.attrsOf (types.attrsOf quadletValue);
      default = { };
      description = "Further sections of ${what}'s unit, by section name.";
    };
  };

  digestType = types.strMatching "sha256:[0-9a-f]{64}";

  # An OCI tag: no empty one (which Podman reads as `latest`), no `@digest` smuggled in.
  tagType = types.strMatching "[[:alnum:]_][[:alnum:]_.-]{0,127}";

  # The account rootless containers run under (`quadlet.user`).
  userModule =
    { backend, defaultUid }:
    { config, ... }:
    {
      options = {
        manage = mkOption {
          type = types.bool;
          default = true;
          description = "Whether the module declares the user and group (system user, lingering, sub-UID/GID ranges).";
        };
        name = mkOption {
          type = types.str;
          default = backend;
          description = "The user whose systemd instance runs the containers.";
        };
        uid = mkOption {
          type = types.ints.positive;
          default = defaultUid;
          description = ''
            Its UID: fixed, because the units are user units that name it (`ConditionUser=`).
            Another user with the same UID fails evaluation.
          '';
        };
        group = mkOption {
          type = types.str;
          default = config.name;
          defaultText = lib.literalMD "`name`";
          description = "Its group.";
        };
        gid = mkOption {
          type = types.ints.positive;
          default = config.uid;
          defaultText = lib.literalMD "`uid`";
          description = "The GID of its group.";
        };
        home = mkOption {
          type = types.str;
          default = "/var/lib/${config.name}";
          defaultText = lib.literalMD "{file}`/var/lib/<name>`";
          description = "Its home, holding the rootless container storage.";
        };
      };
    };
in
rec {
  # The fixed UIDs (and GIDs) of the backends' container users (documented in docs/module.md):
  # outside NixOS' static ids, its automatic system (400–999) and normal (1000–29999) ranges,
  # and below DynamicUser= (61184–65519).
  defaultUids = {
    llama-cpp = 60601;
    vllm = 60602;
    sglang = 60603;
  };

  inherit quadletLayers;

  # `image` and `tag` of a whole backend, or of the gateway: the defaults for what they run.
  imageOptions =
    {
      image,
      tag,
      # How the docs show `tag`'s default, when it depends on the configuration.
      tagText ? null,
      what,
    }:
    {
      image = mkOption {
        type = types.str;
        default = image;
        description = "The image of ${what}, without tag or digest.";
      };
      tag = mkOption {
        type = tagType;
        default = tag;
        example = "v0.11.0";
        description = ''
          The image tag of ${what}, pulled again whenever the registry has a newer image
          under it (`Pull=newer`). Pin a release tag, or a `digest`, so that a restart never
          starts another engine version.
        '';
      }
      // lib.optionalAttrs (tagText != null) { defaultText = tagText; };
    };

  # `digest` of a model or the gateway: an image pinned by content instead of a tag.
  digestOption = mkOption {
    type = types.nullOr digestType;
    default = null;
    example = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    description = ''
      The image digest, instead of a tag: `image@digest` is the same image on every
      start and is never pulled again (`Pull=missing`).
    '';
  };

  # Options of services.llmhop.<backend> for the container runtime.
  backendOptions =
    {
      backend,
      displayName,
      image,
      tag,
      tagText,
      defaultUid,
      nvidiaToolkit,
    }:
    imageOptions {
      inherit image tag tagText;
      what = "every model without its own (container runtime)";
    }
    // {
      devices = mkOption {
        type = types.listOf types.str;
        default = lib.optional nvidiaToolkit "nvidia.com/gpu=all";
        defaultText = lib.literalExpression ''lib.optional config.hardware.nvidia-container-toolkit.enable "nvidia.com/gpu=all"'';
        example = [ "nvidia.com/gpu=0" ];
        description = ''
          Devices of every container (`AddDevice=`): CDI names (`nvidia.com/gpu=all`,
          `amd.com/gpu=0`, `intel.com/gpu=…`) or {file}`/dev` paths. A model's `devices`
          replaces them.
        '';
      };
      cache.directory = mkOption {
        type = types.str;
        default = "/var/cache/${backend}";
        description = "The host cache (models, kernels) every ${displayName} container mounts; owned by the container user.";
      };
      quadlet = quadletLayers "every model's container" // {
        user = mkOption {
          type = types.nullOr (types.submodule (userModule { inherit backend defaultUid; }));
          default = { };
          example = null;
          description = ''
            The user whose systemd instance runs the containers as user units (rootless
            Podman, where the NVIDIA CDI hook can read the OCI bundle). `null` runs them as
            rootful system units.
          '';
        };
      };
    };

  # Options of every model for the container runtime.
  modelOptions =
    { backendCfg }:
    {
      image = mkOption {
        type = types.str;
        default = backendCfg.image;
        defaultText = lib.literalMD "the backend's `image`";
        description = "The image of this model, without tag or digest.";
      };
      tag = mkOption {
        type = types.nullOr tagType;
        default = null;
        description = "The image tag (pulled when newer); `null` takes the backend's `tag` unless `digest` is set.";
      };
      digest = digestOption;
      devices = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        defaultText = lib.literalMD "the backend's `devices`";
        description = ''
          Devices of this container (`AddDevice=`), replacing the backend's `devices`. A
          `gpu` model with none runs without a GPU (a warning says so).
        '';
      };
      shmSize = mkOption {
        type = types.nullOr (types.strMatching "[0-9]+[bkmg]?");
        default = null;
        example = "32g";
        description = "`ShmSize=` of the container (tensor-parallel workers need a large one).";
      };
      quadlet = quadletLayers "this model's container (over the backend's)" // {
        mountOptions = {
          credentials = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "idmap=uids=0-1000-1;gids=0-1000-1" ];
            description = "Options of the read-only credentials mount, after `ro`.";
          };
          socket = mkOption {
            type = types.listOf types.str;
            default = [ "U" ];
            example = [
              "U"
              "z"
            ];
            description = "Options of the socket directory mount (`U` chowns it to the container's root).";
          };
        };
      };
    };
}
