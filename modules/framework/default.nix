# The backend framework: function libraries (not NixOS modules) from which every backend
# module in ../nixos is built.
#
# - options.nix: the options of every backend and model, defined once;
# - native.nix: the native runtime (hardened system units);
# - container.nix: the container runtime (Podman through quadlet-nix);
# - on-demand.nix: the socket and proxy in front of a model started on demand;
# - assembly.nix: a backend's config (workloads, registries, assertions, units) from them.
lib:
let
  llmhopLib = import ../lib lib;
  onDemand = import ./on-demand.nix { inherit lib llmhopLib; };
  container = import ./container.nix { inherit lib llmhopLib onDemand; };
  native = import ./native.nix { inherit lib llmhopLib container onDemand; };
  options = import ./options.nix { inherit lib llmhopLib container; };
  assembly = import ./assembly.nix {
    inherit lib llmhopLib options onDemand;
    nativeRuntime = native;
    containerRuntime = container;
  };
in
{
  inherit llmhopLib native container;
  inherit (options) settingsType environmentOption environmentFileOption;
  inherit (assembly)
    backendModule
    pythonBackend
    listenFlags
    instances
    ;
}
