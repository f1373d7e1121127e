"""What a request that leaves a sampling field out gets: llama-server's defaults, or OpenAI's.

OpenAI's API has no top_k or min_p, and its temperature and top_p default to 1: a request that omits them
samples from the whole vocabulary. llama-server (and Ollama) fill omitted fields with top_k 40, top_p 0.95,
min_p 0.05 and temperature 0.8, which cuts the long tail that makes small models ramble and keeps sampling
cheap (top-p over a 128k vocabulary has to order it). edgeserve follows llama-server by default; the
`sampling_defaults` setting picks the other set. A field the request gives is always used as given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int  # 0: no top-k
    min_p: float  # 0: no min-p

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


SAMPLING_DEFAULTS: dict[str, SamplingDefaults] = {
    # llama-server --help (llama.cpp as vendored by llama-cpp-python 0.3.36): --temp 0.8, --top-k 40,
    # --top-p 0.95, --min-p 0.05.
    "llama-server": SamplingDefaults(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05),
    # OpenAI's API reference: temperature 1, top_p 1; no top_k or min_p.
    "openai": SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
}
DEFAULT_SAMPLING_DEFAULTS = "llama-server"


def sampling_defaults(name: str) -> SamplingDefaults:
    try:
        return SAMPLING_DEFAULTS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampling defaults {name!r}; supported: {', '.join(SAMPLING_DEFAULTS)}") from None
