# Models on demand: a socket unit owns the model's registered address (its `socket` or `port`)
# and starts `systemd-socket-proxyd` in front of the server on the first connection; the proxy
# is bound to the server (BindsTo=) and ordered after it, so the connection waits in the
# socket's backlog until the server is healthy. The proxy exits when idle, and the server,
# StopWhenUnneeded=, stops with it; a server that fails to load or dies takes the proxy down,
# and the socket then drops the connections still waiting (FlushPending=), which would
# otherwise start the proxy again and again. Demand, not systemd, restarts the server: the
# next connection does. All three live in one systemd manager: the system's, or for a
# rootless container its user's, since these dependencies reach no further.
{ lib, llmhopLib }:
rec {
  # <unit>-proxy.socket and <unit>-proxy.service.
  proxyName = unit: "${unit}-proxy";

  # A worker's Restart=: on demand, the next connection restarts it.
  workerRestart = onDemand: restart: if onDemand then "no" else restart;

  # Whether `nixos-rebuild switch` restarts a changed worker. Not one on demand: its socket is
  # the proxy's, so NixOS would not see it as socket activated, stop it and start it again
  # (waiting for the whole load) only for the idle proxy to stop it; the next load runs the
  # new unit.
  workerRestartIfChanged = onDemand: !onDemand;

  # The [Unit] settings a worker's start depends on: an always-on worker that fails three
  # times in an hour stays down; one on demand starts at every load, as often as its clients
  # and its group ask, and stops once its proxy no longer needs it.
  workerUnitConfig =
    onDemand:
    {
      StartLimitBurst = 3;
      StartLimitIntervalSec = if onDemand then 0 else 3600;
    }
    // lib.optionalAttrs onDemand { StopWhenUnneeded = true; };

  # The router's upstreamIdleTimeout for an on-demand model: half its idle timeout, at most
  # 30 s, so that the router's pooled connections never keep an idle server loaded.
  upstreamIdleTimeout = model: lib.min 30 (llmhopLib.timeSpanSeconds model.onDemand.idleTimeout * 0.5);

  # The connections a proxy carries at once (systemd-socket-proxyd refuses more, by default
  # beyond 256): every request the router lets in, as many again for pooled connections
  # closing while new ones open and for local clients, and no cap when the router has none.
  proxyConnections =
    routerCfg:
    let
      cap = routerCfg.settings.maxConcurrentRequests;
    in
    if cap == 0 then 65536 else lib.max 256 (2 * cap);

  # Its open files: each connection holds two sockets and two pipes of two ends (it splices),
  # plus its own.
  proxyOpenFiles = connections: 6 * connections + 64;

  # The assertions of an on-demand model.
  assertions =
    {
      workload,
      routerCfg,
      socketCapable,
      optionPath,
    }:
    let
      inherit (workload) model;
      idle = llmhopLib.timeSpanSeconds model.onDemand.idleTimeout;
      routed = routerCfg.settings.models.${model.name} or { };
      routerIdle = routed.upstreamIdleTimeout or routerCfg.settings.upstreamIdleTimeout or null;
    in
    [
      {
        assertion = model.socket != null || (model.port != null && model.port != 0);
        message = "${optionPath}: on demand, it needs a unix socket or a fixed port for the proxy's socket unit to own, not port 0.";
      }
      {
        assertion = socketCapable || model.onDemand.workerPort != null;
        message = "${optionPath}.onDemand.workerPort must be set: the server serves no unix socket, so behind the proxy it needs a loopback port of its own.";
      }
      {
        assertion = routerIdle == null || idle > routerIdle;
        message = "${optionPath}.onDemand.idleTimeout (${model.onDemand.idleTimeout}) must be longer than the router's upstreamIdleTimeout for ${model.name} (${toString routerIdle} s): its pooled connections would keep the server loaded.";
      }
      {
        assertion = workload.manager != "the system manager" || routerCfg.enable;
        message = "${optionPath}: on demand, it needs services.llmhop.enable: its proxy runs as the router's user.";
      }
      {
        assertion = model.replicas == [ ];
        message = "${optionPath}: replicas cannot be on demand (each would need a socket, a proxy and a worker of its own); leave replicas empty or turn onDemand off.";
      }
      (llmhopLib.socketPathAssertion {
        inherit (workload.listen) socket;
        what = "${optionPath}: the server's socket behind the proxy, ${toString workload.listen.socket},";
        hint = "; shorten the name or services.llmhop.socketDirectory";
      })
    ];

  # A group member's socket on a TCP port: 127.0.0.1 admits every local user, and a connection
  # starts the model, whose Conflicts= stop the member that is serving.
  localTcpWarning =
    { optionPath, model }:
    lib.optional (model.group != null && model.port != null && !model.onDemand.trustLocalUsers) ''
      ${optionPath} is in group ${model.group} and listens on 127.0.0.1:${toString model.port}: any
      local user can connect there past the router's keys, start it and so stop the other models
      of ${model.group} mid-request. Leave port null for a unix socket, or set
      onDemand.trustLocalUsers = true.
    '';

  # A probe or scrape the user gave the route of an on-demand model reaches its socket like a
  # request: it starts the model, and keeps it loaded while it comes more often than the idle
  # timeout (the router cannot tell that the worker stopped).
  watchWarnings =
    {
      optionPath,
      model,
      routerCfg,
    }:
    let
      route = routerCfg.settings.models.${model.name} or { };
      asked = {
        healthPath = "probes it every healthInterval seconds";
        metricsPath = "asks it for its metrics at every scrape of its /metrics";
      };
    in
    lib.mapAttrsToList (key: what: ''
      ${optionPath} is on demand, but the router ${what}
      (services.llmhop.settings.models.${model.name}.${key}): each time starts it, and keeps
      it loaded past onDemand.idleTimeout. Leave ${key} unset for it.
    '') (lib.filterAttrs (key: _: route.${key} or null != null) asked);

  # The socket and proxy of a workload, as systemd.{sockets,services} (or systemd.user.*)
  # entries. `serviceConfig` is who the proxy runs as and its sandbox, `socketConfig` the
  # owner of a unix socket, `unitConfig` the conditions of both (a user unit's ConditionUser=).
  units =
    {
      workload,
      routerCfg,
      systemd,
      serviceConfig ? { },
      socketConfig ? { },
      unitConfig ? { },
    }:
    let
      inherit (workload) model unit;
      proxy = proxyName unit;
      server = workload.listen;
      connections = proxyConnections routerCfg;
    in
    {
      socket = {
        description = "llmhop: ${model.name} on demand";
        wantedBy = [ "sockets.target" ];
        listenStreams = [
          (if model.socket != null then model.socket else "127.0.0.1:${toString model.port}")
        ];
        socketConfig = {
          Service = "${proxy}.service";
          FlushPending = true;
        }
        // lib.optionalAttrs (model.socket != null) (
          {
            SocketMode = "0660";
            RemoveOnStop = true;
          }
          // socketConfig
        );
        inherit unitConfig;
      };
      service = {
        description = "llmhop: proxy starting ${model.name} on demand";
        bindsTo = [ "${unit}.service" ];
        after = [ "${unit}.service" ];
        inherit unitConfig;
        serviceConfig = serviceConfig // {
          LimitNOFILE = proxyOpenFiles connections;
          ExecStart = llmhopLib.escapeExecArgs [
            "${systemd}/lib/systemd/systemd-socket-proxyd"
            "--exit-idle-time=${model.onDemand.idleTimeout}"
            "--connections-max=${toString connections}"
            (if server.socket != null then server.socket else "127.0.0.1:${toString server.port}")
          ];
        };
      };
    };

  # The sandbox of a proxy in the system manager: the router's, plus the router's identity
  # (which reaches every worker socket: through the backend's group, or the ACL of container
  # sockets) and `groups`.
  systemServiceConfig =
    { routerCfg, groups }:
    llmhopLib.hardening
    // {
      User = routerCfg.user;
      Group = routerCfg.group;
      SupplementaryGroups = groups;
      PrivateDevices = true;
      DevicePolicy = "closed";
      ProtectClock = true;
      # It binds nothing: the socket unit passes its listener in.
      SocketBindDeny = "any";
      UMask = "0077";
    };
}
