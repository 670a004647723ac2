# systemd: values and ExecStart= escaped as systemd reads them, the sandbox of the router and
# every native worker, and what GPUs and NCCL need relaxed in it.
{ lib, llmhopLib }:
{
  # A value systemd takes literally: no specifier (`%`), no variable (`$`). Quadlet copies
  # `Exec=` and `Environment=` into the ExecStart= of its unit as they are.
  escapeSystemdValue = lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ];

  # One ExecStart= argument, quoted and escaped (as NixOS' utils do).
  escapeExecArg = arg: llmhopLib.escapeSystemdValue (builtins.toJSON (toString arg));

  # A systemd time span (systemd.time(7)) as the on-demand options take it: numbers with units
  # (`10min`, `1h 30min`, `1.5s`), a bare number meaning seconds.
  timeSpanPattern =
    let
      units = "us|usec|ms|msec|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hour|hours|d|day|days|w|week|weeks";
    in
    "[[:space:]]*([0-9]+(\\.[0-9]+)?[[:space:]]*(${units})?[[:space:]]*)+";

  # Its length in seconds (a float where a fraction remains).
  timeSpanSeconds =
    span:
    let
      factors = {
        us = 1.0e-6;
        usec = 1.0e-6;
        ms = 1.0e-3;
        msec = 1.0e-3;
        "" = 1;
        s = 1;
        sec = 1;
        secs = 1;
        second = 1;
        seconds = 1;
        m = 60;
        min = 60;
        mins = 60;
        minute = 60;
        minutes = 60;
        h = 3600;
        hr = 3600;
        hour = 3600;
        hours = 3600;
        d = 86400;
        day = 86400;
        days = 86400;
        w = 604800;
        week = 604800;
        weeks = 604800;
      };
      terms = lib.filter lib.isList (builtins.split "([0-9]+(\\.[0-9]+)?)[[:space:]]*([[:alpha:]]*)" span);
    in
    lib.foldl' (sum: term: sum + builtins.fromJSON (lib.elemAt term 0) * factors.${lib.elemAt term 2}) 0 terms;

  # A user name as systemd accepts it for `DynamicUser=`: ASCII letters, digits, `_` and `-`,
  # not starting with a digit or `-`, at most 31 characters. `name` itself when it is one;
  # else its invalid characters as `-`, shortened, and a hash of the whole name appended, so
  # that names that differ only in what was changed or cut stay apart.
  dynamicUserName =
    name:
    let
      maxLength = 31;
      hash = builtins.substring 0 8 (builtins.hashString "sha256" name);
      sanitised = lib.concatMapStrings (
        char: if builtins.match "[A-Za-z0-9_-]" char != null then char else "-"
      ) (lib.stringToCharacters name);
      start = lib.optionalString (builtins.match "[A-Za-z_].*" sanitised == null) "_";
    in
    if builtins.match "[A-Za-z_][A-Za-z0-9_-]{0,${toString (maxLength - 1)}}" name != null then
      name
    else
      "${builtins.substring 0 (maxLength - 9) (start + sanitised)}-${hash}";

  # ExecStart= from an argv; the credentials placeholder becomes `%d` after escaping.
  escapeExecArgs =
    args:
    lib.replaceStrings [ llmhopLib.credentialsDirectoryPlaceholder ] [ "%d" ] (
      lib.concatMapStringsSep " " llmhopLib.escapeExecArg args
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
    RestrictAddressFamilies = llmhopLib.hardening.RestrictAddressFamilies ++ [ "AF_NETLINK" ];
    SocketBindAllow = "tcp";
  };

  # One host: loopback only, no InfiniBand probing.
  ncclEnvironment = {
    NCCL_SOCKET_IFNAME = "lo";
    NCCL_IB_DISABLE = "1";
  };

  # Kernel and shader caches of GPU runtimes, kept in the worker's cache directory; CUDA's
  # device numbers in PCI bus order, as nvidia-smi and CDI's `nvidia.com/gpu=<n>` count them
  # (CUDA's own order puts the fastest first).
  gpuEnvironment = cacheDirectory: {
    CUDA_DEVICE_ORDER = "PCI_BUS_ID";
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
