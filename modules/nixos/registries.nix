# The contract between the router and the backends: every host port, systemd unit and routing
# key the module creates is claimed here by its owner (`llmhop.listen.default`,
# `llama-cpp.models.qwen3-8b`, `sglang.gateway`). A value claimed twice fails evaluation naming
# every owner; each registered route becomes an entry of `settings.models`, under whatever the
# user writes there.
#
# A new kind of workload claims its ports, units and routes here and needs nothing else from
# the router.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  cfg = config.services.llmhop;
  llmhopLib = import ../lib lib;

  settingsFormat = pkgs.formats.json { };
  routeEntry = types.attrsOf settingsFormat.type;

  # Every registry: claims by owner, written by the modules, never by users.
  registry =
    { type, description }:
    mkOption {
      type = types.attrsOf type;
      default = { };
      internal = true;
      inherit description;
    };

  # A field every claim fills in.
  field = type: description: mkOption { inherit type description; };

  routeClaim = types.submodule {
    options = {
      name = field types.str "The routing key.";
      route = field routeEntry "The entry of `settings.models` (`url`, maybe `unlisted`).";
    };
  };

  workerClaim = types.submodule {
    options = {
      unit = field types.str "The worker's unit.";
      manager = field types.str "The systemd manager running it, in words (`the system manager`).";
      group = field types.str "The router's group of the model.";
      onDemand = field types.bool "Whether it starts on demand.";
    };
  };

  # Routes of the backends, by routing key; the first owner (sorted) wins a collision.
  registeredRoutes = lib.foldl' (
    routes: owner:
    let
      entry = cfg.modelsRegistry.${owner};
    in
    if routes ? ${entry.name} then routes else routes // { ${entry.name} = entry.route; }
  ) { } (lib.attrNames cfg.modelsRegistry);

  # Routing keys written by hand in settings.models whose upstream (url or urls) differs from
  # the backend's.
  handWrittenClaims = lib.filterAttrs (
    name: route:
    let
      written = cfg.settings.models.${name} or { };
    in
    lib.any (key: written.${key} or null != route.${key} or null) [
      "url"
      "urls"
    ]
  ) registeredRoutes;

  modelClaims = lib.mapAttrs (_: entry: entry.name) cfg.modelsRegistry // lib.mapAttrs' (
    name: _: lib.nameValuePair "settings.models.${name}" name
  ) handWrittenClaims;
in
{
  options.services.llmhop = {
    portsRegistry = registry {
      type = types.port;
      description = "Host ports by owner (e.g. `llmhop.listen.default`); a port claimed twice fails evaluation.";
    };
    unitsRegistry = registry {
      type = types.str;
      description = "systemd unit names by owner; a unit claimed twice fails evaluation.";
    };
    modelsRegistry = registry {
      type = routeClaim;
      description = "Routes by owner (e.g. `llama-cpp.models.qwen3-8b`); a routing key claimed twice fails evaluation.";
    };
    workersRegistry = registry {
      type = workerClaim;
      description = "Workers in a group, by owner: their workers conflict within a manager.";
    };
  };

  # Checked whether or not the router runs: workers still share ports.
  config = {
    assertions =
      llmhopLib.collisionAssertions "port" cfg.portsRegistry
      ++ llmhopLib.collisionAssertions "unit" cfg.unitsRegistry
      ++ llmhopLib.collisionAssertions "routing key" modelClaims
      ++ lib.concatLists (
        lib.mapAttrsToList (
          group: owners:
          let
            members = map (owner: cfg.workersRegistry.${owner}) owners;
            alwaysOn = lib.filter (owner: !cfg.workersRegistry.${owner}.onDemand) owners;
            managers = lib.unique (map (m: m.manager) members);
          in
          [
            {
              assertion = alwaysOn == [ ];
              message = "services.llmhop: every model of group ${group} must be on demand (onDemand.enable), or it could never be swapped out: ${lib.concatStringsSep ", " alwaysOn} ${if lib.length alwaysOn == 1 then "is" else "are"} not.";
            }
            {
              assertion = lib.length managers == 1;
              message = "services.llmhop: the workers of group ${group} run in ${lib.concatStringsSep " and " managers}, but Conflicts= works within one: run them all natively or rootful, or as containers of one user (${lib.concatStringsSep ", " (lib.sort lib.lessThan owners)}).";
            }
          ]
        ) (lib.groupBy (owner: cfg.workersRegistry.${owner}.group) (lib.attrNames cfg.workersRegistry))
      );

    services.llmhop.settings.models = lib.mapAttrs (_: lib.mapAttrs (_: lib.mkDefault)) registeredRoutes;
  };
}
