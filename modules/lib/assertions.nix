# Assertions shared by the router and the backends, each message written once.
{ lib, llmhopLib }:
{
  # The values of a registry { owner = value; } claimed by more than one owner, each with
  # its owners sorted: { "8080" = [ "llama-cpp.models.a" "llmhop.listen.default" ]; }.
  collisions =
    registry:
    lib.filterAttrs (_: owners: lib.length owners > 1) (
      lib.mapAttrs (_: lib.sort lib.lessThan) (
        lib.groupBy (owner: toString registry.${owner}) (lib.attrNames registry)
      )
    );

  # One failed assertion per collision, naming every owner.
  collisionAssertions =
    what: registry:
    lib.mapAttrsToList (value: owners: {
      assertion = false;
      message = "services.llmhop: ${what} ${value} is claimed more than once, by ${lib.concatStringsSep ", " owners}.";
    }) (llmhopLib.collisions registry);

  # One failed assertion per credential of `credentials` (the option at `optionPath`) whose
  # name systemd would refuse.
  credentialNameAssertions =
    optionPath: credentials:
    map (name: {
      assertion = false;
      message = ''${optionPath}.credentials."${name}": a credential name is one path component matching ${llmhopLib.credentialNamePattern}.'';
    }) (llmhopLib.invalidCredentialNames credentials);

  # That a unix socket path (or null: no socket) fits sun_path; `what` names it in the
  # message and `hint` says how to shorten it.
  socketPathAssertion =
    {
      socket,
      what,
      hint ? "",
    }:
    {
      assertion = socket == null || lib.stringLength socket <= llmhopLib.maxSocketPathLength;
      message = "${what} is longer than ${toString llmhopLib.maxSocketPathLength} bytes${hint}.";
    };
}
