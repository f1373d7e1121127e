"""How many threads the engine core should compute with on the CPU: as many as the cores other processes
leave free, from /proc/stat against this process's own CPU time.

llama.cpp's CPU threads meet at hundreds of barriers per token. Where every thread has a core, threads that
spin at a barrier (OpenMP's own default) are fastest; where a neighbour takes a core, a thread that waits
for one that lost its core spins through a scheduler slice at every barrier, and a step takes several times
as long (docs/BENCHMARKS.md, "CPU threads and how they wait"). Threads that sleep instead degrade gently but
pay a wake-up at every barrier even on an idle machine. So the threads spin, and there are never more of
them than free cores: the count drops as soon as a neighbour takes a core and comes back once it has been
free for two looks in a row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# How often the free cores are looked at (a look reads two small /proc files).
LOOK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative clock ticks: of the whole machine (all CPUs, busy and total), and of this process."""

    busy: int
    total: int
    own: int


def read_cpu_times(stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat")) -> CpuTimes | None:
    """The machine's and this process's CPU ticks (None where /proc cannot tell)."""
    try:
        fields = [int(x) for x in stat.read_text().split("\n", 1)[0].split()[1:9]]
        mine = own.read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal  # steal: the hypervisor ran someone else
    return CpuTimes(busy=busy, total=busy + idle + iowait, own=int(mine[11]) + int(mine[12]))


def free_cores(before: CpuTimes, after: CpuTimes, n_cpus: int) -> float:
    """Cores not taken by other processes between two looks."""
    elapsed = (after.total - before.total) / n_cpus  # ticks of one CPU
    if elapsed <= 0:
        return float(n_cpus)
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own)) / elapsed
    return max(0.0, n_cpus - others)


class ThreadGovernor:
    """The thread count for the next steps, between 1 and `max_threads` (what the config or the machine
    allows). Down at once when neighbours take cores; up only when two looks in a row agree."""

    def __init__(self, max_threads: int, n_cpus: int | None = None,
                 read: Callable[[], CpuTimes | None] = read_cpu_times,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_threads = max(1, max_threads)
        self.n_cpus = n_cpus or len(os.sched_getaffinity(0))
        self.threads = self.max_threads
        self._read = read
        self._clock = clock
        self._last = read()
        self._at = clock()
        self._want_more = 0

    def look(self) -> int:
        """The thread count to use now (reads /proc at most every LOOK_INTERVAL_S)."""
        now = self._clock()
        if now - self._at < LOOK_INTERVAL_S or self._last is None:
            return self.threads
        times = self._read()
        if times is None:
            return self.threads
        free = free_cores(self._last, times, self.n_cpus)
        self._last, self._at = times, now
        target = min(self.max_threads, max(1, int(free + 0.5)))
        if target < self.threads:
            self.threads, self._want_more = target, 0
        elif target > self.threads:
            self._want_more += 1
            if self._want_more >= 2:
                self.threads, self._want_more = target, 0
        else:
            self._want_more = 0
        return self.threads
