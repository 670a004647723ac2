# Command-line entry of the module-evaluation harness (used by harness.py):
#
#   nix-instantiate --eval --strict --json --read-write-mode tests/nix/cli.nix \
#     --argstr nixpkgsLib /nix/store/…-source --argstr quadletNix /nix/store/…-source \
#     --argstr configJSON '{"services":{"llmhop":{"enable":true}}}' \
#     [--argstr configFile /abs/path/module.nix] [--argstr pkgsJSON '{"llmhop":"/tmp/pkg"}'] \
#     [--argstr what options]
#
# `what` picks the result: "config" (the evaluated configuration, see evaluate.nix) or
# "options" (the documented options of services.llmhop).
# nixpkgsLib and quadletNix are the store paths of the flake.lock pins nixpkgs-lib and
# quadlet-nix (harness.py finds them from their narHash).
{
  nixpkgsLib,
  quadletNix,
  configJSON ? "{}",
  configFile ? "",
  pkgsJSON ? "{}",
  what ? "config",
}:
let
  lib = import (/. + nixpkgsLib + "/lib");
  evaluate = import ./evaluate.nix {
    inherit lib;
    quadlet-nix = /. + quadletNix;
  };
  result = evaluate {
    modules = [
      (builtins.fromJSON configJSON)
    ]
    ++ lib.optional (configFile != "") (/. + configFile);
    pkgsOverrides = builtins.fromJSON pkgsJSON;
  };
in
if what == "options" then result.options else removeAttrs result [ "options" ]
