"""Shared helpers for the launcher tests: fixed toolchains, plans for a named card, SGLang's own parser."""

from __future__ import annotations

import argparse
import json
import os
from functools import cache
from pathlib import Path

from server.cards import GpuSet, get_card
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain

GIB = 1 << 30
HOST_RAM = 64 * GIB
REPO = Path(__file__).resolve().parents[1]

# A machine with everything installed (plans only: nothing here is started).
FULL = Toolchain(
    python="python3",
    has_sglang=True,
    llama_server="/opt/llama/bin/llama-server",
    edgeserve=("edgeserve",),
    cpu_threads=8,
)
# A machine with neither SGLang nor llama-server.
BARE = Toolchain(
    python="python3", has_sglang=False, llama_server=None, edgeserve=("edgeserve",), cpu_threads=8
)

LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}


def clear_edgeserve_env() -> None:
    for key in list(os.environ):
        if key.startswith("EDGESERVE_"):
            del os.environ[key]


def hf_model_dir(tmp: Path, config: dict[str, object] | None = None) -> Path:
    """A Hugging Face checkpoint folder with only its config.json (what the planner reads)."""
    folder = tmp / "Llama-3.1-8B-Instruct"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA_31_8B_CONFIG))
    return folder


def plan_for(
    card: str,
    backend: str = "auto",
    gpus: int | None = None,
    toolchain: Toolchain = FULL,
    configs_dir: Path | None = None,
    **flags: object,
) -> LaunchPlan:
    """The plan `edgeserve launch --card CARD ...` makes, without detecting anything."""
    target = None if card == "cpu" else GpuSet.of(get_card(card), gpus or 1)
    request = LaunchRequest(backend=backend, card=card, gpus=gpus, **flags)  # type: ignore[arg-type]
    return make_plan(request, toolchain=toolchain, target=(target, HOST_RAM), configs_dir=configs_dir)


@cache
def sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


def sglang_parse(plan: LaunchPlan) -> argparse.Namespace:
    """Parse the plan's argv (after `python -m sglang.launch_server`) with SGLang's own argument parser."""
    assert plan.argv[1:3] == ("-m", "sglang.launch_server"), plan.argv[:3]
    return sglang_parser().parse_args(list(plan.argv[3:]))
