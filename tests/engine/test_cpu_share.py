"""The engine core's CPU threads follow the cores other processes leave free: the arithmetic over /proc's
counters, the governor's down-at-once and up-after-two-looks, and a real /proc read."""

from __future__ import annotations

from server.engine.cpu_share import LOOK_INTERVAL_S, CpuTimes, ThreadGovernor, free_cores, read_cpu_times

STEP = LOOK_INTERVAL_S * 1.01  # a little over the interval: every such step is a new look


class Machine:
    """Counters of a 4-CPU machine that advance as the test says: `others` and `ours` in cores."""

    def __init__(self) -> None:
        self.times = CpuTimes(busy=0, total=0, own=0)
        self.now = 0.0

    def run(self, seconds: float, others: float, ours: float, n_cpus: int = 4, hz: int = 100) -> None:
        ticks = seconds * hz
        t = self.times
        self.times = CpuTimes(busy=t.busy + round((others + ours) * ticks),
                              total=t.total + round(n_cpus * ticks), own=t.own + round(ours * ticks))
        self.now += seconds


def test_free_cores_leaves_out_this_process() -> None:
    m = Machine()
    before = m.times
    m.run(1.0, others=1.0, ours=3.0)
    assert free_cores(before, m.times, 4) == 3.0  # our own three busy cores are ours to keep
    before = m.times
    m.run(1.0, others=0.0, ours=0.0)
    assert free_cores(before, m.times, 4) == 4.0


def test_governor_drops_at_once_and_comes_back_after_two_looks() -> None:
    m = Machine()
    gov = ThreadGovernor(4, n_cpus=4, read=lambda: m.times, clock=lambda: m.now)
    assert gov.look() == 4
    m.run(STEP, others=2.2, ours=1.8)
    assert gov.look() == 2  # a neighbour took two cores: down at once
    m.run(STEP / 10, others=0.0, ours=2.0)
    assert gov.look() == 2  # no new look before the interval
    m.run(STEP, others=0.0, ours=2.0)
    assert gov.look() == 2  # free again: one look is not enough
    m.run(STEP, others=0.0, ours=2.0)
    assert gov.look() == 4
    m.run(STEP, others=3.9, ours=0.1)
    assert gov.look() == 1  # never below one thread


def test_governor_never_exceeds_what_it_was_given() -> None:
    m = Machine()
    gov = ThreadGovernor(2, n_cpus=4, read=lambda: m.times, clock=lambda: m.now)
    for _ in range(3):
        m.run(STEP, others=0.0, ours=2.0)
        assert gov.look() == 2


def test_this_machines_counters_read() -> None:
    times = read_cpu_times()
    assert times is not None and times.total >= times.busy >= times.own >= 0
