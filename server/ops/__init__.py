"""The operator side: checks before serving (`edgeserve doctor`), GPU host settings (`edgeserve host-setup`).

Both read one frozen HostSnapshot (NVML-shaped GPU data, the llama.cpp build, SGLang, NCCL, disk, ports, the
plan) made at the edge by probe.py; the checks and the host-setup planner are pure functions of it.
"""
