#!/usr/bin/env bash
# Checks before serving or benchmarking: NVIDIA driver, GPUs idle and free, temperatures, disk space, ports.
# Prints one PASS / WARN / FAIL line per check and exits 1 if any check failed. Without a GPU the GPU checks are
# skipped (edgeserve then serves on the CPU).
# Environment: EDGESERVE_PORT (gateway, 8000), EDGESERVE_BACKEND_PORT (SGLang 30000 / llama-server 8080),
# PREFLIGHT_MAX_TEMP_C (80), PREFLIGHT_MIN_FREE_PCT (90), PREFLIGHT_MIN_DISK_GIB (20), PREFLIGHT_DIR (models dir).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
max_temp="${PREFLIGHT_MAX_TEMP_C:-80}"
min_free_pct="${PREFLIGHT_MIN_FREE_PCT:-90}"
min_disk_gib="${PREFLIGHT_MIN_DISK_GIB:-20}"
disk_dir="${PREFLIGHT_DIR:-$root}"
ports=("${EDGESERVE_PORT:-8000}")
[ -n "${EDGESERVE_BACKEND_PORT:-}" ] && ports+=("$EDGESERVE_BACKEND_PORT")
failed=0

pass() { printf 'PASS  %s\n' "$*"; }
warn() { printf 'WARN  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failed=1; }

# --- driver and GPUs -------------------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  warn "no nvidia-smi: no NVIDIA driver here, edgeserve will serve on the CPU"
elif ! gpus="$(nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total,temperature.gpu,utilization.gpu \
    --format=csv,noheader,nounits 2>&1)"; then
  fail "nvidia-smi does not answer (driver not loaded or mismatched): $gpus"
elif [ -z "$gpus" ]; then
  warn "the NVIDIA driver reports no GPU: edgeserve will serve on the CPU"
else
  while IFS=',' read -r idx name driver used total temp util; do
    idx="${idx// /}"; name="${name# }"; used="${used// /}"; total="${total// /}"; temp="${temp// /}"
    util="${util// /}"; driver="${driver// /}"
    pass "GPU $idx: $name, driver $driver"
    free_pct=$(( (total - used) * 100 / total ))
    if [ "$free_pct" -ge "$min_free_pct" ]; then
      pass "GPU $idx memory: ${used}/${total} MiB used (${free_pct}% free)"
    else
      fail "GPU $idx memory: ${used}/${total} MiB used, only ${free_pct}% free (want ${min_free_pct}%)"
    fi
    if [ "$util" = "[N/A]" ] || [ "$util" -le 10 ]; then
      pass "GPU $idx idle: ${util}% utilization"
    else
      warn "GPU $idx busy: ${util}% utilization (benchmarks would be disturbed)"
    fi
    if [ "$temp" = "[N/A]" ] || [ "$temp" -lt "$max_temp" ]; then
      pass "GPU $idx temperature ${temp} C"
    else
      fail "GPU $idx temperature ${temp} C (at or above ${max_temp} C: cool it down first)"
    fi
  done <<< "$gpus"
  procs="$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null)"
  if [ -n "$procs" ]; then
    warn "compute processes on the GPUs: $(echo "$procs" | tr '\n' ';')"
  else
    pass "no compute processes on the GPUs"
  fi
fi

# --- disk ------------------------------------------------------------------------------------------------------
avail_kib="$(df -Pk "$disk_dir" | awk 'NR==2 {print $4}')"
avail_gib=$(( avail_kib / 1024 / 1024 ))
if [ "$avail_gib" -ge "$min_disk_gib" ]; then
  pass "disk: ${avail_gib} GiB free in $disk_dir"
else
  fail "disk: ${avail_gib} GiB free in $disk_dir (want ${min_disk_gib} GiB for models and their quantizations)"
fi

# --- ports -----------------------------------------------------------------------------------------------------
for port in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port is already in use on 127.0.0.1"
  else
    pass "port $port is free"
  fi
done

exit "$failed"
