# The router: services.llmhop.{enable,package,listeners,identity,credentials,settings},
# one llmhop-<name>.socket per listener and a hardened, socket-activated llmhop.service.
# The backends' routes reach `settings.models` through the registries (registries.nix).
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

  defaultUser = "llmhop";

  # A limit of the router's whose `0` lifts it.
  capOption =
    default: what:
    mkOption {
      type = types.ints.unsigned;
      inherit default;
      description = "${what}; `0` means no cap.";
    };

  # The path in ExecStart stays the same across generations, so a new config reloads the
  # router (reloadTriggers) instead of restarting it.
  configPath = "/etc/llmhop/llmhop.json";

  canCheck = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;

  # The tokens of settings.authTokens written out: with no `${cred:…}`, `${env:…}` or
  # `${file:…}` reference (`$$` is a literal `$`), they land in the world-readable store.
  literalTokens =
    let
      reference = ".*[$][{](cred|env|file):[^}]*}.*";
    in
    lib.filter (
      token: builtins.match reference (lib.replaceStrings [ "$$" ] [ "" ] token) == null
    ) cfg.settings.authTokens;

  # The named keys of apiKeys as authTokens entries, after the plain tokens of settings.
  apiKeyEntries = lib.mapAttrsToList (
    name: key:
    { inherit name; }
    // (
      if key.hash != null then
        { sha256 = key.hash; }
      else
        # A reference: the token itself stays out of the Nix store.
        { token = "\${cred:${toString key.tokenCredential}}"; }
    )
    // lib.optionalAttrs (key.models != null) { inherit (key) models; }
    // lib.optionalAttrs (key.maxConcurrentRequests != 0) { inherit (key) maxConcurrentRequests; }
  ) cfg.apiKeys;

  # The keys of a route declared as options, each null while unset.
  nullableRouteKeys = [
    "url"
    "urls"
    "healthPath"
    "metricsPath"
  ];

  configFile = pkgs.writeTextFile {
    name = "llmhop.json";
    text = builtins.toJSON (
      cfg.settings
      // {
        authTokens = cfg.settings.authTokens ++ apiKeyEntries;
        # The router reads an absent key, never a null: the one of url and urls a route has,
        # and the paths it sets.
        models = lib.mapAttrs (
          _: lib.filterAttrs (key: value: value != null || !lib.elem key nullableRouteKeys)
        ) cfg.settings.models;
      }
    );
    # Secret references are checked for syntax only: credentials exist only at run time.
    checkPhase = lib.optionalString canCheck ''
      ${lib.getExe' cfg.package "llmhop"} --check --config "$target"
    '';
  };

  # The options of a listener: of each entry of `listen`, and of the default listener, whose
  # options sit directly in services.llmhop.
  listenerOptions =
    {
      name,
      port,
      listener,
    }:
    {
      host = mkOption {
        type = types.str;
        default = "";
        example = "127.0.0.1";
        description = ''
          The IP literal ${listener} binds to; empty means all interfaces. An IPv6 address is
          written plain, e.g. `::1`.
        '';
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = port;
        description = "The TCP port of ${listener}; `null` serves on the unix socket `socket`.";
      };
      socket = mkOption {
        type = types.strMatching "/.+";
        default = "${cfg.socketDirectory}/${name}.sock";
        defaultText = lib.literalExpression ''"''${config.services.llmhop.socketDirectory}/${name}.sock"'';
        description = "The unix socket path, used while `port` is `null`.";
      };
      socketUser = mkOption {
        type = types.str;
        default = "root";
        description = "The owner of the unix socket.";
      };
      socketGroup = mkOption {
        type = types.str;
        default = "root";
        example = "caddy";
        description = "The group of the unix socket; let a reverse proxy connect by naming its group.";
      };
      socketMode = mkOption {
        type = types.strMatching "0?[0-7]{3}";
        default = "0660";
        description = "The access mode of the unix socket.";
      };
    };

  apiKeyOptions = {
    options = {
      hash = mkOption {
        type = types.nullOr (types.strMatching "[0-9a-fA-F]{64}");
        default = null;
        example = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        description = ''
          The SHA-256 of the token in hex, as `llmhop hash-token` prints it; it may sit in
          the Nix store, unsalted, so the token must be random (`openssl rand -hex 32`).
        '';
      };
      tokenCredential = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "llmhop.chat-ui-token";
        description = "The name of the router's credential (in `credentials`) holding the token, instead of `hash`.";
      };
      models = mkOption {
        type = types.nullOr (types.nonEmptyListOf types.str);
        default = null;
        example = [
          "qwen3-*"
          "embed"
        ];
        description = ''
          Globs (`*`, `?`) of the models the key may use; `null` means every model. Any other
          model answers as an unknown one does (404), and {file}`/v1/models` lists only these.
        '';
      };
      maxConcurrentRequests = mkOption {
        type = types.ints.unsigned;
        default = 0;
        description = "Requests of this key in flight; more get 429 at once; `0` means no cap of its own.";
      };
    };
  };

  # Every listener, the default one included.
  listeners = {
    default = {
      inherit (cfg)
        host
        port
        socket
        socketUser
        socketGroup
        socketMode
        ;
    };
  }
  // cfg.listen;
  tcpListeners = lib.filterAttrs (_: l: l.port != null) listeners;
  unixListeners = lib.filterAttrs (_: l: l.port == null) listeners;
  socketUnits = lib.mapAttrsToList (name: _: "llmhop-${name}.socket") listeners;

  shutdownTimeout = cfg.settings.shutdownTimeout;
in
{
  options.services.llmhop = listenerOptions {
    name = "default";
    port = 8080;
    listener = "the default listener";
  }
  // {
    enable = lib.mkEnableOption "llmhop, a router for OpenAI-compatible LLM servers";

    package = mkOption {
      type = types.package;
      default = pkgs.llmhop or (pkgs.callPackage ../../pkgs/llmhop/package.nix { });
      defaultText = lib.literalExpression "pkgs.llmhop";
      description = ''
        The llmhop package: {command}`bin/llmhop` runs the router, {command}`bin/llmhop-notify`
        the readiness check of every native worker.
      '';
    };

    listen = mkOption {
      type = types.attrsOf (
        types.submodule (
          { name, ... }:
          {
            options = listenerOptions {
              inherit name;
              port = null;
              listener = "this listener";
            };
          }
        )
      );
      default = { };
      example = lib.literalExpression ''
        {
          caddy.socketGroup = "caddy"; # /run/llmhop/caddy.sock
          lan = { host = "192.168.1.2"; port = 8081; };
        }
      '';
      description = "Extra listeners, each a `llmhop-<name>.socket` unit.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Whether to open the port of every TCP listener in the firewall.";
    };

    socketDirectory = mkOption {
      type = types.strMatching llmhopLib.socketDirectoryPattern;
      default = "/run/llmhop";
      example = "/run/sockets/llmhop";
      description = ''
        The root of every llmhop socket: the router's unix listeners and one directory per
        worker (`<socketDirectory>/<unit>/http.sock`). It must lie below {file}`/run`.
      '';
    };

    user = mkOption {
      type = types.str;
      default = defaultUser;
      description = "The user the router runs as; declared by the module only under its default name.";
    };
    uid = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      description = "The UID of the declared user.";
    };
    group = mkOption {
      type = types.str;
      default = cfg.user;
      defaultText = lib.literalExpression "config.services.llmhop.user";
      description = "The router's group; declared by the module only under its default name.";
    };
    gid = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = cfg.uid;
      defaultText = lib.literalExpression "config.services.llmhop.uid";
      description = "The GID of the declared group.";
    };
    supplementaryGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra groups of the router; every native backend adds the group owning its sockets.";
    };

    credentials = llmhopLib.mkCredentialsOption "the router";

    apiKeys = mkOption {
      type = types.attrsOf (types.submodule apiKeyOptions);
      default = { };
      example = lib.literalExpression ''
        {
          ci = {
            hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
            models = [ "qwen3-*" ];
            maxConcurrentRequests = 2;
          };
          chat-ui.tokenCredential = "llmhop.chat-ui-token";
        }
      '';
      description = ''
        Named client keys, by name (1 to 64 letters, digits, `.`, `_`, `-`), rendered into
        the router's `authTokens` after `settings.authTokens`. Each has exactly one of `hash`
        and `tokenCredential`; its name, never its token, shows in the access log and metrics.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          authTokens = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "\${cred:llmhop.client-token}" ];
            description = ''
              Tokens that reach every model; with `apiKeys`, the clients' keys. Both empty turn
              auth off.
            '';
          };
          metricsAuth = mkOption {
            type = types.bool;
            default = cfg.settings.authTokens != [ ] || cfg.apiKeys != { };
            defaultText = lib.literalExpression "config.services.llmhop.settings.authTokens != [ ] || config.services.llmhop.apiKeys != { }";
            description = ''
              Whether {file}`/metrics` needs a token. `false` opens it to anonymous scrapers,
              which are shown only the models {file}`/v1/models` lists.
            '';
          };
          maxBodyBytes = capOption 104857600 "Larger request bodies get 413";
          maxConcurrentRequests = capOption 8 "Proxied requests in flight; more get 503 at once";
          connectTimeout = mkOption {
            type = types.numbers.positive;
            default = 30;
            description = "Seconds to connect to an upstream before answering 504.";
          };
          shutdownTimeout = mkOption {
            type = types.numbers.nonnegative;
            default = 30;
            description = ''
              Seconds requests in flight may finish after SIGTERM; `TimeoutStopSec=` of
              {file}`llmhop.service` leaves 10 s more.
            '';
          };
          models = mkOption {
            type = types.attrsOf (
              types.submodule {
                freeformType = settingsFormat.type;
                options.url = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "unix:///run/llmhop/llama-cpp-qwen3-8b/http.sock";
                  description = "The upstream: `http(s)://host[:port][/base]` or `unix:///path.sock`; or `urls`.";
                };
                options.urls = mkOption {
                  type = types.nullOr (types.nonEmptyListOf settingsFormat.type);
                  default = null;
                  example = [
                    "http://127.0.0.1:18001"
                    "http://192.0.2.2:18001"
                  ];
                  description = ''
                    Several upstreams (replicas) of the model instead of `url`, each a URL or
                    `{ url; headers; }`; the router sends each request to the least busy one.
                  '';
                };
                options.healthPath = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "/health";
                  description = ''
                    A path the router asks with a GET every `healthInterval` seconds (15 by
                    default) to know the model's state before anyone uses it; `null` asks
                    nothing. A backend worker that is always on gets its server's health
                    path; one on demand none, since every probe would start it or keep it
                    loaded.
                  '';
                };
                options.metricsPath = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  example = "/metrics";
                  description = ''
                    The upstream's Prometheus metrics, which the router's {file}`/metrics`
                    includes with a `model` label; `null` for none. A backend worker that is
                    always on gets its server's (turned on where it is a flag); one on demand
                    none, since every scrape would start it or keep it loaded.
                  '';
                };
              }
            );
            default = { };
            description = ''
              Routes by model name (`url` or `urls`, `headers`, `unlisted`). Every enabled
              backend model registers its own; adding `headers` to one here is fine, another
              `url` or `urls` is a collision.
            '';
          };
        };
      };
      default = { };
      example = lib.literalExpression ''
        {
          authTokens = [ "''${cred:llmhop.client-token}" ];
          models.openai-gpt-4o = {
            url = "https://api.openai.com";
            headers.Authorization = "Bearer ''${cred:llmhop.openai-key}";
          };
        }
      '';
      description = ''
        The router's configuration, rendered to {file}`/etc/llmhop/llmhop.json` and checked
        with `llmhop --check` at build time (see the README for every key). Secrets go in as
        `''${cred:name}` references to `credentials`. `host`, `port` and `listen` are ignored:
        the listeners come from systemd.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      lib.mapAttrsToList (name: l: {
        assertion = l.port == null || llmhopLib.isListenHost l.host;
        message = ''services.llmhop${lib.optionalString (name != "default") ".listen.${name}"}.host must be empty or an IP literal, not "${l.host}".'';
      }) listeners
      ++ lib.mapAttrsToList (
        name: l:
        llmhopLib.socketPathAssertion {
          socket = if l.port == null then l.socket else null;
          what = "services.llmhop: the socket of listener ${name}, ${l.socket},";
        }
      ) listeners
      ++ map (name: {
        assertion = builtins.match llmhopLib.listenerNamePattern name != null && name != "default";
        message = ''services.llmhop.listen."${name}": listener names must match ${llmhopLib.listenerNamePattern} and not be "default" (that is services.llmhop.host/port/socket).'';
      }) (lib.attrNames cfg.listen)
      ++ llmhopLib.credentialNameAssertions "services.llmhop" cfg.credentials
      ++ lib.mapAttrsToList (name: route: {
        assertion = (route.url == null) != (route.urls == null);
        message = "services.llmhop.settings.models.${name}: set exactly one of url and urls.";
      }) cfg.settings.models
      ++ lib.concatLists (
        lib.mapAttrsToList (name: key: [
          {
            assertion = builtins.match llmhopLib.apiKeyNamePattern name != null;
            message = ''services.llmhop.apiKeys."${name}": a key name is 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit.'';
          }
          {
            assertion = (key.hash == null) != (key.tokenCredential == null);
            message = "services.llmhop.apiKeys.${name}: set exactly one of hash and tokenCredential.";
          }
          {
            assertion = key.tokenCredential == null || cfg.credentials ? ${key.tokenCredential};
            message = "services.llmhop.apiKeys.${name}.tokenCredential: ${toString key.tokenCredential} is not a credential of the router (services.llmhop.credentials has: ${lib.concatStringsSep ", " (lib.attrNames cfg.credentials)}).";
          }
        ]) cfg.apiKeys
      );

    warnings =
      lib.optional (lib.any (key: cfg.settings ? ${key}) [
        "host"
        "port"
        "listen"
      ])
        ''
          services.llmhop.settings.{host,port,listen} are ignored: the listeners come from
          systemd (services.llmhop.host, port, socket and listen).
        ''
      ++ lib.optional (literalTokens != [ ]) ''
        services.llmhop.settings.authTokens holds a token written out, not a reference such as
        "''${cred:NAME}": it lands in the Nix store, where every local user can read it. Give it
        as a credential (services.llmhop.credentials.NAME, written "''${cred:NAME}"), or as an
        apiKeys entry with its hash.
      '';

    # The router's claims; registries.nix fails evaluation when another owner makes the same.
    services.llmhop.portsRegistry = lib.mapAttrs' (
      name: l: lib.nameValuePair "llmhop.listen.${name}" l.port
    ) tcpListeners;
    services.llmhop.unitsRegistry = {
      llmhop = "llmhop.service";
    }
    // lib.mapAttrs' (name: _: lib.nameValuePair "llmhop.listen.${name}" "llmhop-${name}.socket") listeners;

    users.users = lib.mkIf (cfg.user == defaultUser) {
      ${defaultUser} = {
        isSystemUser = true;
        inherit (cfg) uid group;
        description = "llmhop router";
      };
    };
    users.groups = lib.mkIf (cfg.group == defaultUser) { ${defaultUser}.gid = cfg.gid; };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (
      lib.mapAttrsToList (_: l: l.port) tcpListeners
    );

    # The root of all sockets: anyone may pass through, nobody may list it. No
    # RuntimeDirectory= for it: stopping the router would delete every worker's socket.
    systemd.tmpfiles.rules = [ "d ${cfg.socketDirectory} 0711 root root - -" ];

    environment.etc."llmhop/llmhop.json".source = configFile;

    systemd.sockets = lib.mapAttrs' (
      name: l:
      lib.nameValuePair "llmhop-${name}" {
        description = "llmhop listener ${name}";
        wantedBy = [ "sockets.target" ];
        listenStreams = [
          (if l.port != null then llmhopLib.listenStream { inherit (l) host port; } else l.socket)
        ];
        socketConfig = {
          Service = "llmhop.service";
        }
        // lib.optionalAttrs (l.port == null) {
          SocketUser = l.socketUser;
          SocketGroup = l.socketGroup;
          SocketMode = l.socketMode;
          RemoveOnStop = true;
        };
      }
    ) listeners;

    systemd.services.llmhop = {
      description = "llmhop LLM router";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      startLimitBurst = 3;
      startLimitIntervalSec = 3600;
      # A new config is applied by SIGHUP: `nixos-rebuild switch` reloads, never restarts.
      reloadTriggers = [ configFile ];

      serviceConfig = llmhopLib.withCredentials cfg.credentials (
        llmhopLib.hardening
        // {
          Type = "notify";
          ExecStart = "${lib.getExe' cfg.package "llmhop"} --config ${configPath}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = 5;
          # Requests in flight get shutdownTimeout to finish; systemd waits a little longer.
          TimeoutStopSec = builtins.ceil shutdownTimeout + 10;

          User = cfg.user;
          Group = cfg.group;
          SupplementaryGroups = lib.unique cfg.supplementaryGroups;

          # llmhop binds nothing itself: every listener is passed in by systemd.
          Sockets = socketUnits;
          SocketBindDeny = "any";
          UMask = "0077";

          # Beyond the shared baseline: no devices, no clock, no resource syscalls.
          PrivateDevices = true;
          DevicePolicy = "closed";
          ProtectClock = true;
          SystemCallFilter = llmhopLib.hardening.SystemCallFilter ++ [ "~@resources" ];
        }
      );
    };
  };
}
