#!/usr/bin/env bash
# CUDA / PyTorch / NCCL environment for edgeserve's backends. Source it: `. phase1_foundation/set_cuda_env.sh`.
# Only variables that CUDA, PyTorch or NCCL really read; a value already set in the environment is kept.

# PyTorch's caching allocator (SGLang): grow segments in place instead of fragmenting into fixed blocks.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Where the driver caches kernels it JIT-compiles from PTX (the compute cache), so restarts skip the compile.
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-${XDG_CACHE_HOME:-$HOME/.cache}/nv/ComputeCache}"
# Size limit of that cache in bytes (CUDA allows up to 4 GiB): 2 GiB holds SGLang's and llama.cpp's kernels.
export CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-2147483648}"
# Number GPUs in PCI bus order, as nvidia-smi and NVML do (CUDA's default is fastest first).
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"
# Load kernels on first use instead of all at start-up: less memory and a faster start (default since CUDA 12.2).
export CUDA_MODULE_LOADING="${CUDA_MODULE_LOADING:-LAZY}"
# Host-to-device work queues per GPU (CUDA's default 8, range 1-32); more lets more streams overlap.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-8}"
# NCCL (SGLang tensor parallel): 1 turns off GPU peer-to-peer transfers; set it where P2P is broken on the board.
export NCCL_P2P_DISABLE="${NCCL_P2P_DISABLE:-0}"
# NCCL: 1 turns off the shared-memory transport between processes (e.g. a container with a small /dev/shm).
export NCCL_SHM_DISABLE="${NCCL_SHM_DISABLE:-0}"
# CUDA_VISIBLE_DEVICES (which GPUs a process sees) is set per plan by `edgeserve launch` (--gpus N -> 0..N-1);
# set it here only to pin edgeserve to particular devices, e.g. export CUDA_VISIBLE_DEVICES=1.

# NOT real: the seeds set these, but no CUDA, cuDNN, PyTorch, NCCL or vLLM release reads them, so they are left out:
#   CUDA_TENSOR_CORES, CUDA_L2_PERSISTING_SIZE, CUDA_FP8_E4M3, CUDA_FP8_E5M2, CUDA_CLOCK_CONTROL, CUDA_MAX_CLOCK,
#   CUDA_COPY_SPLIT_THRESHOLD, CUDA_ALLOCATOR_BACKEND, CUDNN_TENSOR_OPS, VLLM_FP8_E4M3, VLLM_CUDA_GRAPHS.
# Tensor cores, FP8 and CUDA graphs are chosen by the engines themselves (SGLang: --kv-cache-dtype fp8_e4m3,
# --disable-cuda-graph); clocks and power are set with nvidia-smi (-lgc, -pl), not with environment variables;
# the L2 persisting window is a cudaStreamSetAttribute call in code.
