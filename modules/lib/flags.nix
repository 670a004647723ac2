# Command-line flags from `settings`, in the dialect of each server family.
{ lib, ... }:
let
  # How each server family spells flags.
  dialects = {
    # llama-server: `--no-x`; a list repeats the flag (`--lora a --lora b`).
    llama-cpp = {
      negate = true;
      spreadLists = false;
    };
    # vllm serve: `--no-x`; a list follows one flag (`--lora-modules a b`).
    vllm = {
      negate = true;
      spreadLists = true;
    };
    # sglang and its gateway have no `--no-x`: false is dropped (write `disable-x = true`).
    sglang = {
      negate = false;
      spreadLists = true;
    };
    sglang-gateway = dialects.sglang;
  };

  dialect =
    name:
    dialects.${name}
      or (throw "llmhop: unknown CLI dialect \"${name}\" (known: ${lib.concatStringsSep ", " (lib.attrNames dialects)})");

  # A flag value keeps its Nix type: strings, paths and packages verbatim, the rest as JSON.
  flagValue = value: if lib.isStringLike value then toString value else builtins.toJSON value;

  negatedFlag = key: if lib.hasPrefix "no-" key then lib.removePrefix "no-" key else "no-${key}";

  # The flag words of settings in a dialect; `valued key value` spells one flag with a value.
  renderFlags =
    valued: dialectName: settings:
    let
      d = dialect dialectName;
      flag =
        key: value:
        if value == null || value == [ ] then
          [ ]
        else if value == true then
          [ "--${key}" ]
        else if value == false then
          lib.optional d.negate "--${negatedFlag key}"
        else if lib.isList value then
          if d.spreadLists then [ "--${key}" ] ++ map flagValue value else lib.concatMap (valued key) value
        else
          valued key value;
    in
    lib.concatLists (lib.mapAttrsToList flag settings);
in
{
  # settings → argv in the given dialect ("llama-cpp", "vllm", "sglang", "sglang-gateway"):
  # `true` → `--key`, `null` and `[ ]` dropped, `false` → `--no-key` (or dropped), lists per
  # dialect, everything else `--key value`. Keys in attribute order (sorted).
  renderCliArgs = renderFlags (key: value: [
    "--${key}"
    (flagValue value)
  ]);

  # The same as one shell-quoted string in the `--key=value` form (for Quadlet's Exec=).
  # A spread list stays `--key a b`, a repeated one `--key=a --key=b`.
  renderCliArgsShell =
    dialectName: settings:
    lib.concatMapStringsSep " " lib.escapeShellArg (
      renderFlags (key: value: [ "--${key}=${flagValue value}" ]) dialectName settings
    );
}
