# The backend framework: function libraries (not NixOS modules) from which every backend
# module in ../nixos is built.
#
# - options.nix: the options of every backend and model, defined once;
# - container-options.nix: those of the container runtime, which options.nix adds;
# - native.nix: the native runtime (hardened system units);
# - container.nix: the container runtime (Podman through quadlet-nix);
# - on-demand.nix: the socket and proxy in front of a model started on demand;
# - weights.nix: declared weights and the unit that fetches them;
# - assembly.nix: a backend's config (workloads, registries, assertions, units) from them.
lib:
let
  llmhopLib = import ../lib lib;
  onDemand = import ./on-demand.nix { inherit lib llmhopLib; };
  weightsLib = import ./weights.nix { inherit lib llmhopLib; };
  containerOptions = import ./container-options.nix { inherit lib; };
  container = import ./container.nix {
    inherit
      lib
      llmhopLib
      onDemand
      weightsLib
      ;
  };
  native = import ./native.nix {
    inherit
      lib
      llmhopLib
      containerOptions
      onDemand
      weightsLib
      ;
  };
  options = import ./options.nix { inherit lib llmhopLib containerOptions; };
  assembly = import ./assembly.nix {
    inherit
      lib
      llmhopLib
      options
      onDemand
      weightsLib
      ;
    nativeRuntime = native;
    containerRuntime = container;
  };
in
{
  inherit
    llmhopLib
    native
    container
    containerOptions
    ;
  inherit (options) settingsType environmentOption environmentFileOption;
  inherit (assembly)
    backendModule
    pythonBackend
    modelPath
    listenFlags
    instances
    ;
}
