# Example NixOS configuration of a headless GPU host running edgeserve (a Tesla P4), with Prometheus and Grafana.
# Copy next to hardware-configuration.nix, adjust the card-specific lines, then `nixos-rebuild switch`. The module
# is imported from the project's checkout, because it reads monitoring/ (alert rules, dashboard) beside it.
# Before the first switch, build the venv: git clone the project to /opt/edgeserve and run
# `CMAKE_ARGS="-DGGML_CUDA=on" phase1_foundation/setup_env.sh` there (llama-cpp-python is compiled with CUDA;
# for a Pascal card with a CUDA 12.x toolkit). `edgeserve doctor` then checks the host.
{ config, pkgs, ... }:

{
  imports = [
    ./hardware-configuration.nix
    /opt/edgeserve/phase0_nixos/edgeserve.nix
  ];

  nixpkgs.config.allowUnfree = true;
  # CUDA kernels for the card's architecture only (a Tesla P4 is CC 6.1); shortens llama.cpp's build.
  nixpkgs.config.cudaCapabilities = [ "6.1" ];

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
    cudaPackages_12.cuda_nvcc
  ];

  services.edgeserve = {
    enable = true;
    venv = "/opt/edgeserve/.venv";
    # llama-server built with CUDA 12: CUDA 13 dropped Pascal (sm_61), llama.cpp issue 25909.
    llamaCpp.package = pkgs.llama-cpp.override { cudaSupport = true; cudaPackages = pkgs.cudaPackages_12; };
    model = "/var/lib/edgeserve/models/Llama-3.1-8B-Instruct-Q4_K_M.gguf";
    backend = "llama-server"; # a P4 cannot run SGLang (compute capability 6.1)
    card = "tesla-p4";
    n_ctx = 4096; # tokens of one sequence
    n_parallel = 4; # measure it: edgeserve tune run --n-parallel 1,2,4,8 --n-ctx 4096
    kv_type = "q8_0";
    flash_attn = "on"; # llama.cpp's own flash-attention kernels run on Pascal
    shutdown_grace_s = 30; # requests in flight finish before a restart
    host = "0.0.0.0";
    port = 8000;
    openFirewall = true;
    # Scrape the gateway (edgeserve_* metrics, alert rules) and show the dashboard.
    prometheus.enable = true;
    grafana.enable = true;
  };

  # Host figures (CPU, RAM, disk) beside the gateway's.
  services.prometheus.exporters.node.enable = true;
  services.prometheus.scrapeConfigs = [
    {
      job_name = "node";
      static_configs = [ { targets = [ "127.0.0.1:9100" ]; } ];
    }
  ];

  system.stateVersion = "24.11";
}
