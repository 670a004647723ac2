# What the VM checks run besides the module: the fake servers (fake_engine.py) under the names
# the module starts them by, the official openai client (client.py) as `llmhop-vm-client`, and
# one OCI image of the fakes per role, streamed by dockerTools.streamLayeredImage.
{ pkgs }:
let
  inherit (pkgs) lib;

  # bin/<program> runs `python -I <file> <args of program> "$@"`.
  scripts =
    {
      name,
      python,
      file,
      programs,
    }:
    pkgs.runCommand name { } ''
      install -Dm644 ${file} $out/lib/${baseNameOf file}
      mkdir -p $out/bin
      ${lib.concatStrings (
        lib.mapAttrsToList (program: args: ''
          printf '#!%s\nexec %s -I %s %s "$@"\n' ${pkgs.runtimeShell} ${python}/bin/python3 \
            $out/lib/${baseNameOf file} ${lib.escapeShellArg (lib.escapeShellArgs args)} \
            > $out/bin/${program}
          chmod +x $out/bin/${program}
        '') programs
      )}
    '';

  fakeEngine = scripts {
    name = "llmhop-fake-engine";
    python = pkgs.python3Minimal;
    file = ./fake_engine.py;
    programs = {
      llama-server = [ "llama-server" ];
      vllm = [ "vllm" ];
      sglang = [ "sglang" ];
      # SGLang's native runtime runs `<package>/bin/python -m sglang.launch_server`.
      python = [ "sglang" ];
      sgl-model-gateway = [ "gateway" ];
      fake-upstream = [ "upstream" ];
    };
  };

  client = scripts {
    name = "llmhop-vm-client";
    python = pkgs.python3.withPackages (ps: [ ps.openai ]);
    file = ./client.py;
    programs.llmhop-vm-client = [ ];
  };

  # `podman load` names them localhost/llmhop-fake-engine:<role>, which quadlet-nix's
  # imageStream sets as Image= (checks/vm/containers-config.nix sets the same).
  image =
    role: entrypoint:
    pkgs.dockerTools.streamLayeredImage {
      name = "llmhop-fake-engine";
      tag = role;
      # bash gives /bin/sh, which podman runs HealthCmd= with; curl is what it runs.
      contents = [
        fakeEngine
        (lib.getBin pkgs.curl)
        pkgs.bash
      ];
      extraCommands = ''
        mkdir -p etc
        echo "hosts: files dns" > etc/nsswitch.conf
      '';
      config = {
        Entrypoint = entrypoint;
        Env = [ "PATH=/bin" ];
      };
    };
in
{
  inherit fakeEngine client;
  images = {
    llama-cpp = image "llama-cpp" [ "/bin/llama-server" ];
    vllm = image "vllm" [
      "/bin/vllm"
      "serve"
    ];
    # The module replaces this entrypoint with `sglang serve`.
    sglang = image "sglang" [ "/bin/sglang-must-be-replaced" ];
    gateway = image "gateway" [ "/bin/sgl-model-gateway" ];
  };
}
