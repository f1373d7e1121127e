"""The card rows: one `Card` per supported model, every figure with the URL it comes from.

Memory sizes are the nominal GiB of the datasheet; NVML reports a little less (ECC and driver reservations).
Where a card ships in several form factors (A100/H100 SXM and PCIe), `variant` says which one the figures
describe and `notes` gives the other; NVML names of both map to the same row.
"""

from __future__ import annotations

from server.cards import GIB, Card

# Shared sources.
CUDA_GPUS = "https://developer.nvidia.com/cuda-gpus"  # compute capability of every NVIDIA GPU
TENSOR_CORES = "https://www.nvidia.com/en-us/data-center/tensor-cores/"  # tensor core generations
TPU = "https://www.techpowerup.com/gpu-specs/"
MIB = 1024**2
# nvidia-smi totals seen on real cards (the same figure NVML's memory info reports).
_NVSMI_CLOUD = "https://github.com/modal-labs/modal-client/pull/2797"  # H100, A100 40/80, A10, L4, T4 totals
_NVSMI_5090 = "https://github.com/noonghunna/club-3090/issues/1261"
_NVSMI_4090 = "https://github.com/RLinf/RLinf/issues/255"
_NVSMI_3090 = "https://github.com/noonghunna/club-3090/issues/390"
_NVSMI_H100 = "https://github.com/NVIDIA/nccl/issues/1264"

_P4_DATASHEET = (
    "https://images.nvidia.com/content/pdf/tesla/184457-Tesla-P4-Datasheet-NV-Final-Letter-Web.pdf"
)
_P4_TPU = TPU + "tesla-p4.c2879"
_T4_DATASHEET = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"
_T4_TPU = TPU + "tesla-t4.c3316"
_RTX3090_TPU = TPU + "geforce-rtx-3090.c3622"
_RTX3090_NV = "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3090-3090ti/"
_AMPERE_GA102_WP = (
    "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
)
_RTX4090_TPU = TPU + "geforce-rtx-4090.c3889"
_RTX4090_NV = "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/"
_RTX5090_TPU = TPU + "geforce-rtx-5090.c4216"
_RTX5090_NV = "https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/"
_L4_TPU = TPU + "l4.c4091"
_L4_NV = "https://www.nvidia.com/en-us/data-center/l4/"
_A10_TPU = TPU + "a10-pcie.c3793"
_A10_DATASHEET = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf"
_A100_DATASHEET = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
)
_A100_40_TPU = TPU + "a100-sxm4-40-gb.c3506"
_A100_80_TPU = TPU + "a100-sxm4-80-gb.c3746"
_H100_NV = "https://www.nvidia.com/en-us/data-center/h100/"
_H100_TPU = TPU + "h100-sxm5-80-gb.c3900"
_H200_NV = "https://www.nvidia.com/en-us/data-center/h200/"
_H200_TPU = TPU + "h200-nvl.c4254"


CARDS: tuple[Card, ...] = (
    Card(
        id="tesla-p4",
        names=("Tesla P4", "NVIDIA Tesla P4"),
        architecture="Pascal",
        chip="GP104",
        compute_capability=(6, 1),
        sm_count=20,
        cuda_cores=2560,
        memory_bytes=8 * GIB,
        memory_type="GDDR5",
        bandwidth_gbps=192.0,
        tdp_w=75,
        tensor_core_gen=None,
        fp16_to_fp32_ratio=1 / 64,
        pcie_gen=3,
        has_nvlink=False,
        notes=(
            "FP16 runs at 1:64 of FP32 (useless); INT8 dp4a is the fast path. Configurable 50 W or 75 W. "
            "ECC (on by default) takes part of the 8 GiB: detection reports the real total."
        ),
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _P4_TPU,
            "cuda_cores": _P4_DATASHEET,
            "memory_bytes": _P4_DATASHEET,
            "bandwidth_gbps": _P4_DATASHEET,
            "tdp_w": _P4_DATASHEET,
            "tensor_core_gen": _P4_TPU,
            "fp16_to_fp32_ratio": _P4_TPU,
            "pcie_gen": _P4_DATASHEET,
            "has_nvlink": _P4_DATASHEET,
        },
    ),
    Card(
        id="tesla-t4",
        names=("Tesla T4", "NVIDIA Tesla T4", "NVIDIA T4"),
        architecture="Turing",
        chip="TU104",
        compute_capability=(7, 5),
        sm_count=40,
        cuda_cores=2560,
        memory_bytes=16 * GIB,
        nvml_memory_bytes=15360 * MIB,
        memory_type="GDDR6",
        bandwidth_gbps=320.0,
        tdp_w=70,
        tensor_core_gen=2,
        pcie_gen=3,
        has_nvlink=False,
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _T4_TPU,
            "cuda_cores": _T4_DATASHEET,
            "memory_bytes": _T4_DATASHEET,
            "nvml_memory_bytes": _NVSMI_CLOUD,
            "bandwidth_gbps": _T4_DATASHEET,
            "tdp_w": _T4_DATASHEET,
            "tensor_core_gen": TENSOR_CORES,
            "pcie_gen": _T4_DATASHEET,
            "has_nvlink": _T4_DATASHEET,
        },
    ),
    Card(
        id="rtx-3090",
        names=("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"),
        architecture="Ampere",
        chip="GA102",
        compute_capability=(8, 6),
        sm_count=82,
        cuda_cores=10496,
        memory_bytes=24 * GIB,
        nvml_memory_bytes=24576 * MIB,
        memory_type="GDDR6X",
        bandwidth_gbps=936.0,
        tdp_w=350,
        tensor_core_gen=3,
        pcie_gen=4,
        has_nvlink=True,
        notes="NVLink through a 2-way bridge (the last GeForce card with one).",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _AMPERE_GA102_WP,
            "cuda_cores": _RTX3090_NV,
            "memory_bytes": _RTX3090_NV,
            "nvml_memory_bytes": _NVSMI_3090,
            "bandwidth_gbps": _AMPERE_GA102_WP,
            "tdp_w": _RTX3090_NV,
            "tensor_core_gen": _AMPERE_GA102_WP,
            "pcie_gen": _RTX3090_TPU,
            "has_nvlink": _RTX3090_NV,
        },
    ),
    Card(
        id="rtx-4090",
        names=("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        architecture="Ada Lovelace",
        chip="AD102",
        compute_capability=(8, 9),
        sm_count=128,
        cuda_cores=16384,
        memory_bytes=24 * GIB,
        nvml_memory_bytes=24564 * MIB,
        memory_type="GDDR6X",
        bandwidth_gbps=1008.0,
        tdp_w=450,
        tensor_core_gen=4,
        pcie_gen=4,
        has_nvlink=False,
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _RTX4090_TPU,
            "cuda_cores": _RTX4090_NV,
            "memory_bytes": _RTX4090_NV,
            "nvml_memory_bytes": _NVSMI_4090,
            "bandwidth_gbps": _RTX4090_TPU,
            "tdp_w": _RTX4090_NV,
            "tensor_core_gen": _RTX4090_NV,
            "pcie_gen": _RTX4090_TPU,
            "has_nvlink": _RTX4090_TPU,
        },
    ),
    Card(
        id="rtx-5090",
        names=("NVIDIA GeForce RTX 5090", "GeForce RTX 5090"),
        architecture="Blackwell",
        chip="GB202",
        compute_capability=(12, 0),
        sm_count=170,
        cuda_cores=21760,
        memory_bytes=32 * GIB,
        nvml_memory_bytes=32607 * MIB,
        memory_type="GDDR7",
        bandwidth_gbps=1792.0,
        tdp_w=575,
        tensor_core_gen=5,
        pcie_gen=5,
        has_nvlink=False,
        notes="Not Ada / CC 8.9 / 1.5 TB/s / 450 W as one seed claims. A pair talks over PCIe 5.0 only.",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _RTX5090_TPU,
            "cuda_cores": _RTX5090_NV,
            "memory_bytes": _RTX5090_NV,
            "nvml_memory_bytes": _NVSMI_5090,
            "bandwidth_gbps": _RTX5090_TPU,
            "tdp_w": _RTX5090_NV,
            "tensor_core_gen": _RTX5090_NV,
            "pcie_gen": _RTX5090_TPU,
            "has_nvlink": _RTX5090_TPU,
        },
    ),
    Card(
        id="l4",
        names=("NVIDIA L4",),
        architecture="Ada Lovelace",
        chip="AD104",
        compute_capability=(8, 9),
        sm_count=58,
        cuda_cores=7424,
        memory_bytes=24 * GIB,
        nvml_memory_bytes=23034 * MIB,
        memory_type="GDDR6",
        bandwidth_gbps=300.0,
        tdp_w=72,
        tensor_core_gen=4,
        pcie_gen=4,
        has_nvlink=False,
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _L4_TPU,
            "cuda_cores": _L4_TPU,
            "memory_bytes": _L4_NV,
            "nvml_memory_bytes": _NVSMI_CLOUD,
            "bandwidth_gbps": _L4_NV,
            "tdp_w": _L4_NV,
            "tensor_core_gen": _L4_NV,
            "pcie_gen": _L4_NV,
            "has_nvlink": _L4_NV,
        },
    ),
    Card(
        id="a10",
        names=("NVIDIA A10",),
        architecture="Ampere",
        chip="GA102",
        compute_capability=(8, 6),
        sm_count=72,
        cuda_cores=9216,
        memory_bytes=24 * GIB,
        nvml_memory_bytes=23028 * MIB,
        memory_type="GDDR6",
        bandwidth_gbps=600.0,
        tdp_w=150,
        tensor_core_gen=3,
        pcie_gen=4,
        has_nvlink=False,
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _A10_TPU,
            "cuda_cores": _A10_TPU,
            "memory_bytes": _A10_DATASHEET,
            "nvml_memory_bytes": _NVSMI_CLOUD,
            "bandwidth_gbps": _A10_DATASHEET,
            "tdp_w": _A10_DATASHEET,
            "tensor_core_gen": _A10_DATASHEET,
            "pcie_gen": _A10_DATASHEET,
            "has_nvlink": _A10_DATASHEET,
        },
    ),
    Card(
        id="a100-40gb",
        names=("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB PCIe"),
        architecture="Ampere",
        chip="GA100",
        compute_capability=(8, 0),
        sm_count=108,
        cuda_cores=6912,
        memory_bytes=40 * GIB,
        nvml_memory_bytes=40960 * MIB,
        memory_type="HBM2",
        bandwidth_gbps=1555.0,
        tdp_w=400,
        tensor_core_gen=3,
        pcie_gen=4,
        has_nvlink=True,
        variant="SXM4",
        notes="PCIe card: 250 W, same 1555 GB/s; NVLink only through a bridge.",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _A100_40_TPU,
            "cuda_cores": _A100_40_TPU,
            "memory_bytes": _A100_DATASHEET,
            "nvml_memory_bytes": _NVSMI_CLOUD,
            "bandwidth_gbps": _A100_DATASHEET,
            "tdp_w": _A100_DATASHEET,
            "tensor_core_gen": _A100_DATASHEET,
            "pcie_gen": _A100_DATASHEET,
            "has_nvlink": _A100_DATASHEET,
        },
    ),
    Card(
        id="a100-80gb",
        names=("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-80GB"),
        architecture="Ampere",
        chip="GA100",
        compute_capability=(8, 0),
        sm_count=108,
        cuda_cores=6912,
        memory_bytes=80 * GIB,
        nvml_memory_bytes=81920 * MIB,
        memory_type="HBM2e",
        bandwidth_gbps=2039.0,
        tdp_w=400,
        tensor_core_gen=3,
        pcie_gen=4,
        has_nvlink=True,
        variant="SXM4",
        notes="PCIe card: 300 W, 1935 GB/s; NVLink only through a bridge.",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _A100_80_TPU,
            "cuda_cores": _A100_80_TPU,
            "memory_bytes": _A100_DATASHEET,
            "nvml_memory_bytes": _NVSMI_CLOUD,
            "bandwidth_gbps": _A100_DATASHEET,
            "tdp_w": _A100_DATASHEET,
            "tensor_core_gen": _A100_DATASHEET,
            "pcie_gen": _A100_DATASHEET,
            "has_nvlink": _A100_DATASHEET,
        },
    ),
    Card(
        id="h100-80gb",
        names=("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100"),
        architecture="Hopper",
        chip="GH100",
        compute_capability=(9, 0),
        sm_count=132,
        cuda_cores=16896,
        memory_bytes=80 * GIB,
        nvml_memory_bytes=81559 * MIB,
        memory_type="HBM3",
        bandwidth_gbps=3350.0,
        tdp_w=700,
        tensor_core_gen=4,
        pcie_gen=5,
        has_nvlink=True,
        variant="SXM5",
        notes="PCIe card: 114 SMs, 14,592 cores, HBM2e 2.0 TB/s, 350 W. H100 NVL (94 GB) is another card.",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _H100_TPU,
            "cuda_cores": _H100_TPU,
            "memory_bytes": _H100_NV,
            "nvml_memory_bytes": _NVSMI_H100,
            "bandwidth_gbps": _H100_NV,
            "tdp_w": _H100_NV,
            "tensor_core_gen": _H100_NV,
            "pcie_gen": _H100_NV,
            "has_nvlink": _H100_NV,
        },
    ),
    Card(
        id="h200",
        names=("NVIDIA H200", "NVIDIA H200 NVL"),
        architecture="Hopper",
        chip="GH100",
        compute_capability=(9, 0),
        sm_count=132,
        cuda_cores=16896,
        memory_bytes=141 * GIB,
        memory_type="HBM3e",
        bandwidth_gbps=4800.0,
        tdp_w=700,
        tensor_core_gen=4,
        pcie_gen=5,
        has_nvlink=True,
        variant="SXM",
        notes="H200 NVL (PCIe): up to 600 W, same 141 GB and 4.8 TB/s. NVML reports a little under 141 GiB.",
        sources={
            "compute_capability": CUDA_GPUS,
            "sm_count": _H200_TPU,
            "cuda_cores": _H200_TPU,
            "memory_bytes": _H200_NV,
            "bandwidth_gbps": _H200_NV,
            "tdp_w": _H200_NV,
            "tensor_core_gen": _H200_NV,
            "pcie_gen": _H200_NV,
            "has_nvlink": _H200_NV,
        },
    ),
)
