# Listener addresses, the names that become unit names, and the paths of sockets.
{ lib, llmhopLib }:
let
  ipv4Octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  ipv4Regex = "${ipv4Octet}(\\.${ipv4Octet}){3}";
in
{
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
  isListenHost = host: host == "" || llmhopLib.isIPv4 host || llmhopLib.isIPv6 host;

  # The systemd ListenStream= value of a TCP listener: "8080", "127.0.0.1:8080" or "[::1]:8080".
  listenStream =
    { host, port }:
    if host == "" then
      toString port
    else if llmhopLib.isIPv6 host then
      "[${host}]:${toString port}"
    else
      "${host}:${toString port}";

  # Below /run, every component starting with an alphanumeric or `_`: no `..`, no `/var/lib`.
  socketDirectoryPattern = "/run(/[[:alnum:]_][[:alnum:]_.-]*)+";

  # Routing keys and the unit names made from them.
  modelNamePattern = "[[:alnum:]][[:alnum:].-]*";

  # Names of the router's keys, as the router accepts them (they label metrics).
  apiKeyNamePattern = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}";

  # Listener names become unit names (llmhop-<name>.socket).
  listenerNamePattern = "[[:alnum:]_][[:alnum:]_.-]*";

  # sun_path holds 108 bytes including the terminating NUL.
  maxSocketPathLength = 107;

  # How a client reaches a worker: its unix socket, else its loopback port.
  workerUrl =
    { socket, port }: if socket != null then "unix://${socket}" else "http://127.0.0.1:${toString port}";
}
