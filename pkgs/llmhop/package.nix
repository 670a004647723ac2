{
  lib,
  stdenvNoCC,
  python3,
  runtimeShell,
}:
let
  root = ../..;

  # What the package and its check read: the router, and the router's tests with the test
  # support they import (tests.support, the fake engine among it), the examples they check and
  # the metrics table of the operating docs, which they hold to what the router exports.
  # Trees are kept whole; plain cleanSourceWith works with Nix 2.8.
  files = [
    "pyproject.toml"
    "pkgs/llmhop/llmhop.py"
    "examples/config.json"
    "docs/operating.md"
    "tests/__init__.py"
  ];
  trees = [
    "tests/router"
    "tests/support"
    "examples/systemd"
  ];
  filter =
    path: type:
    let
      rel = lib.removePrefix (toString root + "/") (toString path);
      # A directory on the way to something kept.
      leadsTo = kept: kept == rel || lib.hasPrefix "${rel}/" kept;
    in
    lib.any leadsTo (files ++ trees) || lib.any (tree: lib.hasPrefix "${tree}/" rel) trees;

  pyproject = lib.importTOML (root + "/pyproject.toml");
in
stdenvNoCC.mkDerivation {
  pname = "llmhop";
  inherit (pyproject.project) version;

  src = lib.cleanSourceWith {
    name = "llmhop-source";
    src = lib.cleanSource root;
    inherit filter;
  };

  dontConfigure = true;
  dontBuild = true;

  installPhase = ''
    runHook preInstall

    install -Dm644 pkgs/llmhop/llmhop.py $out/lib/llmhop/llmhop.py
    # Started by import, from bytecode compiled here: a script is compiled at every start, and
    # what that leaves behind is a fifth of the idle router's memory. The store never changes,
    # so the bytecode is not checked against the source.
    ${python3.interpreter} -m compileall -q --invalidation-mode unchecked-hash $out/lib/llmhop
    mkdir -p $out/bin
    cat > $out/bin/llmhop <<EOF
    #!${python3.interpreter} -I
    import sys
    sys.path.insert(0, "$out/lib/llmhop")
    from llmhop import main
    sys.exit(main())
    EOF
    chmod 0755 $out/bin/llmhop
    # The same program, told apart by the name it was started under.
    ln -s llmhop $out/bin/llmhop-notify

    runHook postInstall
  '';

  # The router's own tests (tests/e2e, which needs real backends, is not in src). Those that
  # need systemd's tools skip: the sandbox has none.
  doCheck = true;
  nativeCheckInputs = [
    python3
    python3.pkgs.pytest
    # The property tests: generated streams, and h11 as the reference HTTP/1.1 parser.
    python3.pkgs.hypothesis
    python3.pkgs.h11
  ];
  checkPhase = ''
    runHook preCheck
    pytest -p no:cacheprovider tests/router
    runHook postCheck
  '';

  doInstallCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    $out/bin/llmhop --version
    $out/bin/llmhop-notify -h 2> usage.txt
    grep -q '^usage: llmhop-notify' usage.txt
    runHook postInstallCheck
  '';

  meta = {
    description = "One OpenAI-compatible endpoint in front of many local LLM servers";
    license = lib.licenses.mit;
    mainProgram = "llmhop";
    platforms = lib.platforms.unix;
  };
}
