"""ModelSpec: the shapes and tensor types of a model, as the memory calculator and the quantizer need them.

A ModelSpec comes from a GGUF file (quantize.model.gguf_file.read_model_spec) or from a Hugging Face
config.json (quantize.model.hf_config.model_spec_from_hf_config); quantize.model.reader.read_spec takes
either. It is a plain frozen value: JSON-printable, no file handles.

Placement facts mirrored from llama.cpp (src/llama-model.cpp, src/llama-model-loader.cpp):
- the input layer (token_embd) always stays on the CPU, even with every layer offloaded;
- the output layer (output.weight) is on the device of the last layer; when the model has no output.weight the
  output is the token embedding created again with TENSOR_DUPLICATED, i.e. a second copy on the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


class TensorInfo(BaseModel):
    """One weight tensor: `shape` is in ggml order (ne0 first: the row length comes first)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...]
    ggml_type: str = Field(description="ggml type name, e.g. F16, Q4_K")
    n_bytes: int = Field(ge=0)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        """Index of the repeating block this tensor belongs to (blk.N.*), None for globals."""
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def n_dims(self) -> int:
        """Dimensions as ggml counts them (trailing 1s do not count)."""
        dims = list(self.shape)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return len(dims)


class ModelSpec(BaseModel):
    """What the calculator needs to know about a model. Per-layer lists have n_layer entries."""

    model_config = ConfigDict(frozen=True)

    path: str | None = None
    source: Literal["gguf", "hf-config"] = "gguf"
    architecture: str
    name: str = ""
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_head_kv: tuple[int, ...] = Field(description="KV heads per layer (0 = the layer has no KV cache)")
    head_dim_k: int = Field(gt=0)
    head_dim_v: int = Field(gt=0)
    n_ff: int = Field(ge=0)
    n_vocab: int = Field(gt=0)
    n_ctx_train: int = Field(ge=0)
    n_expert: int = Field(default=0, ge=0)
    sliding_window: int = Field(default=0, ge=0, description="SWA window in tokens, 0 = none")
    swa_layers: tuple[bool, ...] = Field(default=(), description="per layer: True = sliding-window layer")
    file_type: int | None = None
    file_type_name: str | None = None
    tensors: tuple[TensorInfo, ...] = ()
    has_chat_template: bool = False

    @model_validator(mode="after")
    def _check_layers(self) -> ModelSpec:
        if len(self.n_head_kv) != self.n_layer:
            raise ValueError(f"n_head_kv has {len(self.n_head_kv)} entries, expected n_layer={self.n_layer}")
        if self.swa_layers and len(self.swa_layers) != self.n_layer:
            raise ValueError(
                f"swa_layers has {len(self.swa_layers)} entries, expected n_layer={self.n_layer}"
            )
        if any(self.swa_layers) and self.sliding_window <= 0:
            raise ValueError("swa_layers marks sliding-window layers but sliding_window is 0")
        return self

    # ---- derived figures
    # -------------------------------------------------------------------------------------

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weights_bytes(self) -> int:
        """Bytes of all tensors in the file."""
        return sum(t.n_bytes for t in self.tensors)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_output_tied(self) -> bool:
        """No output.weight: llama.cpp duplicates token_embd as the output matrix."""
        names = {t.name for t in self.tensors}
        return OUTPUT not in names and TOKEN_EMBD in names

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cpu_bytes(self) -> int:
        """Bytes that stay in host memory with full offload: the input embedding."""
        return sum(t.n_bytes for t in self.tensors if t.name == TOKEN_EMBD)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_bytes(self) -> int:
        """Bytes on the GPU(s) with full offload (-ngl 99), before backend padding."""
        extra = self.cpu_bytes if self.is_output_tied else 0
        return self.weights_bytes - self.cpu_bytes + extra

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        n = self.n_params
        return 8.0 * self.weights_bytes / n if n else 0.0

    @property
    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.n_bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def n_head_kv_max(self) -> int:
        return max(self.n_head_kv)

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head, as llama.cpp's hparams.n_gqa() (layer 0)."""
        kv = self.n_head_kv[0]
        return self.n_head // kv if kv else 0

    @property
    def has_swa(self) -> bool:
        return any(self.swa_layers)

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    def n_embd_k_gqa(self, layer: int) -> int:
        return self.head_dim_k * self.n_head_kv[layer]

    def n_embd_v_gqa(self, layer: int) -> int:
        return self.head_dim_v * self.n_head_kv[layer]

    def layer_bytes(self) -> list[int]:
        """Bytes of each repeating block (what a llama.cpp layer split moves between devices)."""
        out = [0] * self.n_layer
        for t in self.tensors:
            i = t.layer
            if i is not None and i < self.n_layer:
                out[i] += t.n_bytes
        return out

    def output_layer_bytes(self) -> int:
        """Bytes of the output layer (output norm + output matrix, or the duplicated embedding when tied)."""
        total = 0
        for t in self.tensors:
            if t.layer is None and t.name != TOKEN_EMBD:
                total += t.n_bytes
        if self.is_output_tied:
            total += self.cpu_bytes
        return total

    def summary(self) -> Mapping[str, object]:
        """A short JSON-friendly view without the tensor list."""
        return self.model_dump(exclude={"tensors"})
