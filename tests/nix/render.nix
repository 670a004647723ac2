# Turn evaluated systemd.{services,sockets,timers,targets,paths,slices} into unit files the
# way NixOS does (nixos/lib/systemd-lib.nix): one `Key=value` line per list element,
# booleans as true/false, dependency lists joined by spaces in [Unit], `environment` as
# quoted Environment= lines, `script`/`preStart`/… as scripts, `startAt` as a timer, and
# wantedBy/requiredBy/upheldBy/aliases as symlinks rather than an [Install] section.
#
# Returns { system = { files; links; }; user = { files; links; }; } where `files` maps a
# path relative to the unit directory (e.g. "llmhop.service", "foo.service.d/overrides.conf")
# to its text, and `links` maps a symlink path (e.g. "sockets.target.wants/llmhop-default.socket")
# to the unit file name it points to.
{ lib, pkgs }:
let
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;

  # One line per value; a list gives one line per element, an empty list none.
  entryLines = key: value: map (v: "${key}=${toOption v}\n") (lib.toList value);

  # Lines of several attribute sets, keys sorted, earlier sets' lines first for a shared key.
  sectionText =
    attrsList:
    let
      keys = lib.sort lib.lessThan (lib.unique (lib.concatMap lib.attrNames attrsList));
    in
    lib.concatStrings (
      lib.concatMap (key: lib.concatMap (attrs: lib.optionals (attrs ? ${key}) (entryLines key attrs.${key})) attrsList) keys
    );

  section =
    name: attrsList:
    let
      body = sectionText attrsList;
    in
    "[${name}]\n${body}";

  joined = key: list: lib.optionalAttrs (list != [ ]) { ${key} = lib.concatStringsSep " " list; };

  unitSection =
    def:
    section "Unit" [
      (
        lib.optionalAttrs (def.description != "") { Description = def.description; }
        // joined "Documentation" def.documentation
        // joined "Requires" def.requires
        // joined "Wants" def.wants
        // joined "Upholds" def.upholds
        // joined "After" def.after
        // joined "Before" def.before
        // joined "BindsTo" def.bindsTo
        // joined "PartOf" def.partOf
        // joined "Conflicts" def.conflicts
        // joined "Requisite" def.requisite
        // joined "OnFailure" def.onFailure
        // joined "OnSuccess" def.onSuccess
        // lib.optionalAttrs (def.startLimitBurst != null) { StartLimitBurst = def.startLimitBurst; }
        // lib.optionalAttrs (def.startLimitIntervalSec != null) {
          StartLimitIntervalSec = def.startLimitIntervalSec;
        }
        // lib.optionalAttrs ((def.restartTriggers or [ ]) != [ ]) {
          X-Restart-Triggers = lib.concatMapStringsSep " " toString def.restartTriggers;
        }
        // lib.optionalAttrs ((def.reloadTriggers or [ ]) != [ ]) {
          X-Reload-Triggers = lib.concatMapStringsSep " " toString def.reloadTriggers;
        }
      )
      def.unitConfig
    ];

  defaultPath = with pkgs; [
    coreutils
    findutils
    gnugrep
    gnused
    systemd
  ];

  script =
    name: kind: text:
    pkgs.writeShellScript "unit-script-${name}-${kind}" text;

  serviceText =
    name: def:
    let
      path = def.path ++ defaultPath;
      environment =
        lib.filterAttrs (_: v: v != null) def.environment
        // {
          PATH = "${lib.makeBinPath path}:${lib.makeSearchPathOutput "bin" "sbin" path}";
        };
      scripts =
        lib.optionalAttrs (def.script != "") {
          ExecStart = "${script name "start" def.script}${lib.optionalString (def.scriptArgs != "") " ${def.scriptArgs}"}";
        }
        // lib.optionalAttrs (def.preStart != "") { ExecStartPre = "${script name "pre-start" def.preStart}"; }
        // lib.optionalAttrs (def.postStart != "") { ExecStartPost = "${script name "post-start" def.postStart}"; }
        // lib.optionalAttrs (def.reload != "") { ExecReload = "${script name "reload" def.reload}"; }
        // lib.optionalAttrs (def.preStop != "") { ExecStop = "${script name "pre-stop" def.preStop}"; }
        // lib.optionalAttrs (def.postStop != "") { ExecStopPost = "${script name "post-stop" def.postStop}"; };
      envLines = lib.concatStrings (
        lib.mapAttrsToList (k: v: "Environment=${builtins.toJSON "${k}=${toString v}"}\n") environment
      );
      # What switch-to-configuration reads, in [Service] as NixOS writes it (reloading wins
      # over not restarting).
      switchLines =
        (
          if def.reloadIfChanged then
            "X-ReloadIfChanged=true\n"
          else
            lib.optionalString (!def.restartIfChanged) "X-RestartIfChanged=false\n"
        )
        + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
        + lib.optionalString def.notSocketActivated "X-NotSocketActivated=true\n";
    in
    ''
      ${unitSection def}
      [Service]
      ${envLines}${switchLines}${sectionText [
        def.serviceConfig
        scripts
      ]}'';

  kindSection =
    kind: def:
    {
      service = null;
      socket = section "Socket" [
        (
          lib.optionalAttrs (def.listenStreams != [ ]) { ListenStream = def.listenStreams; }
          // lib.optionalAttrs (def.listenDatagrams != [ ]) { ListenDatagram = def.listenDatagrams; }
        )
        def.socketConfig
      ];
      timer = section "Timer" [ def.timerConfig ];
      path = section "Path" [ def.pathConfig ];
      slice = section "Slice" [ def.sliceConfig ];
      target = "";
    }
    .${kind};

  unitText =
    kind: name: def:
    if kind == "service" then serviceText name def else "${unitSection def}\n${kindSection kind def}";

  renderKind =
    kind: defs:
    lib.concatLists (
      lib.mapAttrsToList (
        name: def:
        let
          unit = "${name}.${kind}";
          file = if def.overrideStrategy == "asDropin" then "${unit}.d/overrides.conf" else unit;
          linksFor = suffix: targets: map (t: lib.nameValuePair "${t}.${suffix}/${unit}" unit) targets;
        in
        lib.optionals def.enable [
          {
            files.${file} = unitText kind name def;
            links = lib.listToAttrs (
              linksFor "wants" def.wantedBy
              ++ linksFor "requires" def.requiredBy
              ++ linksFor "upholds" def.upheldBy
              ++ map (a: lib.nameValuePair a unit) def.aliases
            );
          }
        ]
      ) defs
    );

  # `startAt` becomes a timer, as on NixOS.
  startAtTimers =
    services:
    lib.mapAttrs (name: def: {
      inherit name;
      enable = true;
      description = "";
      documentation = [ ];
      requires = [ ];
      wants = [ ];
      upholds = [ ];
      after = [ ];
      before = [ ];
      bindsTo = [ ];
      partOf = [ ];
      conflicts = [ ];
      requisite = [ ];
      onFailure = [ ];
      onSuccess = [ ];
      wantedBy = [ "timers.target" ];
      requiredBy = [ ];
      upheldBy = [ ];
      aliases = [ ];
      startLimitBurst = null;
      startLimitIntervalSec = null;
      unitConfig = { };
      overrideStrategy = "asDropinIfExists";
      timerConfig.OnCalendar = def.startAt;
    }) (lib.filterAttrs (_: def: def.enable && def.startAt != [ ]) services);

  renderScope =
    units:
    let
      parts =
        renderKind "service" units.services
        ++ renderKind "socket" units.sockets
        ++ renderKind "timer" (startAtTimers units.services // units.timers)
        ++ renderKind "target" units.targets
        ++ renderKind "path" units.paths
        ++ renderKind "slice" units.slices;
    in
    {
      files = lib.foldl' (acc: p: acc // p.files) { } parts;
      links = lib.foldl' (acc: p: acc // p.links) { } parts;
    };
in
config: {
  system = renderScope config.systemd;
  user = renderScope config.systemd.user;
}
