"""The search against the grid on response surfaces shaped like real ones (throughput rising then saturating
with n_parallel, TTFT rising with it, memory rising with n_ctx x n_parallel, a physical batch with a best
size): its choice has >= 95 % of the grid's best goodput with <= 40 % of the grid's Locust runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from loadtest.search import (
    GOODPUT_GOAL,
    RUNS_GOAL,
    Space,
    efficiency,
    run_grid,
    run_search,
    sweep_rates,
)
from loadtest.selection import Load, LoadPoint, Setting, Skipped, Slo, Trial
from loadtest.summary import LoadSummary

GIB = 2**30
# The GPU tune's space (docs/tuning/README.md): parallel 1..64 x context 4k..32k x ubatch 256..2048.
SPACE = Space(n_parallel=(1, 2, 4, 8, 16, 32, 64), n_ctx=(4096, 8192, 16384, 32768), n_batch=(2048,),
              n_ubatch=(256, 512, 1024, 2048))


@dataclass(frozen=True)
class Surface:
    """A serving engine in closed form: decode steps slow down as sequences join (saturating throughput),
    prefill competes with them (TTFT rises), a bigger physical batch prefills faster up to a point, memory is
    weights + KV (n_ctx x n_parallel) + a compute buffer growing with n_ubatch; +-2 % noise per run."""

    step_s: float = 0.004
    saturation: float = 16.0
    prefill_tps: float = 8000.0
    ubatch_knee: float = 256.0
    capacity_gib: float = 80.0
    kv_mib_per_token: float = 0.0625
    prompt_tokens: int = 300
    output_tokens: int = 128

    def memory(self, s: Setting) -> float:
        return (4.6 * 1024 + self.kv_mib_per_token * s.n_ctx_total + s.n_ubatch * 0.5 + 300) * 2**20

    def check(self, s: Setting) -> Skipped | None:
        m = self.memory(s)
        if m <= self.capacity_gib * GIB:
            return None
        return Skipped(setting=s, why="over budget", predicted_bytes=int(m))

    def _latency(self, s: Setting, concurrency: float) -> tuple[float, float]:
        step = self.step_s * (1 + concurrency / self.saturation) * (1 + s.n_ctx / 262144)
        batch_gain = s.n_ubatch / (s.n_ubatch + self.ubatch_knee) * (1 - s.n_ubatch / 8192)
        prefill_rate = self.prefill_tps * batch_gain
        ttft = self.prompt_tokens / prefill_rate * (1 + concurrency / 4) + step
        return ttft, ttft + self.output_tokens * step

    def point(self, s: Setting, load: Load) -> LoadPoint:
        _, e2e_full = self._latency(s, load.users)
        capacity = load.users / e2e_full
        rate = capacity if load.rate_rps is None else min(load.rate_rps, capacity)
        ttft, e2e = self._latency(s, max(1.0, load.users * rate / capacity))
        noise = 1 + 0.02 * (2 * hashlib.sha256(f"{s}{load}".encode()).digest()[0] / 255 - 1)
        finished = max(1, round(rate * noise * 100))
        summary = LoadSummary(users=load.users, duration_s=100.0, requests_ok=finished,
                              requests_in_window=finished, ttft_ms=(ttft * 1000 / noise,) * 20,
                              e2e_ms=(e2e * 1000,) * 20, completion_tokens=finished * self.output_tokens,
                              window_tokens=finished * self.output_tokens)
        return LoadPoint(load=load, summary=summary)

    def measure(self, slo: Slo, log: list[Setting]):  # type: ignore[no-untyped-def]
        def measure(s: Setting) -> Trial:
            log.append(s)
            points = sweep_rates(lambda load: self.point(s, load), s.n_parallel, slo, steps=4)
            return Trial(setting=s, points=points, memory_bytes=int(self.memory(s)))

        return measure


SURFACES = {
    "H200-sized, TTFT loose": (Surface(), 3000.0),
    "H200-sized, TTFT tight": (Surface(), 300.0),
    "early saturation": (Surface(saturation=4.0, capacity_gib=24.0), 3000.0),
    "late saturation, slow prefill": (Surface(saturation=64.0, prefill_tps=2000.0, capacity_gib=40.0), 500.0),
    "big batches pay": (Surface(ubatch_knee=2048.0), 600.0),
    "12 GiB card, TTFT tight": (Surface(capacity_gib=12.0), 250.0),
    "8 GiB card (a P4)": (Surface(capacity_gib=8.0, prefill_tps=1500.0, step_s=0.02), 2000.0),
}


@pytest.mark.parametrize("name", list(SURFACES))
def test_search_finds_the_grids_best_with_a_fraction_of_its_runs(name: str) -> None:
    surface, ttft_limit = SURFACES[name]
    slo = Slo(max_ttft_p95_ms=ttft_limit)
    grid_log: list[Setting] = []
    search_log: list[Setting] = []
    grid = run_grid(SPACE, surface.check, surface.measure(slo, grid_log), slo)
    search = run_search(SPACE, surface.check, surface.measure(slo, search_log), slo)
    e = efficiency(search, grid, slo)
    assert e.goodput_ratio >= GOODPUT_GOAL, (name, e)
    assert e.runs_ratio <= RUNS_GOAL, (name, e)
    assert e.meets_goal
    # Nothing that does not fit is started, nothing is started twice, the grid starts every fitting one.
    fitting = [s for s in SPACE.grid() if surface.check(s) is None]
    assert sorted(grid_log, key=str) == sorted(fitting, key=str)
    assert len(set(search_log)) == len(search_log) and set(search_log) <= set(fitting)
    assert len(search.skipped) == len(SPACE.grid()) - len(fitting)
    assert search.runs == sum(len(t.points) for t in search.trials) and search.starts == len(search_log)


def test_sweep_rates_bisects_the_offered_rate_below_capacity() -> None:
    """Capacity 10 req/s at TTFT 900 ms; the SLO (500 ms) holds up to 6 req/s offered."""
    asked: list[Load] = []

    def measure_load(load: Load) -> LoadPoint:
        asked.append(load)
        rate = 10.0 if load.rate_rps is None else load.rate_rps
        ttft = 900.0 if load.rate_rps is None else (400.0 if rate <= 6.0 else 700.0)
        n = round(rate * 10)
        return LoadPoint(load=load, summary=LoadSummary(users=4, duration_s=10.0, requests_ok=n,
                                                        requests_in_window=n, ttft_ms=(ttft,) * 5))

    slo = Slo(max_ttft_p95_ms=500.0)
    points = sweep_rates(measure_load, users=4, slo=slo, steps=3)
    assert [p.load.rate_rps for p in points] == [None, 5.0, 7.5, 6.25]
    assert all(load.users == 4 for load in asked)
    trial = Trial(setting=Setting(n_parallel=4, n_ctx=4096), points=points)
    from loadtest.selection import goodput

    assert goodput(trial, slo) == pytest.approx(5.0)
    # The unpaced run meets a looser SLO: one run, goodput = capacity.
    assert len(sweep_rates(measure_load, users=4, slo=Slo(max_ttft_p95_ms=1000.0), steps=3)) == 1


def test_a_search_that_tries_nothing_says_why_each_setting_was_skipped() -> None:
    space = Space(n_parallel=(1, 2), n_ctx=(1024,), n_batch=(2048,), n_ubatch=(512,))

    def too_short(s: Setting) -> Skipped:
        return Skipped(setting=s, why=f"a request needs up to 1120 tokens, a sequence gets n_ctx {s.n_ctx}")

    def never(s: Setting) -> Trial:
        raise AssertionError(f"{s.label} was started")

    for run in (run_search, run_grid):
        result = run(space, too_short, never, Slo())
        assert result.choice.best is None and not result.trials and len(result.skipped) == 2
        reason = result.choice.reason
        assert reason.startswith("no settings were tried: all 2 settings were skipped before starting")
        assert "np1 ctx1024 b2048 ub512: a request needs up to 1120 tokens" in reason
        assert "np2 ctx1024 b2048 ub512: a request needs" in reason


def test_a_space_with_no_setting_is_refused_with_why() -> None:
    with pytest.raises(ValueError, match=r"n_ubatch \(1024\) is larger than every n_batch \(256, 512\)"):
        Space(n_parallel=(1,), n_ctx=(1024,), n_batch=(256, 512), n_ubatch=(1024,))
