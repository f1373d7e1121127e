"""The prompts the load tests send: `loadtest/data/prompts.jsonl`, read as package data.

The text is written for edgeserve: short questions, medium instructions, long passages with a task. The
extra-long prompts (`xlong`, about 1,000-1,300 tokens) are two long ones in a row, so that a load can reach
the prompt lengths of RAG and document chat without a second file to keep.

One JSON object a line with `id`, `length` (short | medium | long) and `prompt`, the shape outside load tools
read too (servebench's `--prompts FILE.jsonl` takes the `prompt` field).
"""

from __future__ import annotations

import functools
import json
import random
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DATA_FILE = "prompts.jsonl"
Length = Literal["short", "medium", "long", "xlong"]
LENGTHS: tuple[Length, ...] = ("short", "medium", "long", "xlong")
# English text costs about 1.3 tokens a word with the Llama, SmolLM2 and Gemma tokenizers; 1.5 errs on the
# safe side when a prompt must fit a context.
TOKENS_PER_WORD = 1.5


class Prompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    length: Length
    prompt: str = Field(min_length=1)

    @property
    def tokens_estimate(self) -> int:
        """A generous estimate of the prompt's tokens (no tokenizer at hand on the client side)."""
        return int(len(self.prompt.split()) * TOKENS_PER_WORD) + 1


def data_text() -> str:
    """The prompt file as shipped (for tools that read the file itself)."""
    return resources.files(__package__).joinpath("data", DATA_FILE).read_text(encoding="utf-8")


@functools.cache
def shipped_prompts() -> tuple[Prompt, ...]:
    """The file's prompts, then the extra-long ones made from its long ones (each with the next, in turn)."""
    lines = (line for line in data_text().splitlines() if line.strip())
    written = tuple(Prompt.model_validate(json.loads(line)) for line in lines)
    longs = [p for p in written if p.length == "long"]
    paired = tuple(
        Prompt(id=f"{a.id}+{b.id}", length="xlong",
               prompt=f"Two documents follow; do what each one asks.\n\nDocument 1:\n{a.prompt}\n\n"
                      f"Document 2:\n{b.prompt}")
        for a, b in zip(longs, longs[1:] + longs[:1], strict=True)) if len(longs) > 1 else ()
    return written + paired


def select(lengths: tuple[Length, ...], max_tokens: int) -> tuple[Prompt, ...]:
    """The shipped prompts of the given lengths whose estimated tokens are at most `max_tokens`."""
    chosen = tuple(p for p in shipped_prompts() if p.length in lengths and p.tokens_estimate <= max_tokens)
    if not chosen:
        raise ValueError(f"no shipped {'/'.join(lengths)} prompt fits in {max_tokens} tokens; allow more "
                         "prompt tokens or other lengths")
    return chosen


def fresh(prompt: Prompt, rng: random.Random) -> str:
    """The prompt behind a tag of its own, so that no prefix cache serves it from an earlier request."""
    return f"[request {rng.randrange(1_000_000_000)}] {prompt.prompt}"
