{
  imports = [ ./router.nix ];
}
