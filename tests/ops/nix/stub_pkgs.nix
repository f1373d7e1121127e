# A stand-in for the packages phase0_nixos/edgeserve.nix and example_configuration.nix name: each is an attribute
# set with an outPath (what a derivation interpolates to) that records how it was overridden.
let
  package = name: args: {
    inherit name;
    overriddenWith = args;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    override = more: package name (args // more);
  };
  cudaPackages = version: { inherit version; cuda_nvcc = package "cuda_nvcc-${version}" { }; };
in
{
  llama-cpp = package "llama-cpp" { };
  cudaPackages = cudaPackages "13.0";
  cudaPackages_12 = cudaPackages "12.8";
}
