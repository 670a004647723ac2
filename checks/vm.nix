# VM tests (nixosTest); they need full nixpkgs and KVM, so flake.nix only imports this file
# when `pkgs.testers.runNixOSTest` exists. The full suite belongs to the VM-checks issue; this
# smoke test boots the module with socket activation and asks the router for /health.
{ pkgs, module }:
{
  vm-smoke = pkgs.testers.runNixOSTest {
    name = "llmhop-smoke";
    nodes.machine = {
      imports = [ module ];
      services.llmhop = {
        enable = true;
        host = "127.0.0.1";
        port = 8080;
        settings.models.test-model.url = "http://127.0.0.1:9000";
      };
    };
    testScript = ''
      machine.wait_for_unit("llmhop-default.socket")
      machine.wait_for_unit("llmhop.service")
      machine.succeed("curl --fail --silent http://127.0.0.1:8080/health")
    '';
  };
}
