"""Where the decode thread's time goes, step by step: llama.cpp's work against everything around it.

Phases, in the order a step passes them:
  wait      waiting for the step's results (llama_synchronize: the device still computing)
  sample    reading the sampled tokens (in-graph) or sampling on the host, logprobs included
  schedule  requests in and out, finished sequences retired, the next batch planned, chains bound
  decode    inside llama_decode (on a GPU: queueing the graph; on the CPU: the whole computation)
  emit      detokenizing, stop strings, building the events
  deliver   handing the events to the delivery thread
`wait + decode` is llama.cpp's share; the rest is the engine's own overhead. With the output on a GPU the
emit and deliver phases of one step run while the device computes the next, so they cost only when longer
than the device's step.
"""

from __future__ import annotations

import time

PHASES = ("wait", "sample", "schedule", "decode", "emit", "deliver")


class StepProfile:
    """Cumulative seconds per phase (read from other threads: plain floats, updated by one thread)."""

    __slots__ = ("_last", "seconds")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark (or start) was spent in `phase`."""
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
