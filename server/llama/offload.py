"""Which of a model's layers llama.cpp puts on the GPU, as its `n_gpu_layers` (-ngl) counts them.

llama.cpp counts the output layer as one more layer: n_layer + 1 (or any negative value) is everything, and
only then is the output layer on a GPU. Pure functions of numbers, usable before a model is loaded or a plan
exists: the launch planner, its plans and the loader all ask here.
"""

from __future__ import annotations


def offload_layers(n_layer: int) -> int:
    """-ngl's count of every layer of a model with `n_layer` repeating layers: those and the output layer."""
    return n_layer + 1


def is_full_offload(n_gpu_layers: int, n_layer: int) -> bool:
    """Whether -ngl `n_gpu_layers` puts every layer on the GPU, the output layer included (negative: all)."""
    return n_gpu_layers < 0 or n_gpu_layers >= offload_layers(n_layer)
