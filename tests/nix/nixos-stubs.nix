# Stub declarations of the NixOS options that llmhop's modules and quadlet-nix write, with
# NixOS' merge behaviour: lists concatenate, conflicting scalars are errors, mkForce and
# friends win. Options are declared, never implemented: render.nix turns the result into
# unit files the way NixOS does. Names and types follow nixos/modules; anything not declared
# here is an error ("The option ... does not exist"), as it would be on NixOS.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # Most stubs need nothing but a type and a default.
  option = type: default: mkOption { inherit type default; };

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
        enable = option types.bool true;
        description = option types.singleLineStr "";
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
        startLimitBurst = option (types.nullOr types.int) null;
        startLimitIntervalSec = option (types.nullOr types.int) null;
        unitConfig = sectionOption "The [Unit] section.";
        restartTriggers = option (types.listOf types.unspecified) [ ];
        reloadTriggers = option (types.listOf types.unspecified) [ ];
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
      path = option (types.listOf (types.either types.package types.str)) [ ];
      serviceConfig = sectionOption "The [Service] section.";
      script = option types.lines "";
      scriptArgs = option types.str "";
      preStart = option types.lines "";
      postStart = option types.lines "";
      preStop = option types.lines "";
      postStop = option types.lines "";
      reload = option types.lines "";
      restartIfChanged = option types.bool true;
      reloadIfChanged = option types.bool false;
      stopIfChanged = option types.bool true;
      notSocketActivated = option types.bool false;
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
        type = option types.str name;
        mode = option types.str "-";
        user = option types.str "-";
        group = option types.str "-";
        age = option types.str "-";
        argument = option types.str "";
      };
    };

  userOptions =
    { name, ... }:
    {
      options = {
        name = option types.str name;
        uid = option (types.nullOr types.int) null;
        isSystemUser = option types.bool false;
        isNormalUser = option types.bool false;
        group = option types.str "";
        extraGroups = option (types.listOf types.str) [ ];
        description = option types.str "";
        home = option types.str "/var/empty";
        createHome = option types.bool false;
        shell = option (types.nullOr (types.either types.package types.str)) null;
        linger = option (types.nullOr types.bool) null;
        autoSubUidGidRange = option types.bool false;
        subUidRanges = option (types.listOf (types.attrsOf types.int)) [ ];
        subGidRanges = option (types.listOf (types.attrsOf types.int)) [ ];
      };
    };

  groupOptions =
    { name, ... }:
    {
      options = {
        name = option types.str name;
        gid = option (types.nullOr types.int) null;
        members = option (types.listOf types.str) [ ];
      };
    };

  etcOptions =
    { name, ... }:
    {
      options = {
        enable = option types.bool true;
        target = option types.str name;
        text = option (types.nullOr types.lines) null;
        source = option (types.nullOr (types.either types.path types.package)) null;
        mode = option types.str "symlink";
        user = option types.str "+0";
        group = option types.str "+0";
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
      package = option types.package pkgs.systemd;
      packages = option (types.listOf types.package) [ ];
      tmpfiles = {
        rules = option (types.listOf types.str) [ ];
        settings = mkOption {
          type = types.attrsOf (types.attrsOf (types.attrsOf (types.submodule tmpfilesEntry)));
          default = { };
        };
      };
    };

    users = {
      users = option (types.attrsOf (types.submodule userOptions)) { };
      groups = option (types.attrsOf (types.submodule groupOptions)) { };
    };

    networking.firewall = {
      enable = option types.bool true;
      allowedTCPPorts = option (types.listOf types.port) [ ];
      allowedUDPPorts = option (types.listOf types.port) [ ];
    };

    environment = {
      systemPackages = option (types.listOf types.package) [ ];
      etc = option (types.attrsOf (types.submodule etcOptions)) { };
    };

    hardware.nvidia-container-toolkit.enable = option types.bool false;

    virtualisation.podman = {
      enable = option types.bool false;
      package = option types.package pkgs.podman;
    };
  };
}
