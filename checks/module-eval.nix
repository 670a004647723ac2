# The module-evaluation suite in Nix: evaluates the module with the harness' stubs
# (tests/nix/evaluate.nix) and checks the results with lib.runTests. It runs while the flake
# is evaluated, so `nix flake check` enforces it even with a lib-only nixpkgs.
#
# Returns { ok = true; summary = "…"; } or throws naming the failed tests.
{ lib, quadlet-nix }:
let
  evaluate = import ../tests/nix/evaluate.nix { inherit lib quadlet-nix; };
  llmhopLib = import ../modules/lib.nix lib;

  router = extra: evaluate {
    modules = [
      { services.llmhop.enable = true; }
      extra
    ];
  };

  # True when evaluating the configuration fails (a type error, a conflict, a throw).
  fails = extra: !(builtins.tryEval (builtins.deepSeq (router extra) null)).success;

  base = router { };
  service = base.services.llmhop;

  tests = {
    testDisabledIsEmpty = {
      expr = (evaluate { }).services;
      expected = { };
    };
    testSocketActivated = {
      expr = {
        inherit (service.serviceConfig) Type Sockets SocketBindDeny;
        inherit (base.sockets.llmhop-default) listenStreams wantedBy socketConfig;
      };
      expected = {
        Type = "notify";
        Sockets = [ "llmhop-default.socket" ];
        SocketBindDeny = "any";
        listenStreams = [ "8080" ];
        wantedBy = [ "sockets.target" ];
        socketConfig.Service = "llmhop.service";
      };
    };
    testExecStart = {
      expr = builtins.match "/nix/store/[^ ]+-llmhop/bin/llmhop --config /nix/store/[^ ]+-llmhop.json" service.serviceConfig.ExecStart != null;
      expected = true;
    };
    testUserDeclared = {
      expr = {
        inherit (base.users.llmhop) isSystemUser group;
        user = service.serviceConfig.User;
        groups = lib.attrNames base.groups;
      };
      expected = {
        isSystemUser = true;
        group = "llmhop";
        user = "llmhop";
        groups = [ "llmhop" ];
      };
    };
    testListenHosts = {
      expr = map (host: (router { services.llmhop = { inherit host; }; }).sockets.llmhop-default.listenStreams) [
        "127.0.0.1"
        "::1"
      ];
      expected = [
        [ "127.0.0.1:8080" ]
        [ "[::1]:8080" ]
      ];
    };
    testBadHostAsserts = {
      expr = (router { services.llmhop.host = "localhost"; }).assertions;
      expected = [ ''services.llmhop.host must be empty or an IP literal, not "localhost".'' ];
    };
    testListenSettingWarns = {
      expr = lib.length (router { services.llmhop.settings.listen = ":9000"; }).warnings;
      expected = 1;
    };
    testListsConcatenate = {
      expr = lib.sort lib.lessThan (router { systemd.services.llmhop.after = [ "extra.service" ]; })
        .services.llmhop.after;
      expected = [
        "extra.service"
        "network-online.target"
      ];
    };
    testConflictingScalarsFail = {
      expr = fails { systemd.services.llmhop.serviceConfig.Type = "simple"; };
      expected = true;
    };
    testMkForceWins = {
      expr =
        (router { systemd.services.llmhop.serviceConfig.Type = lib.mkForce "simple"; })
        .services.llmhop.serviceConfig.Type;
      expected = "simple";
    };
    testTypeErrorFails = {
      expr = fails { services.llmhop.port = 70000; };
      expected = true;
    };
    testQuadletInert = {
      expr = base.quadlet == { } && base.userServices == { };
      expected = true;
    };
    testIpLiterals = {
      expr = map llmhopLib.isListenHost [
        ""
        "0.0.0.0"
        "::"
        "fe80::1"
        "2001:db8:0:0:0:0:0:1"
        "256.1.1.1"
        "localhost"
        "[::1]"
        "1:2:3:4:5:6:7:8:9"
      ];
      expected = [
        true
        true
        true
        true
        true
        false
        false
        false
        false
      ];
    };
  };

  failures = lib.runTests tests;
  names = lib.attrNames tests;
in
{
  ok =
    if failures == [ ] then
      true
    else
      throw "llmhop module-eval failed:\n${lib.generators.toPretty { } failures}";
  summary = "llmhop module-eval: ${toString (lib.length names)} tests passed: ${lib.concatStringsSep " " names}\n";
}
