# NixOS module: edgeserve as a systemd service (services.edgeserve).
#
# The service runs `edgeserve launch`, which plans the backend for the card and model (embedded engine,
# llama-server or SGLang), starts it and restarts it on a crash (stepping down context/parallel after an OOM at
# start-up). Import this file from configuration.nix; example_configuration.nix shows a whole GPU host.
#
# NVIDIA driver notes (set these in the host configuration, not here):
#   * nixpkgs.config.allowUnfree = true; services.xserver.videoDrivers = [ "nvidia" ];  (loads the kernel
#     module, also on a headless server) and hardware.graphics.enable = true (hardware.opengl before 24.11),
#     which provides /run/opengl-driver/lib/libcuda.so.
#   * hardware.nvidia.open: Pascal cards (Tesla P4) need the proprietary module (false); Turing and later may use
#     the open one; Blackwell (RTX 5090) requires it (true). Pascal is not supported by driver branches after 580:
#     pin a driver package from that branch or older for a P4.
#   * nvidia-persistenced keeps the driver initialised between processes (no multi-second start-up per CUDA
#     process). services.edgeserve.nvidiaPersistenced (default true) turns on hardware.nvidia.nvidiaPersistenced
#     and orders the service after the daemon; set it to false on a CPU-only host.
#   * A venv built with pip (phase1_foundation/setup_env.sh) links against libcuda from the driver, which NixOS
#     keeps in /run/opengl-driver/lib: the service puts it on LD_LIBRARY_PATH.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.edgeserve;
  inherit (lib) mkEnableOption mkOption mkIf types optional optionals;

  executable =
    if cfg.package != null then "${cfg.package}/bin/edgeserve" else "${cfg.venv}/bin/edgeserve";

  launchArgs =
    [ "launch" "--backend" cfg.backend "--card" cfg.card "--host" cfg.host "--port" (toString cfg.port)
      "--status-file" "/run/edgeserve/status.json" ]
    ++ optionals (cfg.model != null) [ "--model-path" cfg.model ]
    ++ optionals (cfg.n_ctx != null) [ "--n-ctx" (toString cfg.n_ctx) ]
    ++ optionals (cfg.n_parallel != null) [ "--n-parallel" (toString cfg.n_parallel) ]
    ++ cfg.extraArgs;

in
{
  # The settings carry edgeserve's own names (n_ctx, n_parallel); the earlier ones still work, with a warning.
  imports = [
    (lib.mkRenamedOptionModule [ "services" "edgeserve" "ctx" ] [ "services" "edgeserve" "n_ctx" ])
    (lib.mkRenamedOptionModule [ "services" "edgeserve" "parallel" ] [ "services" "edgeserve" "n_parallel" ])
  ];

  options.services.edgeserve = {
    enable = mkEnableOption "edgeserve, an OpenAI-compatible LLM server for small NVIDIA GPUs and the CPU";

    package = mkOption {
      type = types.nullOr types.package;
      default = null;
      description = "A package providing bin/edgeserve. When null, the virtual environment at `venv` is used.";
    };

    venv = mkOption {
      type = types.str;
      default = "/opt/edgeserve/.venv";
      description = ''
        Virtual environment made by phase1_foundation/setup_env.sh (used when `package` is null). It must be
        readable by the service's dynamic user.
      '';
    };

    model = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/edgeserve/models/Llama-3.1-8B-Instruct-Q4_K_M.gguf";
      description = ''
        GGUF file (or Hugging Face model folder for SGLang). A string, not a path, so the model is not copied
        into the Nix store. null serves the bundled SmolLM2-135M. /home is hidden from the service.
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = "Address to listen on; 0.0.0.0 to serve other machines (see openFirewall).";
    };

    port = mkOption {
      type = types.port;
      default = 8000;
      description = "Port of the OpenAI API.";
    };

    backend = mkOption {
      type = types.enum [ "auto" "embedded" "llama-server" "sglang" ];
      default = "auto";
      description = "auto: SGLang where the card runs it (compute capability 8.0+), else llama.cpp.";
    };

    card = mkOption {
      type = types.str;
      default = "auto";
      example = "tesla-p4";
      description = "Card id as `edgeserve gpu` lists them, `cpu`, or `auto` (detect with NVML).";
    };

    n_ctx = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = ''
        Context of ONE sequence (prompt + completion), tokens; the KV pool is n_ctx x n_parallel. null lets
        the launcher take the card's profile and fit it to the card.
      '';
    };

    n_parallel = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = "Sequences decoded together; `python -m loadtest.tuner run` measures the best value.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--kv-type" "q8_0" ];
      description = "More `edgeserve launch` arguments.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { CUDA_VISIBLE_DEVICES = "0"; };
      description = "Extra environment variables of the service.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "systemd EnvironmentFile with secrets (kept out of the Nix store).";
    };

    nvidiaPersistenced = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Keep the NVIDIA driver initialised with nvidia-persistenced (sets hardware.nvidia.nvidiaPersistenced by
        default) and start after it. false on hosts without an NVIDIA GPU.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.model == null || lib.hasPrefix "/" cfg.model;
        message = "services.edgeserve.model must be an absolute path";
      }
    ];
    warnings = optional (cfg.openFirewall && cfg.host == "127.0.0.1")
      "services.edgeserve.openFirewall is set but the service listens on 127.0.0.1 only";

    systemd.services.edgeserve = {
      description = "edgeserve LLM server";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ optional cfg.nvidiaPersistenced "nvidia-persistenced.service";
      wants = optional cfg.nvidiaPersistenced "nvidia-persistenced.service";
      environment = {
        HOME = "/var/lib/edgeserve";
        XDG_CACHE_HOME = "/var/cache/edgeserve";
        LD_LIBRARY_PATH = "/run/opengl-driver/lib";
        PYTHONUNBUFFERED = "1";
      } // cfg.environment;

      serviceConfig = {
        Type = "exec";
        ExecStart = "${executable} ${lib.escapeShellArgs launchArgs}";
        Restart = "on-failure";
        RestartSec = "5s";
        # The launcher stops its backend on SIGTERM; give a large model time to unload.
        TimeoutStopSec = "60s";
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;

        DynamicUser = true;
        StateDirectory = "edgeserve";
        CacheDirectory = "edgeserve";
        RuntimeDirectory = "edgeserve";
        WorkingDirectory = "/var/lib/edgeserve";
        UMask = "0077";

        # GPU access: the device nodes of the NVIDIA driver only (DevicePolicy closed denies the rest).
        # PrivateDevices would hide /dev/nvidia*.
        PrivateDevices = false;
        DevicePolicy = "closed";
        DeviceAllow = [ "char-nvidiactl" "char-nvidia-caps" "char-nvidia-frontend" "char-nvidia-uvm" ];

        CapabilityBoundingSet = [ "" ];
        NoNewPrivileges = true;
        LockPersonality = true;
        # Not MemoryDenyWriteExecute: ctypes callbacks (llama-cpp-python) and Triton's JIT (SGLang) need
        # writable executable memory.
        MemoryDenyWriteExecute = false;
        PrivateTmp = true;
        PrivateUsers = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProcSubset = "all"; # NVML and the memory planner read /proc/meminfo and /proc/driver/nvidia
        RemoveIPC = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "@resources" "~@privileged" ];
      };
    };

    hardware.nvidia.nvidiaPersistenced = mkIf cfg.nvidiaPersistenced (lib.mkDefault true);

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];
  };
}
