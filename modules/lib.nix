# Pure helpers of the llmhop NixOS module (exported as the flake's `lib`): listener
# addresses, registries, CLI flag rendering, credentials, systemd quoting and hardening.
lib:
let
  inherit (lib) types;

  ipv4Octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  ipv4Regex = "${ipv4Octet}(\\.${ipv4Octet}){3}";

  # `${cred:NAME}` in a string; builtins.split yields the NAME of each match.
  credentialRefRegex = "\\$\\{cred:([^}]*)}";

  # How each server family spells flags.
  dialects = {
    # llama-server: `--no-x`; a list repeats the flag (`--lora a --lora b`).
    llama-cpp = {
      negate = true;
      spreadLists = false;
    };
    # vllm serve: `--no-x`; a list follows one flag (`--lora-modules a b`).
    vllm = {
      negate = true;
      spreadLists = true;
    };
    # sglang and its gateway have no `--no-x`: false is dropped (write `disable-x = true`).
    sglang = {
      negate = false;
      spreadLists = true;
    };
    sglang-gateway = dialects.sglang;
  };

  dialect =
    name:
    dialects.${name}
      or (throw "llmhop: unknown CLI dialect \"${name}\" (known: ${lib.concatStringsSep ", " (lib.attrNames dialects)})");

  # A flag value keeps its Nix type: strings, paths and packages verbatim, the rest as JSON.
  flagValue = value: if lib.isStringLike value then toString value else builtins.toJSON value;

  negatedFlag = key: if lib.hasPrefix "no-" key then lib.removePrefix "no-" key else "no-${key}";

  # The flag words of settings in a dialect; `valued key value` spells one flag with a value.
  renderFlags =
    valued: dialectName: settings:
    let
      d = dialect dialectName;
      flag =
        key: value:
        if value == null || value == [ ] then
          [ ]
        else if value == true then
          [ "--${key}" ]
        else if value == false then
          lib.optional d.negate "--${negatedFlag key}"
        else if lib.isList value then
          if d.spreadLists then [ "--${key}" ] ++ map flagValue value else lib.concatMap (valued key) value
        else
          valued key value;
    in
    lib.concatLists (lib.mapAttrsToList flag settings);
in
rec {
  # --- Listener addresses -----------------------------------------------------------------

  # True for an IPv4 literal such as "127.0.0.1".
  isIPv4 = host: builtins.match ipv4Regex host != null;

  # True for an IPv6 literal written plain, such as "::1" or "fe80::1" (no brackets, no zone).
  isIPv6 =
    host:
    let
      groups = lib.splitString ":" host;
      isGroup = g: builtins.match "[0-9a-fA-F]{1,4}" g != null;
      compressed = lib.hasInfix "::" host;
    in
    builtins.match "[0-9a-fA-F:]+" host != null
    && lib.length (lib.splitString "::" host) <= 2
    && lib.all (g: g == "" || isGroup g) groups
    && (if compressed then lib.length groups <= 9 else lib.length groups == 8);

  # The listener host accepted by `services.llmhop.host`: empty (all interfaces) or an IP literal.
  isListenHost = host: host == "" || isIPv4 host || isIPv6 host;

  # The systemd ListenStream= value of a TCP listener: "8080", "127.0.0.1:8080" or "[::1]:8080".
  listenStream =
    { host, port }:
    if host == "" then
      toString port
    else if isIPv6 host then
      "[${host}]:${toString port}"
    else
      "${host}:${toString port}";

  # --- Names and paths --------------------------------------------------------------------

  # Below /run, every component starting with an alphanumeric or `_`: no `..`, no `/var/lib`.
  socketDirectoryPattern = "/run(/[[:alnum:]_][[:alnum:]_.-]*)+";

  # Routing keys and the unit names made from them.
  modelNamePattern = "[[:alnum:]][[:alnum:].-]*";

  # systemd credential names: one path component.
  credentialNamePattern = "[[:alnum:]_][[:alnum:]_.-]{0,254}";
  isCredentialName = name: builtins.match credentialNamePattern name != null;

  # Listener names become unit names (llmhop-<name>.socket).
  listenerNamePattern = "[[:alnum:]_][[:alnum:]_.-]*";

  # sun_path holds 108 bytes including the terminating NUL.
  maxSocketPathLength = 107;

  # How a client reaches a worker: its unix socket, else its loopback port.
  workerUrl =
    { socket, port }: if socket != null then "unix://${socket}" else "http://127.0.0.1:${toString port}";

  # --- Registries -------------------------------------------------------------------------

  # The values of a registry { owner = value; } claimed by more than one owner, each with
  # its owners sorted: { "8080" = [ "llama-cpp.models.a" "llmhop.listen.default" ]; }.
  collisions =
    registry:
    lib.filterAttrs (_: owners: lib.length owners > 1) (
      lib.mapAttrs (_: lib.sort lib.lessThan) (
        lib.groupBy (owner: toString registry.${owner}) (lib.attrNames registry)
      )
    );

  # One failed assertion per collision, naming every owner.
  collisionAssertions =
    what: registry:
    lib.mapAttrsToList (value: owners: {
      assertion = false;
      message = "services.llmhop: ${what} ${value} is claimed more than once, by ${lib.concatStringsSep ", " owners}.";
    }) (collisions registry);

  # --- CLI flags (settings → argv) --------------------------------------------------------

  # settings → argv in the given dialect ("llama-cpp", "vllm", "sglang", "sglang-gateway"):
  # `true` → `--key`, `null` and `[ ]` dropped, `false` → `--no-key` (or dropped), lists per
  # dialect, everything else `--key value`. Keys in attribute order (sorted).
  renderCliArgs = renderFlags (key: value: [
    "--${key}"
    (flagValue value)
  ]);

  # The same as one shell-quoted string in the `--key=value` form (for Quadlet's Exec=).
  # A spread list stays `--key a b`, a repeated one `--key=a --key=b`.
  renderCliArgsShell =
    dialectName: settings:
    lib.concatMapStringsSep " " lib.escapeShellArg (
      renderFlags (key: value: [ "--${key}=${flagValue value}" ]) dialectName settings
    );

  # --- Credentials ------------------------------------------------------------------------

  # The option type of `credentials.<name>`: a path (LoadCredential=), { source; encrypted =
  # true; } (LoadCredentialEncrypted=) or { } (ImportCredential=). Sources must not be in the
  # Nix store, which anyone can read.
  credentialType =
    let
      source = types.submodule {
        options = {
          source = lib.mkOption {
            type = types.nullOr types.externalPath;
            default = null;
            description = ''
              The file (or, with `encrypted`, the `systemd-creds encrypt` output) to load;
              `null` imports the credential by name from {file}`/etc/credstore`,
              {file}`/etc/credstore.encrypted` or the system's credentials.
            '';
          };
          encrypted = lib.mkOption {
            type = types.bool;
            default = false;
            description = "Whether `source` is encrypted ({manpage}`systemd-creds(1)`).";
          };
        };
      };
    in
    # Any string or path becomes { source; }, whose type then refuses store paths (a
    # submodule would import a path as a module).
    types.coercedTo (types.either types.str types.path) (path: { source = path; }) source;

  mkCredentialsOption =
    what:
    lib.mkOption {
      type = types.attrsOf credentialType;
      default = { };
      example = lib.literalExpression ''
        {
          "llmhop.hf-token" = { };
          api-key = "/run/secrets/api-key";
          sealed = { source = "/etc/credstore.encrypted/sealed"; encrypted = true; };
        }
      '';
      description = ''
        systemd credentials of ${what}, by name: a path is loaded with `LoadCredential=`,
        `{ source; encrypted = true; }` with `LoadCredentialEncrypted=`, `{ }` is imported
        with `ImportCredential=`. Refer to one as `''${cred:name}`.
      '';
    };

  # { LoadCredential; LoadCredentialEncrypted; ImportCredential; } for evaluated credentials.
  credentialDirectives =
    credentials:
    let
      pick = pred: lib.filterAttrs (_: pred) credentials;
    in
    {
      LoadCredential = lib.mapAttrsToList (n: c: "${n}:${c.source}") (
        pick (c: c.source != null && !c.encrypted)
      );
      LoadCredentialEncrypted = lib.mapAttrsToList (n: c: "${n}:${c.source}") (
        pick (c: c.source != null && c.encrypted)
      );
      ImportCredential = lib.attrNames (pick (c: c.source == null));
    };

  # serviceConfig with the credential directives appended to any it already has.
  withCredentials =
    credentials: serviceConfig:
    serviceConfig
    // lib.filterAttrs (_: v: v != [ ]) (
      lib.mapAttrs (key: entries: lib.toList (serviceConfig.${key} or [ ]) ++ entries) (
        credentialDirectives credentials
      )
    );

  invalidCredentialNames = credentials: lib.filter (n: !isCredentialName n) (lib.attrNames credentials);

  # Every NAME of `${cred:NAME}` in the strings of a value (attribute sets and lists too).
  credentialRefs =
    value:
    if lib.isString value then
      map lib.head (lib.filter lib.isList (builtins.split credentialRefRegex value))
    else if lib.isList value then
      lib.concatMap credentialRefs value
    else if lib.isAttrs value && !lib.isDerivation value then
      lib.concatMap credentialRefs (lib.attrValues value)
    else
      [ ];

  # `${cred:NAME}` → `<directory>/NAME` in every string of a value; a NAME outside `names`
  # throws. Native units use a placeholder for `%d` (see escapeExecArgs).
  resolveCredentialRefs =
    { names, directory }:
    let
      resolve =
        value:
        if lib.isString value then
          lib.concatMapStrings (
            part:
            if lib.isList part then
              let
                name = lib.head part;
              in
              if lib.elem name names then
                "${directory}/${name}"
              else
                throw "llmhop: \${cred:${name}} names no credential (known: ${lib.concatStringsSep ", " names})"
            else
              part
          ) (builtins.split credentialRefRegex value)
        else if lib.isList value then
          map resolve value
        else if lib.isAttrs value && !lib.isDerivation value then
          lib.mapAttrs (_: resolve) value
        else
          value;
    in
    resolve;

  # --- systemd ----------------------------------------------------------------------------

  # Stands for systemd's `%d` (the credentials directory) until the arguments are escaped.
  credentialsDirectoryPlaceholder = "@llmhop-credentials-directory@";

  # A value systemd takes literally: no specifier (`%`), no variable (`$`). Quadlet copies
  # `Exec=` and `Environment=` into the ExecStart= of its unit as they are.
  escapeSystemdValue = lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ];

  # One ExecStart= argument, quoted and escaped (as NixOS' utils do).
  escapeExecArg = arg: escapeSystemdValue (builtins.toJSON (toString arg));

  # ExecStart= from an argv; the credentials placeholder becomes `%d` after escaping.
  escapeExecArgs =
    args:
    lib.replaceStrings [ credentialsDirectoryPlaceholder ] [ "%d" ] (
      lib.concatMapStringsSep " " escapeExecArg args
    );

  # The sandbox shared by the router and every native worker.
  hardening = {
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
    ];
  };

  # What a worker on a GPU needs relaxed: device nodes, the render/video groups (kept by an
  # identity user namespace; systemd ≥ 257), JIT, pinned memory and /proc/{meminfo,cpuinfo}.
  gpuRelaxations = {
    PrivateDevices = false;
    ProtectClock = false;
    SupplementaryGroups = [
      "render"
      "video"
    ];
    PrivateUsers = "identity";
    MemoryDenyWriteExecute = false;
    LimitMEMLOCK = "infinity";
    ProcSubset = "all";
  };

  # NCCL between the processes of one model (tensor or pipeline parallel): it enumerates
  # interfaces over netlink and binds ephemeral TCP ports for its rendezvous.
  ncclRelaxations = {
    RestrictAddressFamilies = hardening.RestrictAddressFamilies ++ [ "AF_NETLINK" ];
    SocketBindAllow = "tcp";
  };

  # One host: loopback only, no InfiniBand probing.
  ncclEnvironment = {
    NCCL_SOCKET_IFNAME = "lo";
    NCCL_IB_DISABLE = "1";
  };

  # Kernel and shader caches of GPU runtimes, kept in the worker's cache directory.
  gpuEnvironment = cacheDirectory: {
    TRITON_CACHE_DIR = "${cacheDirectory}/triton";
    TORCHINDUCTOR_CACHE_DIR = "${cacheDirectory}/torchinductor";
    MIOPEN_USER_DB_PATH = "${cacheDirectory}/miopen";
    MIOPEN_CUSTOM_CACHE_DIR = "${cacheDirectory}/miopen";
    SYCL_CACHE_PERSISTENT = "1";
    SYCL_CACHE_DIR = "${cacheDirectory}/sycl";
    NEO_CACHE_PERSISTENT = "1";
    NEO_CACHE_DIR = "${cacheDirectory}/neo";
  };
}
