# Stub declarations of the NixOS options that llmhop's modules and quadlet-nix write, with
# NixOS' merge behaviour: lists concatenate, conflicting scalars are errors, mkForce and
# friends win. Options are declared, never implemented: render.nix turns the result into
# unit files the way NixOS does. Names and types follow nixos/modules; anything not declared
# here is an error ("The option ... does not exist"), as it would be on NixOS.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # The type of a unit file entry (systemd.services.<name>.serviceConfig.<Key> etc.):
  # list definitions concatenate, scalar definitions must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    description = "systemd unit setting";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  sectionOption =
    description:
    mkOption {
      type = types.attrsOf unitOption;
      default = { };
      inherit description;
    };

  unitNames =
    description:
    mkOption {
      type = types.listOf types.str;
      default = [ ];
      inherit description;
    };

  # Options shared by every kind of unit (nixos/lib/systemd-unit-options.nix).
  commonUnitOptions =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          readOnly = true;
        };
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        description = mkOption {
          type = types.singleLineStr;
          default = "";
        };
        documentation = unitNames "Documentation= URLs.";
        requires = unitNames "Requires=";
        wants = unitNames "Wants=";
        upholds = unitNames "Upholds=";
        after = unitNames "After=";
        before = unitNames "Before=";
        bindsTo = unitNames "BindsTo=";
        partOf = unitNames "PartOf=";
        conflicts = unitNames "Conflicts=";
        requisite = unitNames "Requisite=";
        onFailure = unitNames "OnFailure=";
        onSuccess = unitNames "OnSuccess=";
        wantedBy = unitNames "Units that want this one (symlinks in <unit>.wants/).";
        requiredBy = unitNames "Units that require this one (symlinks in <unit>.requires/).";
        upheldBy = unitNames "Units that uphold this one (symlinks in <unit>.upholds/).";
        aliases = unitNames "Alias symlinks.";
        startLimitBurst = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        startLimitIntervalSec = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        unitConfig = sectionOption "The [Unit] section.";
        restartTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        reloadTriggers = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        overrideStrategy = mkOption {
          type = types.enum [
            "asDropinIfExists"
            "asDropin"
          ];
          default = "asDropinIfExists";
        };
      };
    };

  serviceOptions = {
    options = {
      environment = mkOption {
        type =
          with types;
          attrsOf (
            nullOr (oneOf [
              str
              path
              package
            ])
          );
        default = { };
      };
      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
      };
      serviceConfig = sectionOption "The [Service] section.";
      script = mkOption {
        type = types.lines;
        default = "";
      };
      scriptArgs = mkOption {
        type = types.str;
        default = "";
      };
      preStart = mkOption {
        type = types.lines;
        default = "";
      };
      postStart = mkOption {
        type = types.lines;
        default = "";
      };
      preStop = mkOption {
        type = types.lines;
        default = "";
      };
      postStop = mkOption {
        type = types.lines;
        default = "";
      };
      reload = mkOption {
        type = types.lines;
        default = "";
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      reloadIfChanged = mkOption {
        type = types.bool;
        default = false;
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      notSocketActivated = mkOption {
        type = types.bool;
        default = false;
      };
      startAt = mkOption {
        type = with types; either str (listOf str);
        default = [ ];
        apply = lib.toList;
      };
    };
  };

  socketOptions = {
    options = {
      listenStreams = unitNames "ListenStream=";
      listenDatagrams = unitNames "ListenDatagram=";
      socketConfig = sectionOption "The [Socket] section.";
    };
  };

  timerOptions = {
    options.timerConfig = sectionOption "The [Timer] section.";
  };

  pathOptions = {
    options.pathConfig = sectionOption "The [Path] section.";
  };

  sliceOptions = {
    options.sliceConfig = sectionOption "The [Slice] section.";
  };

  units =
    kind:
    mkOption {
      type = types.attrsOf (
        types.submodule [
          commonUnitOptions
          kind
        ]
      );
      default = { };
    };

  unitKinds = {
    services = units serviceOptions;
    sockets = units socketOptions;
    timers = units timerOptions;
    targets = units { };
    paths = units pathOptions;
    slices = units sliceOptions;
  };

  tmpfilesEntry =
    { name, ... }:
    {
      options = {
        type = mkOption {
          type = types.str;
          default = name;
        };
        mode = mkOption {
          type = types.str;
          default = "-";
        };
        user = mkOption {
          type = types.str;
          default = "-";
        };
        group = mkOption {
          type = types.str;
          default = "-";
        };
        age = mkOption {
          type = types.str;
          default = "-";
        };
        argument = mkOption {
          type = types.str;
          default = "";
        };
      };
    };

  userOptions =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        uid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        isSystemUser = mkOption {
          type = types.bool;
          default = false;
        };
        isNormalUser = mkOption {
          type = types.bool;
          default = false;
        };
        group = mkOption {
          type = types.str;
          default = "";
        };
        extraGroups = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        description = mkOption {
          type = types.str;
          default = "";
        };
        home = mkOption {
          type = types.str;
          default = "/var/empty";
        };
        createHome = mkOption {
          type = types.bool;
          default = false;
        };
        shell = mkOption {
          type = types.nullOr (types.either types.package types.str);
          default = null;
        };
        linger = mkOption {
          type = types.nullOr types.bool;
          default = null;
        };
        autoSubUidGidRange = mkOption {
          type = types.bool;
          default = false;
        };
        subUidRanges = mkOption {
          type = types.listOf (types.attrsOf types.int);
          default = [ ];
        };
        subGidRanges = mkOption {
          type = types.listOf (types.attrsOf types.int);
          default = [ ];
        };
      };
    };

  groupOptions =
    { name, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
        };
        gid = mkOption {
          type = types.nullOr types.int;
          default = null;
        };
        members = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
      };
    };

  etcOptions =
    { name, ... }:
    {
      options = {
        enable = mkOption {
          type = types.bool;
          default = true;
        };
        target = mkOption {
          type = types.str;
          default = name;
        };
        text = mkOption {
          type = types.nullOr types.lines;
          default = null;
        };
        source = mkOption {
          type = types.nullOr (types.either types.path types.package);
          default = null;
        };
        mode = mkOption {
          type = types.str;
          default = "symlink";
        };
        user = mkOption {
          type = types.str;
          default = "+0";
        };
        group = mkOption {
          type = types.str;
          default = "+0";
        };
      };
    };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      internal = true;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      internal = true;
      default = [ ];
    };

    systemd = unitKinds // {
      user = unitKinds;
      package = mkOption {
        type = types.package;
        default = pkgs.systemd;
      };
      packages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      tmpfiles = {
        rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        settings = mkOption {
          type = types.attrsOf (types.attrsOf (types.attrsOf (types.submodule tmpfilesEntry)));
          default = { };
        };
      };
    };

    users = {
      users = mkOption {
        type = types.attrsOf (types.submodule userOptions);
        default = { };
      };
      groups = mkOption {
        type = types.attrsOf (types.submodule groupOptions);
        default = { };
      };
    };

    networking.firewall = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      allowedUDPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
    };

    environment = {
      systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      etc = mkOption {
        type = types.attrsOf (types.submodule etcOptions);
        default = { };
      };
    };

    hardware.nvidia-container-toolkit.enable = mkOption {
      type = types.bool;
      default = false;
    };

    virtualisation.podman = {
      enable = mkOption {
        type = types.bool;
        default = false;
      };
      package = mkOption {
        type = types.package;
        default = pkgs.podman;
      };
    };
  };
}
