# Evaluate llmhop's NixOS modules without nixpkgs: lib.evalModules over modules/, the real
# quadlet-nix module, stub declarations of the NixOS options they write (nixos-stubs.nix) and
# a stub pkgs (stub-pkgs.nix). Returns JSON-friendly data: rendered units, the evaluated
# units, users, groups, tmpfiles, firewall, failed assertions and warnings.
{
  lib,
  # The source tree of mirkolenz/quadlet-nix (a path or store path string).
  quadlet-nix,
}:
{
  # Extra NixOS modules: a test's configuration.
  modules ? [ ],
  # Package name -> real directory to use as its outPath (see stub-pkgs.nix).
  pkgsOverrides ? { },
}:
let
  pkgs = import ./stub-pkgs.nix {
    inherit lib;
    overrides = pkgsOverrides;
  };

  eval = lib.evalModules {
    modules = [
      ./nixos-stubs.nix
      # As nixosModules.default in flake.nix: quadlet-nix's module (nixosModules.quadlet) + ours.
      "${quadlet-nix}/config-modules/nixos.nix"
      ../../modules
      { _module.args.pkgs = lib.mkDefault pkgs; }
    ]
    ++ modules;
  };

  inherit (eval) config;

  units = kind: lib.filterAttrs (_: u: u.enable) config.systemd.${kind};

  unitView =
    def:
    lib.filterAttrs (_: v: v != null && v != [ ] && v != { } && v != "") {
      inherit (def)
        description
        requires
        wants
        upholds
        after
        before
        bindsTo
        partOf
        conflicts
        wantedBy
        requiredBy
        upheldBy
        aliases
        startLimitBurst
        startLimitIntervalSec
        unitConfig
        overrideStrategy
        ;
      serviceConfig = def.serviceConfig or null;
      path = map toString (def.path or [ ]);
      environment = def.environment or null;
      listenStreams = def.listenStreams or null;
      socketConfig = def.socketConfig or null;
      timerConfig = def.timerConfig or null;
      startAt = def.startAt or null;
    };

  render = import ./render.nix { inherit lib pkgs; };

  # An option's documentation as the NixOS manual renders it (lib.optionAttrSetToDocList), without
  # where it is declared: name, type, default, example, description, readOnly.
  docView =
    opt:
    {
      inherit (opt)
        name
        type
        description
        readOnly
        ;
    }
    // lib.optionalAttrs (opt ? default) { inherit (opt) default; }
    // lib.optionalAttrs (opt ? example) { inherit (opt) example; };
in
{
  # The documented (visible, not internal) options of services.llmhop; read only when asked
  # for (cli.nix `what = "options"`).
  options =
    let
      docs = lib.optionAttrSetToDocList eval.options.services.llmhop;
      # An internal option's sub-options are listed as visible: hide them with it.
      hidden = map (opt: opt.name) (lib.filter (opt: opt.internal || !opt.visible) docs);
      shown = opt: !lib.any (name: opt.name == name || lib.hasPrefix "${name}." opt.name) hidden;
    in
    map docView (lib.filter shown docs);

  units = render config;
  services = lib.mapAttrs (_: unitView) (units "services");
  sockets = lib.mapAttrs (_: unitView) (units "sockets");
  timers = lib.mapAttrs (_: unitView) (units "timers");
  userServices = lib.mapAttrs (_: unitView) (
    lib.filterAttrs (_: u: u.enable) config.systemd.user.services
  );
  users = lib.mapAttrs (
    _: u:
    removeAttrs u [
      "shell"
    ]
  ) config.users.users;
  groups = config.users.groups;
  tmpfiles = {
    inherit (config.systemd.tmpfiles) rules settings;
  };
  firewall = {
    inherit (config.networking.firewall) allowedTCPPorts allowedUDPPorts;
  };
  etc = lib.mapAttrs (_: e: {
    inherit (e) text mode user group;
    source = if e.source == null then null else toString e.source;
    # writeTextFile's build-time check (stub-pkgs keeps it).
    checkPhase = e.source.checkPhase or null;
  }) config.environment.etc;
  # llmhop's registries: owner -> port, unit, route.
  registries = {
    inherit (config.services.llmhop) portsRegistry unitsRegistry modelsRegistry;
  };
  quadlet = lib.mapAttrs (_: c: c.text) config.virtualisation.quadlet.containers;
  assertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
}
