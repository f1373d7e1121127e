# NixOS module: the whole edgeserve stack as one systemd service (services.edgeserve), like ./start_sglang.sh.
#
# The service runs `edgeserve launch`: it plans the backend for the card and model (SGLang where the card runs
# it, llama-server, or the embedded engine), runs it under the supervisor (restart on crash, a smaller context
# after an OOM at start-up) with the edgeserve gateway in front on `port` (OpenAI API, admission, fallbacks,
# edgeserve_* metrics on /metrics). The module installs llama.cpp built with CUDA (llama-server, llama-bench,
# llama-quantize) for it, and can have the local Prometheus scrape the gateway (alert rules included) and
# Grafana show the dashboard. Import this file from the project's checkout (it reads ../monitoring/) in
# configuration.nix; example_configuration.nix shows a host.
#
# NVIDIA driver notes (set these in the host configuration, not here):
#   * nixpkgs.config.allowUnfree = true; services.xserver.videoDrivers = [ "nvidia" ];  (loads the kernel
#     module, also on a headless server) and hardware.graphics.enable = true (hardware.opengl before 24.11),
#     which provides /run/opengl-driver/lib/libcuda.so and libnvidia-ml.so (NVML: `edgeserve doctor`).
#   * hardware.nvidia.open: Pascal cards (Tesla P4) need the proprietary module (false); Turing and later may use
#     the open one; Blackwell (RTX 5090) requires it (true). Pascal is not supported by driver branches after 580:
#     pin a driver package from that branch or older for a P4.
#   * Pascal (CC 6.x) also needs llama.cpp built with a CUDA 12.x toolkit: CUDA 13 dropped sm_61 and older
#     (llama.cpp issue 25909). Set llamaCpp.package as example_configuration.nix does.
#   * nvidia-persistenced keeps the driver initialised between processes (no multi-second start-up per CUDA
#     process). services.edgeserve.nvidiaPersistenced (default true) turns on hardware.nvidia.nvidiaPersistenced
#     and orders the service after the daemon; set it to false on a CPU-only host.
#   * A venv built with pip (phase1_foundation/setup_env.sh) links against libcuda from the driver, which NixOS
#     keeps in /run/opengl-driver/lib: the service puts it on LD_LIBRARY_PATH.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.edgeserve;
  inherit (lib) mkEnableOption mkOption mkIf mkDefault types optional optionals literalExpression;

  executable =
    if cfg.package != null then "${cfg.package}/bin/edgeserve" else "${cfg.venv}/bin/edgeserve";

  # The launch settings, each under the name `edgeserve launch` gives it (llama.cpp's vocabulary); null leaves
  # it to the card's profile.
  setting = name: flag: optionals (cfg.${name} != null) [ flag (toString cfg.${name}) ];

  launchArgs =
    [ "launch" "--backend" cfg.backend "--card" cfg.card "--host" cfg.host "--port" (toString cfg.port)
      "--status-file" "/run/edgeserve/status.json" ]
    ++ optionals (cfg.model != null) [ "--model-path" cfg.model ]
    ++ setting "gpus" "--gpus"
    ++ setting "n_ctx" "--n-ctx"
    ++ setting "n_parallel" "--n-parallel"
    ++ setting "n_batch" "--n-batch"
    ++ setting "n_ubatch" "--n-ubatch"
    ++ setting "kv_type" "--kv-type"
    ++ setting "flash_attn" "--flash-attn"
    ++ optionals (cfg.kv_unified != null) [ (if cfg.kv_unified then "--kv-unified" else "--no-kv-unified") ]
    ++ setting "n_threads" "--n-threads"
    ++ setting "n_gpu_layers" "--n-gpu-layers"
    ++ setting "mem_fraction" "--mem-fraction"
    ++ optionals (cfg.backend_sampling != null)
      [ (if cfg.backend_sampling then "--backend-sampling" else "--no-backend-sampling") ]
    ++ setting "model_name" "--model-name"
    ++ setting "backend_port" "--backend-port"
    ++ [ "--shutdown-grace-s" (toString cfg.shutdown_grace_s) ]
    ++ optional (!cfg.gateway) "--no-gateway"
    ++ optional cfg.force "--force"
    ++ cfg.extraArgs;

  # With a models file the gateway serves every model in it on `port` (`edgeserve serve --models-file`): it
  # loads and evicts them by the memory plan and supervises llama-server models itself.
  serveArgs =
    [ "serve" "--host" cfg.host "--port" (toString cfg.port) "--models-file" cfg.models_file
      "--shutdown-grace-s" (toString cfg.shutdown_grace_s) ]
    ++ cfg.extraArgs;

  # Prometheus scrapes the gateway where it listens (a wildcard address is reached on the loopback).
  scrapeHost = if cfg.host == "0.0.0.0" || cfg.host == "::" then "127.0.0.1" else cfg.host;

  nullOrPositive = description: mkOption {
    type = types.nullOr types.ints.positive;
    default = null;
    inherit description;
  };
in
{
  # The settings carry edgeserve's own names (n_ctx, n_parallel); the earlier ones still work, with a warning.
  imports = [
    (lib.mkRenamedOptionModule [ "services" "edgeserve" "ctx" ] [ "services" "edgeserve" "n_ctx" ])
    (lib.mkRenamedOptionModule [ "services" "edgeserve" "parallel" ] [ "services" "edgeserve" "n_parallel" ])
    (lib.mkRenamedOptionModule [ "services" "edgeserve" "shutdownGraceS" ]
      [ "services" "edgeserve" "shutdown_grace_s" ])
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
        Virtual environment made by phase1_foundation/setup_env.sh (used when `package` is null), with
        llama-cpp-python built for CUDA (CMAKE_ARGS="-DGGML_CUDA=on"). It must be readable by the service's
        dynamic user.
      '';
    };

    llamaCpp = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Install llama.cpp (llama-server, llama-bench, llama-batched-bench, llama-quantize) on the service's
          PATH and the system's: `backend = "llama-server"` runs it, the benchmarks and the quantizer use it.
        '';
      };
      package = mkOption {
        type = types.package;
        default = pkgs.llama-cpp.override { cudaSupport = true; };
        defaultText = literalExpression "pkgs.llama-cpp.override { cudaSupport = true; }";
        description = ''
          The llama.cpp build. CUDA architectures follow nixpkgs.config.cudaCapabilities. For a Pascal card
          (Tesla P4, CC 6.1) use a CUDA 12.x toolkit, since CUDA 13 dropped sm_61 and older:
          pkgs.llama-cpp.override { cudaSupport = true; cudaPackages = pkgs.cudaPackages_12; } with
          nixpkgs.config.cudaCapabilities = [ "6.1" ].
        '';
      };
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

    models_file = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/edgeserve/models.yaml";
      description = ''
        A models file (server/gateway/models.example.yaml): several models behind `port`, each loaded when a
        request names it and evicted by the memory plan. Set, the service runs `edgeserve serve --models-file`
        instead of `edgeserve launch` (the launch settings then come from the file, per model).
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = "Address the gateway listens on; 0.0.0.0 to serve other machines (see openFirewall).";
    };

    port = mkOption {
      type = types.port;
      default = 8000;
      description = "Port of the OpenAI API (the gateway); the backend behind it listens on the loopback only.";
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
      description = "Card id as `edgeserve gpu --cards` lists them, `cpu`, or `auto` (detect with NVML).";
    };

    gpus = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      description = "GPUs to use (null: all like GPU 0; 0: the CPU).";
    };

    n_ctx = nullOrPositive ''
      Context of ONE sequence (prompt + completion), tokens; the KV pool is n_ctx x n_parallel. null lets the
      launcher take the card's profile and fit it to the card.
    '';
    n_parallel = nullOrPositive "Sequences decoded together; `edgeserve tune run` measures the best value.";
    n_batch = nullOrPositive "Logical batch / prefill chunk, tokens (llama.cpp -b, SGLang's chunked prefill).";
    n_ubatch = nullOrPositive "Physical batch, tokens (llama.cpp -ub).";
    n_threads = nullOrPositive "CPU threads for layers on the CPU.";

    kv_type = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "q8_0";
      description = "KV cache type: f16, q8_0, q4_0, ... (llama.cpp); auto, fp8_e4m3, fp8_e5m2 (SGLang).";
    };

    flash_attn = mkOption {
      type = types.nullOr (types.enum [ "on" "off" "auto" ]);
      default = null;
      description = "Flash attention (llama.cpp); a quantized V cache needs it on.";
    };

    kv_unified = mkOption {
      type = types.nullOr types.bool;
      default = null;
      description = "One KV pool shared by the sequences (llama.cpp).";
    };

    n_gpu_layers = mkOption {
      type = types.nullOr types.int;
      default = null;
      description = "Layers on the GPU (llama.cpp); -1: all.";
    };

    mem_fraction = mkOption {
      type = types.nullOr types.float;
      default = null;
      description = "SGLang --mem-fraction-static: weights + KV pool as a share of the GPU memory.";
    };

    backend_sampling = mkOption {
      type = types.nullOr types.bool;
      default = null;
      description = "Sampler chains inside llama.cpp's decode graph (null: the launcher decides by the plan).";
    };

    model_name = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Model id served at /v1/models (null: the backend's, the file name).";
    };

    backend_port = mkOption {
      type = types.nullOr types.port;
      default = null;
      description = "The backend's own port on the loopback, behind the gateway (null: 8080, SGLang 30000).";
    };

    gateway = mkOption {
      type = types.bool;
      default = true;
      description = "edgeserve's gateway in front of llama-server / SGLang on `port` (false: the backend there).";
    };

    force = mkOption {
      type = types.bool;
      default = false;
      description = "Start even where the plan does not fit the memory free at start-up (not recommended).";
    };

    shutdown_grace_s = mkOption {
      type = types.ints.unsigned;
      default = 30;
      description = ''
        Seconds the gateway lets requests in flight finish after a stop. systemd waits this long plus 15 s (the
        backend's own stop) before it kills the service.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--no-ladder" ];
      description = "More `edgeserve launch` arguments.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { CUDA_VISIBLE_DEVICES = "0"; };
      description = "Extra environment variables of the service (EDGESERVE_* gateway settings, CUDA_*).";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "systemd EnvironmentFile with secrets, e.g. EDGESERVE_API_KEY=... (kept out of the store).";
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

    prometheus.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Have the local Prometheus (services.prometheus) scrape the gateway's /metrics and load edgeserve's alert
        rules (monitoring/prometheus/edgeserve_rules.yml).
      '';
    };

    grafana.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Provision the edgeserve dashboard (monitoring/grafana/edgeserve.json) and the local Prometheus as its
        data source in services.grafana. Needs prometheus.enable (or another Prometheus with these metrics).
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.model == null || lib.hasPrefix "/" cfg.model;
        message = "services.edgeserve.model must be an absolute path";
      }
      {
        assertion = cfg.models_file == null || lib.hasPrefix "/" cfg.models_file;
        message = "services.edgeserve.models_file must be an absolute path";
      }
      {
        assertion = !cfg.grafana.enable || cfg.prometheus.enable || config.services.prometheus.enable;
        message = "services.edgeserve.grafana.enable needs a Prometheus: set services.edgeserve.prometheus.enable";
      }
    ];
    warnings = optional (cfg.openFirewall && cfg.host == "127.0.0.1")
      "services.edgeserve.openFirewall is set but the service listens on 127.0.0.1 only";

    environment.systemPackages = optional cfg.llamaCpp.enable cfg.llamaCpp.package;

    systemd.services.edgeserve = {
      description = "edgeserve LLM server (backend under the supervisor, the gateway in front)";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ optional cfg.nvidiaPersistenced "nvidia-persistenced.service";
      wants = optional cfg.nvidiaPersistenced "nvidia-persistenced.service";
      # The launcher finds llama-server on PATH.
      path = optional cfg.llamaCpp.enable cfg.llamaCpp.package;
      environment = {
        HOME = "/var/lib/edgeserve";
        XDG_CACHE_HOME = "/var/cache/edgeserve";
        LD_LIBRARY_PATH = "/run/opengl-driver/lib";
        PYTHONUNBUFFERED = "1";
      } // cfg.environment;

      serviceConfig = {
        Type = "exec";
        ExecStart = "${executable} ${lib.escapeShellArgs (if cfg.models_file != null then serveArgs else launchArgs)}";
        Restart = "on-failure";
        RestartSec = "5s";
        # The gateway drains for shutdown_grace_s, then the launcher stops its backend.
        TimeoutStopSec = "${toString (cfg.shutdown_grace_s + 15)}s";
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

    hardware.nvidia.nvidiaPersistenced = mkIf cfg.nvidiaPersistenced (mkDefault true);

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    services.prometheus = mkIf cfg.prometheus.enable {
      enable = mkDefault true;
      ruleFiles = [ ../monitoring/prometheus/edgeserve_rules.yml ];
      scrapeConfigs = [
        {
          job_name = "edgeserve";
          metrics_path = "/metrics";
          static_configs = [ { targets = [ "${scrapeHost}:${toString cfg.port}" ]; } ];
        }
      ];
    };

    services.grafana = mkIf cfg.grafana.enable {
      enable = mkDefault true;
      provision = {
        enable = true;
        datasources.settings.datasources = [
          {
            name = "Prometheus";
            type = "prometheus";
            url = "http://127.0.0.1:${toString config.services.prometheus.port}";
          }
        ];
        # The folder holds edgeserve.json; its datasource variable picks the default Prometheus.
        dashboards.settings.providers = [ { name = "edgeserve"; options.path = ../monitoring/grafana; } ];
      };
    };
  };
}
