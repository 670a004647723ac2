# Declared weights (a model's `weights`): where they are, as the host and the server see them,
# and the unit that fetches them from the Hugging Face hub before any worker of the model starts
# (`llmhop-fetch-<name>`, one per model, native whatever the model's runtime), so that workers
# run offline and a worker's start timeout is a load timeout again.
{ lib, llmhopLib }:
rec {
  # Where a container sees its model's weights, read-only.
  weightsMount = "/run/llmhop/weights";

  isCommit = revision: builtins.match "[0-9a-f]{40}" revision != null;

  # The hub cache's folder of a model repository (as huggingface_hub names it).
  repoFolder = repo: "models--${lib.replaceStrings [ "/" ] [ "--" ] repo}";

  fetchUnit = model: "llmhop-fetch-${model.name}";

  # Whether `glob` has characters fnmatch treats as a pattern.
  isPattern = glob: builtins.match ".*[]*?[].*" glob != null;

  # The weights of a workload, or null when it declares none: `path`, the model as its server
  # gets it (a file with `singleFile`, else a directory); `volumes`, the read-only mounts of a
  # container; with `fetch`, `storage` (the repository's folder in `hubCache`).
  # A pinned commit's snapshot is the hub's own `snapshots/<commit>`; a branch or tag resolves
  # only when fetched, so the fetch unit links `llmhop/<name>` to the snapshot it got.
  of =
    {
      model,
      hubCache,
      container,
      singleFile,
    }:
    let
      inherit (model.weights) huggingface path;
      file = lib.optionalString (
        singleFile && huggingface.files or null != null
      ) "/${lib.head huggingface.files}";
      snapshot =
        if isCommit huggingface.revision then
          "snapshots/${huggingface.revision}"
        else
          "llmhop/${model.name}";
      storage = "${hubCache}/${repoFolder huggingface.repo}";
      onDisk = toString path;
    in
    if huggingface != null then
      {
        fetch = true;
        inherit storage hubCache;
        path = "${if container then weightsMount else storage}/${snapshot}${file}";
        # The repository's folder, not only the snapshot: its files link to ../../blobs.
        volumes = lib.optional container "${storage}:${weightsMount}:ro";
      }
    else if path != null then
      {
        fetch = false;
        path = if container then "${weightsMount}/${baseNameOf onDisk}" else onDisk;
        volumes = lib.optional container "${onDisk}:${weightsMount}/${baseNameOf onDisk}:ro";
      }
    else
      null;

  # A worker's environment with weights: the hub client's offline mode, which every server
  # here uses, so a restart never reaches the network.
  offlineEnvironment = weights: lib.optionalAttrs (weights != null) { HF_HUB_OFFLINE = "1"; };

  # The assertions and warnings of a model's `weights` (at `optionPath`).
  assertions =
    {
      optionPath,
      model,
      singleFile,
    }:
    let
      inherit (model.weights) huggingface path tokenCredential;
      files = huggingface.files or null;
    in
    [
      {
        assertion = huggingface == null || path == null;
        message = "${optionPath}.weights: set either huggingface or path, not both.";
      }
      {
        assertion = huggingface != null || (tokenCredential == null && !model.weights.prune);
        message = "${optionPath}.weights: tokenCredential and prune apply to weights.huggingface, which is not set.";
      }
      {
        assertion = (model.model or "") != null || huggingface != null || path != null;
        message = "${optionPath}: set `model` (a repository or a path) or `weights`.";
      }
    ]
    ++ lib.optional (singleFile && huggingface != null) {
      assertion = files != null && files != [ ] && !isPattern (lib.head files);
      message = "${optionPath}.weights.huggingface.files: the server loads one file, so the first entry must name it without a pattern (e.g. \"Qwen3-8B-Q4_K_M.gguf\"; further entries may be patterns).";
    };

  warnings =
    { optionPath, model }:
    let
      inherit (model.weights) huggingface;
    in
    lib.optional (huggingface != null && !isCommit huggingface.revision) ''
      ${optionPath}.weights.huggingface.revision = "${huggingface.revision}" is a branch or tag,
      not a commit: the model may change under you at the next fetch. Pin the commit (40 hex
      digits, as the repository's "Files and versions" page shows it).
    '';

  # The token's credential: a name imported from the credential store, or a file loaded.
  tokenCredentialName = "huggingface-token";
  tokenDirectives =
    tokenCredential:
    if tokenCredential == null then
      { }
    else if lib.hasPrefix "/" (toString tokenCredential) then
      { LoadCredential = [ "${tokenCredentialName}:${toString tokenCredential}" ]; }
    else
      { ImportCredential = [ tokenCredential ]; };
  tokenName =
    tokenCredential:
    if lib.hasPrefix "/" (toString tokenCredential) then tokenCredentialName else tokenCredential;

  # The systemd.services entry of a model's fetch unit. `identity` and `directories` are the
  # user and the cache of the workers (so the files are theirs), `keep` the revisions of the
  # repository that other models of the same cache declare (pruning spares them), `python` an
  # interpreter with huggingface_hub, `environment` the model's (a mirror, a proxy).
  service =
    {
      model,
      weights,
      identity,
      directories,
      python,
      environment,
      keep,
      systemdVersion,
    }:
    let
      inherit (model.weights) huggingface tokenCredential prune;
      argv = [
        "${python}/bin/python3"
        "${./fetch-weights.py}"
        "--repo"
        huggingface.repo
        "--revision"
        huggingface.revision
        "--cache-dir"
        weights.hubCache
        "--name"
        model.name
      ]
      ++ lib.concatMap (glob: [
        "--include"
        glob
      ]) (if huggingface.files == null then [ ] else huggingface.files)
      ++ lib.optionals (tokenCredential != null) [
        "--token-file"
        "${llmhopLib.credentialsDirectoryPlaceholder}/${tokenName tokenCredential}"
      ]
      ++ lib.optionals prune (
        [ "--prune" ]
        ++ lib.concatMap (revision: [
          "--keep"
          revision
        ]) keep
      );
      # systemd 254 learnt to lengthen the delay between restarts.
      backOff =
        if lib.versionAtLeast systemdVersion "254" then
          {
            RestartSec = 10;
            RestartSteps = 10;
            RestartMaxDelaySec = 600;
          }
        else
          { RestartSec = 60; };
    in
    {
      description = "Fetch the weights of ${model.name} (${huggingface.repo} at ${huggingface.revision})";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # Retried until the hub answers; never given up, as its workers wait for it.
      startLimitIntervalSec = 0;
      environment =
        removeAttrs environment [ "HF_HUB_OFFLINE" ]
        // {
          HF_HUB_DISABLE_TELEMETRY = "1";
          # Progress as lines in the journal, not a redrawn bar.
          PYTHONUNBUFFERED = "1";
        };
      serviceConfig =
        llmhopLib.hardening
        // identity
        // directories
        // tokenDirectives tokenCredential
        // backOff
        // {
          Type = "oneshot";
          RemainAfterExit = true;
          # A first download of a big model takes as long as it takes.
          TimeoutStartSec = "infinity";
          Restart = "on-failure";
          # A revision, repository or token the hub refuses stays refused: no retry.
          RestartPreventExitStatus = 2;
          PrivateDevices = true;
          ProtectClock = true;
          SocketBindDeny = "any";
          UMask = "0077";
          ExecStart = llmhopLib.escapeExecArgs argv;
        };
    };
}
