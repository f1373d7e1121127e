#!/usr/bin/env bash
# Prepares an NVIDIA host for serving and reports what matters for it. Safe by default: the only change it makes
# is enabling persistence mode; clocks and power limits change only when asked for explicitly.
#
#   setup_host.sh                  enable persistence mode (nvidia-persistenced), then report
#   setup_host.sh --check          report only, change nothing (no root needed)
#   setup_host.sh --dry-run        print the commands that would change something, run none
#   setup_host.sh --lock-clocks MIN,MAX   also lock GPU clocks (nvidia-smi -lgc), for repeatable benchmarks
#   setup_host.sh --reset-clocks   undo --lock-clocks (nvidia-smi -rgc)
#   setup_host.sh --power-limit W  also set the board power limit (nvidia-smi -pl), within the card's range
#   setup_host.sh --gpu N          act on GPU N only (default: all)
#   setup_host.sh --skip-persistence   leave persistence mode alone
#
# Locked clocks make benchmark runs comparable (no boost variation with temperature) but can lower throughput
# and raise heat; they last until reset or reboot. A power limit above the default needs adequate cooling; a
# passively cooled Tesla P4 relies on chassis airflow.
# Exit status: 0 done, 2 bad arguments, 3 no NVIDIA driver (nvidia-smi missing or failing), 4 not root.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
trim() { local v="$1"; v="${v#"${v%%[![:space:]]*}"}"; printf '%s' "${v%"${v##*[![:space:]]}"}"; }

check_only=0
dry_run=0
skip_persistence=0
lock_clocks=""
reset_clocks=0
power_limit=""
gpu=""

while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only=1 ;;
    --dry-run) dry_run=1 ;;
    --skip-persistence) skip_persistence=1 ;;
    --reset-clocks) reset_clocks=1 ;;
    --lock-clocks)
      [ $# -ge 2 ] || { echo "setup_host: --lock-clocks needs MIN,MAX in MHz" >&2; exit 2; }
      lock_clocks="$2"; shift ;;
    --power-limit)
      [ $# -ge 2 ] || { echo "setup_host: --power-limit needs watts" >&2; exit 2; }
      power_limit="$2"; shift ;;
    --gpu)
      [ $# -ge 2 ] || { echo "setup_host: --gpu needs an index" >&2; exit 2; }
      gpu="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_host: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$lock_clocks" ] && ! [[ "$lock_clocks" =~ ^[0-9]+,[0-9]+$ ]]; then
  echo "setup_host: --lock-clocks wants MIN,MAX in MHz, e.g. 1500,1800 (got '$lock_clocks')" >&2; exit 2
fi
if [ -n "$lock_clocks" ] && [ "${lock_clocks%,*}" -gt "${lock_clocks#*,}" ]; then
  echo "setup_host: --lock-clocks MIN is above MAX" >&2; exit 2
fi
if [ -n "$power_limit" ] && ! [[ "$power_limit" =~ ^[0-9]+$ ]]; then
  echo "setup_host: --power-limit wants whole watts (got '$power_limit')" >&2; exit 2
fi
if [ -n "$gpu" ] && ! [[ "$gpu" =~ ^[0-9]+$ ]]; then
  echo "setup_host: --gpu wants an index (got '$gpu')" >&2; exit 2
fi
if [ "$check_only" = 1 ] && { [ -n "$lock_clocks" ] || [ -n "$power_limit" ] || [ "$reset_clocks" = 1 ]; }; then
  echo "setup_host: --check changes nothing; drop it to apply clocks or power limits" >&2; exit 2
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "setup_host: nvidia-smi not found: no NVIDIA driver on this host (edgeserve can still serve on the CPU)" >&2
  exit 3
fi

select_args=()
[ -n "$gpu" ] && select_args=(-i "$gpu")

fields="index,name,pci.bus_id,driver_version,persistence_mode,pcie.link.gen.current,pcie.link.gen.max"
fields="$fields,pcie.link.width.current,pcie.link.width.max,power.draw,power.limit,power.default_limit"
fields="$fields,power.min_limit,power.max_limit,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,compute_mode"

query() {
  local out
  if ! out="$(nvidia-smi "${select_args[@]}" --query-gpu="$fields" --format=csv,noheader,nounits 2>&1)"; then
    echo "setup_host: nvidia-smi failed: $out" >&2
    exit 3
  fi
  printf '%s\n' "$out"
}

# Runs a state-changing command, or prints it with --dry-run.
apply() {
  if [ "$dry_run" = 1 ]; then
    echo "  would run: $*"
  else
    echo "  running: $*"
    "$@"
  fi
}

changes_wanted=0
if [ "$check_only" = 0 ] && { [ "$skip_persistence" = 0 ] || [ -n "$lock_clocks" ] || [ -n "$power_limit" ] \
    || [ "$reset_clocks" = 1 ]; }; then
  changes_wanted=1
fi
if [ "$changes_wanted" = 1 ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "setup_host: changing GPU settings needs root (or use --check / --dry-run)" >&2
  exit 4
fi

before="$(query)"

# Check the requested power limit against every selected card before changing anything.
if [ -n "$power_limit" ]; then
  while IFS=',' read -r idx _name _bus _drv _pm _gc _gm _wc _wm _draw _lim _def min max _rest; do
    min="${min// /}"; max="${max// /}"
    if [[ "$min" =~ ^[0-9.]+$ && "$max" =~ ^[0-9.]+$ ]] \
        && { [ "$power_limit" -lt "${min%.*}" ] || [ "$power_limit" -gt "${max%.*}" ]; }; then
      echo "setup_host: GPU${idx}: power limit ${power_limit} W is outside its range ${min}..${max} W" >&2
      exit 2
    fi
  done <<< "$before"
fi

if [ "$changes_wanted" = 1 ]; then
  echo "== changes"
  if [ "$skip_persistence" = 0 ]; then
    # The daemon is NVIDIA's supported way on Linux; `nvidia-smi -pm 1` is the fallback for hosts without it.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] \
        && systemctl list-unit-files nvidia-persistenced.service >/dev/null 2>&1 \
        && systemctl list-unit-files nvidia-persistenced.service | grep -q nvidia-persistenced; then
      apply systemctl enable --now nvidia-persistenced.service
    elif command -v nvidia-persistenced >/dev/null 2>&1; then
      if pgrep -x nvidia-persistenced >/dev/null 2>&1; then
        echo "  nvidia-persistenced already running"
      else
        apply nvidia-persistenced
      fi
    else
      apply nvidia-smi "${select_args[@]}" -pm 1
    fi
  fi
  if [ "$reset_clocks" = 1 ]; then
    apply nvidia-smi "${select_args[@]}" -rgc
  fi
  if [ -n "$lock_clocks" ]; then
    apply nvidia-smi "${select_args[@]}" -lgc "$lock_clocks"
  else
    echo "  clocks: unchanged (use --lock-clocks MIN,MAX for repeatable benchmarks)"
  fi
  if [ -n "$power_limit" ]; then
    apply nvidia-smi "${select_args[@]}" -pl "$power_limit"
  else
    echo "  power limit: unchanged"
  fi
  echo
fi

report="$before"
if [ "$changes_wanted" = 1 ] && [ "$dry_run" = 0 ]; then
  report="$(query)"
fi

echo "== GPUs"
while IFS=',' read -r idx name bus drv pm gen_cur gen_max w_cur w_max draw limit def_limit min_limit max_limit \
    sm sm_max mem temp mode; do
  name="$(trim "$name")"; pm="$(trim "$pm")"; w_cur="$(trim "$w_cur")"; w_max="$(trim "$w_max")"
  gen_cur="$(trim "$gen_cur")"; gen_max="$(trim "$gen_max")"
  echo "GPU$(trim "$idx") $name  bus $(trim "$bus")  driver $(trim "$drv")"
  echo "  persistence mode: $pm"
  echo "  PCIe link: gen $gen_cur of $gen_max, width x$w_cur of x$w_max"
  if [[ "$w_cur" =~ ^[0-9]+$ && "$w_max" =~ ^[0-9]+$ ]] && [ "$w_cur" -lt "$w_max" ]; then
    echo "  WARNING: link runs at x$w_cur although the card supports x$w_max (slot wiring, riser or BIOS)"
  fi
  if [[ "$gen_cur" =~ ^[0-9]+$ && "$gen_max" =~ ^[0-9]+$ ]] && [ "$gen_cur" -lt "$gen_max" ]; then
    echo "  note: link below its top generation; normal at idle (power saving), check again under load"
  fi
  echo "  power: draw $(trim "$draw") W, limit $(trim "$limit") W (default $(trim "$def_limit"), range $(trim "$min_limit")..$(trim "$max_limit"))"
  echo "  clocks: SM $(trim "$sm") of $(trim "$sm_max") MHz, memory $(trim "$mem") MHz; temperature $(trim "$temp") C"
  echo "  compute mode: $(trim "$mode")"
  if [ "$pm" != "Enabled" ] && [ "$check_only" = 1 ]; then
    echo "  hint: enable persistence mode (run this script without --check as root)"
  fi
done <<< "$report"
