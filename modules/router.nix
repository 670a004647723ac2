{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.llmhop;
  llmhopLib = import ./lib.nix lib;

  settingsFormat = pkgs.formats.json { };
  configFile = settingsFormat.generate "llmhop.json" cfg.settings;
in
{
  options.services.llmhop = {
    enable = lib.mkEnableOption "llmhop, a reverse proxy for OpenAI-compatible LLM servers";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.llmhop;
      defaultText = lib.literalExpression "pkgs.llmhop";
      description = "The llmhop package to use; it provides {command}`bin/llmhop`.";
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = "";
      example = "127.0.0.1";
      description = ''
        The IP literal the default listener binds to; empty means all interfaces.
        An IPv6 address is written plain, e.g. `::1`.
      '';
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 8080;
      description = "The TCP port of the default listener.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          authTokens = [ "''${file:client-token}" ];
          models."qwen3-8b".url = "http://127.0.0.1:18001";
        }
      '';
      description = ''
        The llmhop configuration, rendered to {file}`llmhop.json`.
        `listen` is ignored: systemd opens the listeners (see `host` and `port`).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = llmhopLib.isListenHost cfg.host;
        message = ''services.llmhop.host must be empty or an IP literal, not "${cfg.host}".'';
      }
    ];

    warnings = lib.optional (cfg.settings ? listen) ''
      services.llmhop.settings.listen is ignored: the listeners come from systemd
      (services.llmhop.host and services.llmhop.port).
    '';

    users.users.llmhop = {
      isSystemUser = true;
      group = "llmhop";
      description = "llmhop router";
    };
    users.groups.llmhop = { };

    systemd.sockets.llmhop-default = {
      description = "llmhop listener default";
      wantedBy = [ "sockets.target" ];
      listenStreams = [
        (llmhopLib.listenStream { inherit (cfg) host port; })
      ];
      socketConfig.Service = "llmhop.service";
    };

    systemd.services.llmhop = {
      description = "llmhop LLM router";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      startLimitBurst = 3;
      startLimitIntervalSec = 3600;

      serviceConfig = {
        Type = "notify";
        ExecStart = "${lib.getExe cfg.package} --config ${configFile}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = 5;

        User = "llmhop";
        Group = "llmhop";
        Sockets = [ "llmhop-default.socket" ];
        # llmhop binds nothing itself: every listener is passed in by systemd.
        SocketBindDeny = "any";
        UMask = "0077";

        # Capabilities and privileges
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        RestrictSUIDSGID = true;

        # Network
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];

        # Namespaces
        PrivateDevices = true;
        PrivateIPC = true;
        PrivateMounts = true;
        PrivateTmp = true;
        PrivateUsers = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;

        # Filesystem and kernel
        ProtectControlGroups = true;
        ProtectHome = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        ProtectSystem = "strict";

        # Memory and system calls
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallErrorNumber = "EPERM";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
      };
    };
  };
}
