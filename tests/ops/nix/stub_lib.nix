# A stand-in for the few parts of nixpkgs' lib that phase0_nixos/edgeserve.nix uses, so that the module can be
# evaluated where there is no nixpkgs (the test machines): options become plain descriptions, types carry a
# name and a `check` like nixpkgs' own, mkIf / mkDefault stay markers that eval_module.nix resolves.
# What this does not do: nixpkgs' option merging, priorities beyond mkDefault, submodules, renamed options.
let
  type = name: check: { inherit name check; };
  isInt = builtins.isInt;
  mkOption = args: { _type = "option"; } // args;
in
rec {
  inherit mkOption;
  mkEnableOption = what: mkOption {
    type = types.bool;
    default = false;
    description = "Whether to enable ${what}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
  mkRenamedOptionModule = from: to: { _type = "renamed"; inherit from to; };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  concatStringsSep = builtins.concatStringsSep;
  # nixpkgs quotes every argument the same way: '...' with ' written as '\''.
  escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);

  types = {
    bool = type "bool" builtins.isBool;
    str = type "str" builtins.isString;
    int = type "int" isInt;
    float = type "float" builtins.isFloat;
    port = type "port" (v: isInt v && v >= 0 && v <= 65535);
    path = type "path" (v: builtins.isPath v || (builtins.isString v && hasPrefix "/" v));
    package = type "package" (v: builtins.isAttrs v && v ? outPath);
    ints = {
      positive = type "positive integer" (v: isInt v && v > 0);
      unsigned = type "unsigned integer" (v: isInt v && v >= 0);
    };
    enum = values: { name = "enum"; inherit values; check = v: builtins.elem v values; };
    nullOr = t: { name = "null or ${t.name}"; elem = t; check = v: v == null || t.check v; };
    listOf = t: { name = "list of ${t.name}"; elem = t; check = v: builtins.isList v && builtins.all t.check v; };
    attrsOf = t: {
      name = "attribute set of ${t.name}";
      elem = t;
      check = v: builtins.isAttrs v && builtins.all t.check (builtins.attrValues v);
    };
  };
}
