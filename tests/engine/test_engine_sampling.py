"""Sampling in the engine against llama.cpp's own CPU sampler chain, on the CPU with the bundled SmolLM2.

Both of the engine's paths are checked: chains run inside llama.cpp's decode graph (`backend_sampling`, what a
GPU uses) and chains run on the host after the step. For each sampler combination, the engine draws the next
token of one prompt many times (a different seed per draw) and the counts must match the distribution that
llama.cpp's CPU chain (penalties, top-k, top-p, min-p, temperature, in llama-server's order) puts on that
prompt's logits: a chi-square test at a fixed seed budget, so the outcome is the same on every run.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
from collections import Counter
from collections.abc import Sequence

import llama_cpp.llama_cpp as lc
import numpy as np
import pytest

from quantize.bundled import smollm2_path
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import InvalidGrammarError
from server.engine.sampling import PENALTY_LAST_N
from server.engine.types import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea, there lived a"
DRAWS = 1000
SLOTS = 16

# name -> sampling settings of the draws (max_tokens 1, a seed per draw)
CASES: dict[str, dict[str, object]] = {
    "temperature": {"temperature": 0.7},
    "top_k": {"temperature": 0.8, "top_k": 40},
    "top_p": {"temperature": 1.0, "top_p": 0.9},
    "min_p": {"temperature": 1.0, "min_p": 0.05},
    "llama_server_defaults": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
    "penalties": {"temperature": 0.9, "top_k": 40, "repeat_penalty": 1.3, "presence_penalty": 0.4,
                  "frequency_penalty": 0.3},
}


def _engine(threads: int | None, backend_sampling: bool | None, **kw: object) -> Engine:
    config = dict(model_path=str(smollm2_path()), n_ctx=256, n_parallel=SLOTS, n_batch=512,
                  n_threads=threads, backend_sampling=backend_sampling,
                  kv_unified=False)  # a cache per sequence: greedy output independent of the load
    config.update(kw)
    eng = Engine(EngineConfig(**config))  # type: ignore[arg-type]
    eng.start()
    return eng


@pytest.fixture(scope="module", params=[True, False], ids=["in_graph", "on_host"])
def engine(request: pytest.FixtureRequest, engine_threads: int | None):
    # in the graph as on a GPU: with the events of a step sent while the next one runs
    eng = _engine(engine_threads, request.param, overlap=request.param)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompt_tokens(engine: Engine) -> list[int]:
    return engine.tokenize(PROMPT)


@pytest.fixture(scope="module")
def prompt_logits(prompt_tokens: list[int], serial_reference) -> np.ndarray:
    ref = serial_reference(str(smollm2_path()))
    try:
        return ref._decode(prompt_tokens, 0)
    finally:
        ref.close()


def cpu_chain_distribution(logits: np.ndarray, settings: dict[str, object],
                           history: Sequence[int]) -> dict[int, float]:
    """The next-token distribution llama.cpp's CPU chain gives: its samplers minus the final draw, applied to
    `logits`, then the softmax over what is left (what llama.cpp's dist sampler draws from)."""
    p = SamplingParams(max_tokens=1, **settings)  # type: ignore[arg-type]
    n_vocab = logits.shape[0]
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
    if p.top_k:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(p.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(p.temperature))
    try:
        for tok in history[-PENALTY_LAST_N:]:
            lc.llama_sampler_accept(chain, tok)
        data = (lc.llama_token_data * n_vocab)(
            *[lc.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
        arr = lc.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(lc.llama_token_data)),
                                        size=n_vocab, selected=-1, sorted=False)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        kept = [(data[i].id, data[i].logit) for i in range(arr.size) if math.isfinite(data[i].logit)]
    finally:
        lc.llama_sampler_free(chain)
    peak = max(v for _, v in kept)
    weights = {t: math.exp(v - peak) for t, v in kept}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def chi_square_passes(counts: Counter[int], expected: dict[int, float], n: int) -> tuple[bool, str]:
    """Pearson's chi-square with bins of expected count >= 5 (the rest pooled), at significance 1e-4."""
    stat, dof = 0.0, -1
    pooled_obs, pooled_exp = 0, 0.0
    for tok, prob in expected.items():
        e = prob * n
        if e >= 5:
            stat += (counts.get(tok, 0) - e) ** 2 / e
            dof += 1
        else:
            pooled_obs += counts.get(tok, 0)
            pooled_exp += e
    outside = sum(c for t, c in counts.items() if t not in expected)
    pooled_obs += outside
    if pooled_exp >= 5:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    elif outside:
        return False, f"{outside} draws of tokens the chain excludes"
    dof = max(dof, 1)
    z = 3.719  # one-sided normal quantile for 1e-4; Wilson-Hilferty turns it into the chi-square quantile
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat <= critical, f"chi2 {stat:.1f} vs {critical:.1f} at {dof} degrees of freedom"


async def _draws(drive, engine: Engine, prompt: list[int], settings: dict[str, object],
                 n: int) -> Counter[int]:
    async def one(seed: int) -> int:
        res = await drive.collect(engine, prompt, SamplingParams(max_tokens=1, seed=seed, **settings))  # type: ignore[arg-type]
        return res.tokens[0]

    counts: Counter[int] = Counter()
    for start in range(0, n, 4 * SLOTS):  # a few steps' worth at a time: the slots stay full
        counts.update(await asyncio.gather(*(one(s) for s in range(start, min(n, start + 4 * SLOTS)))))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_tokens_follow_llama_cpp_cpu_chain(engine: Engine, prompt_tokens, prompt_logits,
                                                   case: str, drive) -> None:
    settings = CASES[case]
    expected = cpu_chain_distribution(prompt_logits, settings, prompt_tokens)
    counts = drive.run(_draws(drive, engine, prompt_tokens, settings, DRAWS))
    assert sum(counts.values()) == DRAWS
    ok, detail = chi_square_passes(counts, expected, DRAWS)
    assert ok, f"{case}: {detail}; top drawn {counts.most_common(5)}"
    assert len(counts) > 1  # really sampled, not one token every time


def test_chi_square_check_rejects_a_wrong_distribution(prompt_tokens, prompt_logits) -> None:
    # The check itself must be able to fail: top-k 40 draws held against top-k 10's distribution.
    wide = cpu_chain_distribution(prompt_logits, {"temperature": 1.0, "top_k": 40}, prompt_tokens)
    narrow = cpu_chain_distribution(prompt_logits, {"temperature": 1.0, "top_k": 10}, prompt_tokens)
    rng = np.random.default_rng(0)
    toks, probs = zip(*wide.items(), strict=True)
    counts = Counter(int(t) for t in rng.choice(toks, size=DRAWS, p=np.array(probs) / sum(probs)))
    assert chi_square_passes(counts, wide, DRAWS)[0]
    assert not chi_square_passes(counts, narrow, DRAWS)[0]


def test_logit_bias_bans_and_forces(engine: Engine, prompt_tokens, prompt_logits, drive) -> None:
    top = int(np.argmax(prompt_logits))
    banned = drive.run(_draws(drive, engine, prompt_tokens, {"temperature": 1.0, "top_k": 5,
                                                "logit_bias": ((top, -math.inf),)}, 64))
    assert top not in banned
    forced = int(np.argsort(prompt_logits)[len(prompt_logits) // 2])  # an unlikely token
    forcing = {"temperature": 1.0, "logit_bias": ((forced, 100.0),)}
    counts = drive.run(_draws(drive, engine, prompt_tokens, forcing, 32))
    assert counts == Counter({forced: 32})


def test_greedy_is_exact_alone_among_others_and_serial(engine: Engine, drive, serial_reference) -> None:
    prompts = [engine.tokenize(f"{PROMPT} {word}") for word in ("king", "cat", "girl", "fisherman")]
    ref = serial_reference(str(smollm2_path()))
    try:
        serial = [ref.generate(p, 24, ignore_eos=True) for p in prompts]
    finally:
        ref.close()
    alone = drive.run(drive.collect(engine, prompts[0], drive.greedy(24, ignore_eos=True)))

    async def together():
        params = drive.greedy(24, ignore_eos=True)
        return await asyncio.gather(*(drive.collect(engine, p, params) for p in prompts))

    assert alone.tokens == serial[0]
    assert [r.tokens for r in drive.run(together())] == serial


def test_a_seed_reproduces_the_text_alone_and_among_others(engine: Engine, prompt_tokens, drive) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.9, top_k=40, seed=1234, ignore_eos=True)
    first = drive.run(drive.collect(engine, prompt_tokens, params))

    async def crowd():
        others = [drive.collect(engine, prompt_tokens, SamplingParams(max_tokens=32, temperature=0.9, seed=s,
                                                                ignore_eos=True)) for s in range(5)]
        return await asyncio.gather(drive.collect(engine, prompt_tokens, params), *others)

    again = drive.run(crowd())[0]
    assert len(first.tokens) == 32
    assert again.tokens == first.tokens
    assert again.text == first.text


def test_logprobs_and_in_graph_requests_share_a_step(engine: Engine, prompt_tokens, drive) -> None:
    seen: list[int] = []
    engine.on_step = lambda tokens, seqs: seen.append(seqs)
    try:
        async def both():
            return await asyncio.gather(
                drive.collect(engine, prompt_tokens, SamplingParams(max_tokens=12, temperature=0.8, top_k=40,
                                                              seed=1, ignore_eos=True, logprobs=3)),
                drive.collect(engine, prompt_tokens, SamplingParams(max_tokens=12, temperature=0.8, top_k=40,
                                                              seed=2, ignore_eos=True)),
            )

        with_lp, without = drive.run(both())
    finally:
        engine.on_step = None
    assert max(seen) == 2
    assert len(with_lp.tokens) == len(without.tokens) == 12
    lps = [lp for e in with_lp.events for lp in e.logprobs]
    assert len(lps) == 12 and all(lp <= 0 for lp in lps)
    assert all(len(top) == 3 for e in with_lp.events for top in e.top_logprobs)


@pytest.mark.slow
def test_in_graph_sampling_survives_preemption(drive, engine_threads: int | None) -> None:
    # Four sequences that each grow to ~100 tokens in a unified pool cut down to 256 cells after start-up (a
    # configuration never outgrows its pool: preemption is the safety net): they cannot all fit, so the
    # newest are preempted and recomputed; their chains leave the graph and come back as clones.
    eng = _engine(engine_threads, True, n_ctx=256, n_parallel=4, kv_unified=True, kv_cells_override=256)
    try:
        prompts = [eng.tokenize(f"{word}: {PROMPT}") for word in ("One", "Two", "Three", "Four")]
        params = [SamplingParams(max_tokens=84, temperature=0.9, top_k=40, seed=s, ignore_eos=True)
                  for s in range(4)]

        async def all4():
            pairs = zip(prompts, params, strict=True)
            return await asyncio.gather(*(drive.collect(eng, pr, pa) for pr, pa in pairs))

        results = drive.run(all4())
        assert [len(r.tokens) for r in results] == [84] * 4
        assert all(r.finish_reason == "length" for r in results)
        assert eng.stats().preemptions_total > 0
    finally:
        eng.stop()


def test_automatic_choice_keeps_sampling_on_the_host_without_a_gpu(drive, engine_threads: int | None) -> None:
    if lc.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU")
    eng = _engine(engine_threads, None, n_ctx=256, n_parallel=1, n_gpu_layers=-1)
    try:
        prompt = eng.tokenize(PROMPT)
        # top-p with no top-k is the one shape that goes in the graph on a GPU; here there is none
        params = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9, top_k=0, seed=1)
        drive.run(drive.collect(eng, prompt, params))
        assert eng.stats().sampled_in_graph_total == 0
    finally:
        eng.stop()


def test_sorts_vocabulary_picks_top_p_without_top_k() -> None:
    assert SamplingParams(temperature=0.7, top_p=0.95).sorts_vocabulary
    assert not SamplingParams(temperature=0.7, top_p=0.95, top_k=40).sorts_vocabulary
    assert not SamplingParams(temperature=0.0, top_p=0.95).sorts_vocabulary
    assert not SamplingParams(temperature=0.7).sorts_vocabulary


@pytest.mark.parametrize("kv_unified", [False, True])
def test_choices_compute_the_prompt_once(kv_unified: bool) -> None:
    # The later choices copy the first one's prompt KV (a whole stream per sequence, or shared cells in a
    # unified pool) and feed only the prompt's last token: greedy choices come out the same as one alone.
    engine = Engine(EngineConfig(n_ctx=256, n_parallel=3, kv_unified=kv_unified))
    engine.start()
    try:
        prompt = engine.tokenize("Once upon a time, in a small village by the sea, there lived")
        params = SamplingParams(max_tokens=8, temperature=0)

        async def run() -> tuple[dict[int, list[int]], list[int]]:
            out: dict[int, list[int]] = {}
            async for index, event in engine.generate_choices(prompt, [params] * 3):
                out.setdefault(index, []).extend(event.token_ids)
            alone = [t async for e in engine.generate(prompt, params) for t in e.token_ids]
            return out, alone

        before = engine.stats().prefix_reused_tokens_total
        choices, alone = asyncio.run(run())
        assert choices[0] == choices[1] == choices[2] == alone
        assert engine.stats().prefix_reused_tokens_total - before >= 2 * (len(prompt) - 1)
    finally:
        engine.stop()


def test_grammar_constrains_sampling_and_bans_stay_finite_behind_it() -> None:
    engine = Engine(EngineConfig(n_ctx=256, n_parallel=1))
    engine.start()
    try:
        prompt = engine.tokenize("Is the sky blue? Answer:")
        grammar = 'root ::= " yes" | " no"'
        yes = engine.tokenize(" yes", add_special=False)[0]

        async def text(params: SamplingParams) -> tuple[str, str | None]:
            parts, finish = [], None
            async for event in engine.generate(prompt, params):
                parts.append(event.text)
                finish = event.finish_reason
            return "".join(parts), finish

        for seed in range(3):
            params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, grammar=grammar)
            out, finish = asyncio.run(text(params))
            assert out in (" yes", " no") and finish == "stop"
        # Banning the grammar's one way to say yes leaves "no" (behind a grammar a ban is a finite bias).
        out, _ = asyncio.run(text(SamplingParams(max_tokens=6, temperature=0, grammar=grammar,
                                                 logit_bias=((yes, float("-inf")),))))
        assert out != " yes"
        with pytest.raises(InvalidGrammarError):
            engine.generate(prompt, SamplingParams(grammar="root ::= missing"))
        with pytest.raises(ValueError):
            SamplingParams(grammar=grammar, ignore_eos=True)
    finally:
        engine.stop()
