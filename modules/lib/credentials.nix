# systemd credentials: the option type and option, the directives that load them, and the
# `${cred:NAME}` references that settings make to them.
{ lib, llmhopLib }:
let
  inherit (lib) types;

  # `${cred:NAME}` in a string; builtins.split yields the NAME of each match.
  credentialRefRegex = "\\$\\{cred:([^}]*)}";
in
{
  # systemd credential names: one path component.
  credentialNamePattern = "[[:alnum:]_][[:alnum:]_.-]{0,254}";
  isCredentialName = name: builtins.match llmhopLib.credentialNamePattern name != null;

  # The option type of `credentials.<name>`: a path (LoadCredential=), { source; encrypted =
  # true; } (LoadCredentialEncrypted=) or { } (ImportCredential=). Sources must not be in the
  # Nix store, which anyone can read.
  credentialType =
    let
      source = types.submodule {
        options = {
          source = lib.mkOption {
            type = types.nullOr types.externalPath;
            default = null;
            description = ''
              The file (or, with `encrypted`, the `systemd-creds encrypt` output) to load;
              `null` imports the credential by name from {file}`/etc/credstore`,
              {file}`/etc/credstore.encrypted` or the system's credentials.
            '';
          };
          encrypted = lib.mkOption {
            type = types.bool;
            default = false;
            description = "Whether `source` is encrypted ({manpage}`systemd-creds(1)`).";
          };
        };
      };
    in
    # Any string or path becomes { source; }, whose type then refuses store paths (a
    # submodule would import a path as a module).
    types.coercedTo (types.either types.str types.path) (path: { source = path; }) source;

  mkCredentialsOption =
    what:
    lib.mkOption {
      type = types.attrsOf llmhopLib.credentialType;
      default = { };
      example = lib.literalExpression ''
        {
          "llmhop.hf-token" = { };
          api-key = "/run/secrets/api-key";
          sealed = { source = "/etc/credstore.encrypted/sealed"; encrypted = true; };
        }
      '';
      description = ''
        systemd credentials of ${what}, by name: a path is loaded with `LoadCredential=`,
        `{ source; encrypted = true; }` with `LoadCredentialEncrypted=`, `{ }` is imported
        with `ImportCredential=`. Refer to one as `''${cred:name}`.
      '';
    };

  # { LoadCredential; LoadCredentialEncrypted; ImportCredential; } for evaluated credentials.
  credentialDirectives =
    credentials:
    let
      pick = pred: lib.filterAttrs (_: pred) credentials;
    in
    {
      LoadCredential = lib.mapAttrsToList (n: c: "${n}:${c.source}") (
        pick (c: c.source != null && !c.encrypted)
      );
      LoadCredentialEncrypted = lib.mapAttrsToList (n: c: "${n}:${c.source}") (
        pick (c: c.source != null && c.encrypted)
      );
      ImportCredential = lib.attrNames (pick (c: c.source == null));
    };

  # serviceConfig with the credential directives appended to any it already has.
  withCredentials =
    credentials: serviceConfig:
    serviceConfig
    // lib.filterAttrs (_: v: v != [ ]) (
      lib.mapAttrs (key: entries: lib.toList (serviceConfig.${key} or [ ]) ++ entries) (
        llmhopLib.credentialDirectives credentials
      )
    );

  invalidCredentialNames = credentials: lib.filter (n: !llmhopLib.isCredentialName n) (lib.attrNames credentials);

  # Every NAME of `${cred:NAME}` in the strings of a value (attribute sets and lists too).
  credentialRefs =
    value:
    if lib.isString value then
      map lib.head (lib.filter lib.isList (builtins.split credentialRefRegex value))
    else if lib.isList value then
      lib.concatMap llmhopLib.credentialRefs value
    else if lib.isAttrs value && !lib.isDerivation value then
      lib.concatMap llmhopLib.credentialRefs (lib.attrValues value)
    else
      [ ];

  # `${cred:NAME}` → `<directory>/NAME` in every string of a value; a NAME outside `names`
  # throws. Native units use a placeholder for `%d` (see escapeExecArgs).
  resolveCredentialRefs =
    { names, directory }:
    let
      resolve =
        value:
        if lib.isString value then
          lib.concatMapStrings (
            part:
            if lib.isList part then
              let
                name = lib.head part;
              in
              if lib.elem name names then
                "${directory}/${name}"
              else
                throw "llmhop: \${cred:${name}} names no credential (known: ${lib.concatStringsSep ", " names})"
            else
              part
          ) (builtins.split credentialRefRegex value)
        else if lib.isList value then
          map resolve value
        else if lib.isAttrs value && !lib.isDerivation value then
          lib.mapAttrs (_: resolve) value
        else
          value;
    in
    resolve;

  # Stands for systemd's `%d` (the credentials directory) until the arguments are escaped
  # (llmhopLib.escapeExecArgs).
  credentialsDirectoryPlaceholder = "@llmhop-credentials-directory@";
}
