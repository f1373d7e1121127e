# Example NixOS configuration of a headless GPU host running edgeserve with Prometheus.
# Copy next to hardware-configuration.nix, adjust the card-specific lines, then `nixos-rebuild switch`.
# Before the first switch, build the venv: git clone the project to /opt/edgeserve and run
# `CMAKE_ARGS="-DGGML_CUDA=on" phase1_foundation/setup_env.sh` there (llama.cpp is compiled with CUDA).
{ config, pkgs, ... }:

{
  imports = [
    ./hardware-configuration.nix
    ./edgeserve.nix
  ];

  nixpkgs.config.allowUnfree = true;

  # NVIDIA driver. videoDrivers loads the kernel module even without X.
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.graphics.enable = true; # hardware.opengl.enable on NixOS before 24.11
  hardware.nvidia = {
    # Tesla P4 (Pascal): proprietary module, driver branch 580 or older. RTX 5090 (Blackwell): open = true.
    open = false;
    package = config.boot.kernelPackages.nvidiaPackages.production;
    # Keeps the driver loaded between CUDA processes (what `nvidia-smi -pm 1` does, done the supported way).
    nvidiaPersistenced = true;
  };

  # Build tools for the venv (llama-cpp-python compiles llama.cpp) and the usual GPU diagnostics.
  environment.systemPackages = with pkgs; [
    python311
    cmake
    gcc
    git
    pciutils
    config.hardware.nvidia.package # nvidia-smi
    cudaPackages.cuda_nvcc
  ];

  services.edgeserve = {
    enable = true;
    venv = "/opt/edgeserve/.venv";
    model = "/var/lib/edgeserve/models/Llama-3.1-8B-Instruct-Q4_K_M.gguf";
    backend = "llama-server"; # a P4 cannot run SGLang (compute capability 6.1)
    card = "tesla-p4";
    n_ctx = 4096; # tokens of one sequence
    n_parallel = 4; # measure it: python -m loadtest.tuner run --n-parallel 1,2,4,8 --n-ctx 4096
    host = "0.0.0.0";
    port = 8000;
    openFirewall = true;
  };

  # Metrics and alerts: the rules in monitoring/prometheus/edgeserve_rules.yml of the project checkout.
  services.prometheus = {
    enable = true;
    ruleFiles = [ /opt/edgeserve/monitoring/prometheus/edgeserve_rules.yml ];
    scrapeConfigs = [
      {
        job_name = "edgeserve";
        static_configs = [ { targets = [ "127.0.0.1:8000" ]; } ];
      }
      {
        job_name = "node";
        static_configs = [ { targets = [ "127.0.0.1:9100" ]; } ];
      }
    ];
  };
  services.prometheus.exporters.node.enable = true;

  system.stateVersion = "24.11";
}
