# The llmhop part of the vm-on-demand node (checks/vm.nix), also evaluated by
# tests/nix/test_nix_vm_checks.py: two llama.cpp models of one group, started on demand and
# stopped when idle, whose servers are fakes (`fakeEngine`) that take seconds to load, and a
# third on demand whose server dies while loading.
{ fakeEngine, ... }:
let
  model = extra: {
    onDemand = {
      enable = true;
      idleTimeout = "3s";
      # b listens on a TCP port, and this machine has no other local users.
      trustLocalUsers = true;
    };
    group = "gpu";
    # llmhop-notify probes once a second: three 503s are three seconds of loading.
    settings.fake-loading-probes = 3;
  }
  // extra;
in
{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1";
    port = 8080;
    llama-cpp = {
      package = fakeEngine;
      models = {
        a = model { }; # on /run/llmhop/llama-cpp-a/http.sock
        b = model { port = 18002; };
        broken = {
          onDemand = {
            enable = true;
            idleTimeout = "3s";
          };
          settings.fake-die-while-loading = true;
        };
      };
    };
  };
}
