#!/usr/bin/env bash
# SGLang for edgeserve, in one of two ways. Usage: setup_sglang.sh serve|parser
#   serve   SGLang that can serve, in its own environment (.venv-sglang) with the CUDA build of torch its release
#           pins: only on a host whose GPUs are all SM80+ (Ampere or newer); SGLang's pins (torch, openai, ...)
#           stay out of edgeserve's .venv. `edgeserve launch` finds it there (server/launch/toolchain.py).
#   parser  SGLang's argument parser and protocol models only, in .venv with the CPU torch on this machine's disk:
#           what the tests check the launcher's SGLang argv with. The launcher does not count this one as
#           able to serve (its torch has no CUDA), so `auto` never picks it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
sglang_version=0.5.23
say() { echo "edgeserve: $*"; }

case "${1:-}" in
  parser)
    pip=("${EDGESERVE_VENV:-$root/.venv}/bin/python" -m pip)
    # The CPU build first: a plain `torch` requirement would pull several GB of CUDA wheels.
    "${pip[@]}" install -q "torch==2.13.0"
    "${pip[@]}" install -q --no-deps "sglang==$sglang_version"
    # sglang.srt.utils imports triton at module level; the wheel imports fine without a GPU.
    "${pip[@]}" install -q --no-deps "triton==3.9.0"
    "${pip[@]}" install -q numpy orjson psutil pybase64 requests packaging pillow starlette pydantic pyzmq tqdm \
      ipython aiohttp msgspec pyyaml
    ;;
  serve)
    if ! command -v nvidia-smi >/dev/null 2>&1; then
      say "SGLang serves on NVIDIA GPUs only: no nvidia-smi here. edgeserve serves with llama.cpp instead."
      exit 1
    fi
    oldest="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | sort -V | head -n 1)"
    if [ "$(printf '%s\n8.0\n' "$oldest" | sort -V | head -n 1)" != 8.0 ]; then
      say "SGLang needs compute capability 8.0 or newer (Ampere+); this host has a $oldest card. edgeserve"
      say "serves it with llama.cpp (llama-server or the embedded engine): no SGLang installed."
      exit 1
    fi
    env_dir="$root/.venv-sglang"
    [ -x "$env_dir/bin/python" ] || "${PYTHON:-python3}" -m venv "$env_dir"
    say "installing SGLang $sglang_version with its CUDA torch into $env_dir (several GB)"
    "$env_dir/bin/python" -m pip install -q --upgrade pip
    "$env_dir/bin/python" -m pip install "sglang[all]==$sglang_version"
    if ! "$env_dir/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      say "SGLang is installed but its torch sees no GPU (driver too old for its CUDA?): edgeserve will not use it."
      exit 1
    fi
    say "SGLang ready in $env_dir"
    ;;
  *)
    echo "usage: $0 serve|parser" >&2
    exit 2
    ;;
esac
