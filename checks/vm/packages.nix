# What the VM checks run besides the module: the fake servers (tests/support/fake_engine.py,
# the tests' own) under the names the module starts them by, the official openai client
# (client.py) as `llmhop-vm-client`, and one OCI image of the fakes per role, streamed by
# dockerTools.streamLayeredImage.
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
    file = ../../tests/support/fake_engine.py;
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

  # bin/python3 alone, pointing at `target`: the module starts SGLang containers with
  # `python3 -m sglang.launch_server`, and the gateway's health check runs python3.
  python3As =
    target:
    pkgs.runCommand "llmhop-python3" { } ''
      mkdir -p $out/bin
      ln -s ${target} $out/bin/python3
    '';

  # `podman load` names them localhost/llmhop-fake-engine:<role>, which quadlet-nix's
  # imageStream sets as Image= (checks/vm/containers-config.nix sets the same).
  image =
    role: entrypoint: extraContents:
    pkgs.dockerTools.streamLayeredImage {
      name = "llmhop-fake-engine";
      tag = role;
      # bash gives /bin/sh, which podman runs HealthCmd= with; curl is what the workers' run.
      contents = [
        fakeEngine
        (lib.getBin pkgs.curl)
        pkgs.bash
      ]
      ++ extraContents;
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
    llama-cpp = image "llama-cpp" [ "/bin/llama-server" ] [ ];
    vllm = image "vllm" [
      "/bin/vllm"
      "serve"
    ] [ ];
    # The module replaces this entrypoint with `python3 -m sglang.launch_server`.
    sglang = image "sglang" [ "/bin/sglang-must-be-replaced" ] [
      (python3As "${fakeEngine}/bin/python")
    ];
    # The real gateway image has python3 and no curl: so has this one's health check.
    gateway = image "gateway" [ "/bin/sgl-model-gateway" ] [
      (python3As (lib.getExe' pkgs.python3Minimal "python3"))
    ];
  };
}
