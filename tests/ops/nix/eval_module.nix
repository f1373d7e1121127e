# Evaluates phase0_nixos/edgeserve.nix with stub_lib.nix and stub_pkgs.nix (no nixpkgs needed):
#   nix-instantiate --eval --strict --json eval_module.nix --arg settings '{ enable = true; }'
# gives the module's options (name, type, default, description) and the config it produces for `settings`,
# after checking every value in `settings` against its option's type. `example` = true takes the settings from
# phase0_nixos/example_configuration.nix instead.
{ settings ? { }, example ? false }:
let
  lib = import ./stub_lib.nix;
  pkgs = import ./stub_pkgs.nix;
  module = ../../../phase0_nixos/edgeserve.nix;

  isOption = x: builtins.isAttrs x && (x._type or null) == "option";

  # Option descriptions as JSON can hold them: functions dropped, paths as strings, packages by name.
  clean = x:
    if builtins.isFunction x then "<function>"
    else if builtins.isPath x then toString x
    else if builtins.isList x then map clean x
    else if builtins.isAttrs x then
      (if x ? outPath && x ? name then { package = x.name; overriddenWith = clean (x.overriddenWith or { }); }
       else builtins.mapAttrs (_: clean) x)
    else x;

  # mkIf / mkDefault markers resolved as the NixOS module system would for a single definition.
  resolve = x:
    if builtins.isAttrs x && (x._type or null) == "if" then (if x.condition then resolve x.content else null)
    else if builtins.isAttrs x && (x._type or null) == "override" then resolve x.content
    else if builtins.isAttrs x && !(x ? outPath) then
      builtins.removeAttrs (builtins.mapAttrs (_: resolve) x)
        (builtins.filter (n: resolve x.${n} == null) (builtins.attrNames x))
    else if builtins.isList x then map resolve x
    else x;

  # The option tree with each leaf's default: what cfg holds when nothing is set.
  defaults = tree: builtins.mapAttrs (_: o: if isOption o then o.default or null else defaults o) tree;

  # settings laid over the defaults, leaf by leaf; a setting with no option is an error, as in NixOS.
  overlay = tree: given: builtins.mapAttrs (name: o:
    let set = given ? ${name}; value = given.${name}; in
    if isOption o then
      (if !set then o.default or null
       else if o.type.check value then value
       else throw "services.edgeserve.${name}: ${builtins.toJSON (clean value)} is not a ${o.type.name}")
    else overlay o (if set then value else { })
  ) tree // (
    let unknown = builtins.filter (n: !(tree ? ${n})) (builtins.attrNames given); in
    if unknown == [ ] then { } else throw "no such option: services.edgeserve.${builtins.head unknown}");

  exampleSettings = (import ../../../phase0_nixos/example_configuration.nix {
    inherit pkgs;
    config = { boot.kernelPackages.nvidiaPackages.production = pkgs.llama-cpp; hardware.nvidia.package = pkgs.llama-cpp; };
  }).services.edgeserve;

  hostConfig = cfg: { services.edgeserve = cfg; services.prometheus = { enable = false; port = 9090; }; };
  declared = (import module { inherit lib pkgs; config = hostConfig { }; }).options.services.edgeserve;
  cfg = overlay declared (if example then exampleSettings else settings);
  evaluated = import module { inherit lib pkgs; config = hostConfig cfg; };

  describe = tree: builtins.mapAttrs (_: o:
    if isOption o then {
      type = o.type.name;
      values = o.type.values or o.type.elem.values or null;
      default = clean (o.default or null);
      description = o.description or "";
    } else describe o) tree;
in
{
  options = describe declared;
  settings = clean cfg;
  imports = clean evaluated.imports;
  config = clean (resolve evaluated.config);
}
