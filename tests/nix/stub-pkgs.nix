# A stub `pkgs` of fake derivations for evaluating NixOS modules without nixpkgs.
#
# Packages are attribute sets that look like derivations (type, name, outPath, meta) but are
# never built; their outPath is a fake store path unless `overrides.<name>` gives a real
# directory (the harness points `llmhop` at a runnable tree and `coreutils` at /usr).
# Text files (writeText, formats.*.generate) are real: builtins.toFile adds them to the store
# when evaluated with --read-write-mode, so a rendered unit can be started for real.
# Reading an attribute that is not here fails and names this file.
{
  lib,
  overrides ? { },
}:
let
  fakeHash = name: builtins.substring 0 32 (builtins.hashString "sha256" "llmhop-stub-${name}");

  mkPackage =
    name: extra:
    let
      drv = {
        type = "derivation";
        inherit name;
        pname = name;
        version = "0-stub";
        outPath = overrides.${name} or "/nix/store/${fakeHash name}-${name}";
        drvPath = "/nix/store/${fakeHash "drv-${name}"}-${name}.drv";
        outputs = [ "out" ];
        out = drv;
        outputName = "out";
        system = "x86_64-linux";
        meta = {
          mainProgram = name;
        };
        passthru = { };
        override = _: drv;
        overrideAttrs = _: drv;
      }
      // extra;
    in
    drv;

  mkTextFile =
    name: text:
    mkPackage name {
      outPath = builtins.toFile name text;
      inherit text;
    };

  # A fake script: a package whose outPath does not exist, with the text kept for inspection.
  mkScript =
    name: text: extra:
    mkPackage name ({ inherit text; } // extra);

  # A nixpkgs-like JSON value type, as in pkgs.formats.json.
  jsonValue =
    let
      valueType =
        lib.types.nullOr (
          lib.types.oneOf [
            lib.types.bool
            lib.types.int
            lib.types.float
            lib.types.str
            lib.types.path
            (lib.types.attrsOf valueType)
            (lib.types.listOf valueType)
          ]
        )
        // {
          description = "JSON value";
        };
    in
    valueType;

  mkFormat = render: _args: {
    type = jsonValue;
    generate = name: value: mkTextFile name (render value);
  };

  simplePackages = [
    "bash"
    "coreutils"
    "curl"
    "findutils"
    "gnugrep"
    "gnused"
    "llama-cpp"
    "llmhop"
    "ninja"
    "podman"
    "python3"
    "python3Minimal"
    "systemd"
    "util-linux"
    "vllm"
  ];

  known = lib.genAttrs simplePackages (name: mkPackage name { }) // {
    inherit lib;
    system = "x86_64-linux";
    stdenv = {
      hostPlatform = lib.systems.elaborate "x86_64-linux";
      buildPlatform = lib.systems.elaborate "x86_64-linux";
      isLinux = true;
      cc = mkPackage "gcc-wrapper" { };
    };

    # The fetch units run huggingface_hub in `pythonModule.withPackages`, an environment that
    # stands alone here as `huggingface-hub-python` (override it with a Python that has it).
    python3Packages.huggingface-hub = mkPackage "huggingface-hub" {
      pythonModule = known.python3 // {
        withPackages = _: mkPackage "huggingface-hub-python" { };
      };
    };

    formats = {
      json = mkFormat builtins.toJSON;
      # YAML is a superset of JSON.
      yaml = mkFormat builtins.toJSON;
    };

    writeText = mkTextFile;
    # The text is real; checkPhase is kept for inspection but never run.
    writeTextFile =
      {
        name,
        text,
        checkPhase ? "",
        ...
      }:
      mkTextFile name text // { inherit checkPhase; };
    writeTextDir = path: text: mkPackage (baseNameOf path) { inherit text; };
    writeShellScript = name: text: mkScript name text { };
    writeShellScriptBin =
      name: text:
      mkScript name text {
        meta.mainProgram = name;
      };
    writeShellApplication =
      {
        name,
        text,
        ...
      }:
      mkScript name text {
        meta.mainProgram = name;
      };
    runCommand = name: _env: script: mkScript name script { };
    runCommandLocal = name: _env: script: mkScript name script { };
    symlinkJoin = { name, paths, ... }: mkPackage name { inherit paths; };
  };
in
known
// lib.mapAttrs (name: path: known.${name} or (mkPackage name { outPath = path; })) overrides
