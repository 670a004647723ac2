# Pure helpers of the llmhop NixOS module (exported as the flake's `lib`).
lib:
let
  ipv4Octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
  ipv4Regex = "${ipv4Octet}(\\.${ipv4Octet}){3}";
in
rec {
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
}
