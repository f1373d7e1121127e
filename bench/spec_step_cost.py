"""What verifying a draft costs: the time of one llama_decode with B sequences of 1 + k tokens each, against
B sequences of one token, on the engine's own context (where speculative decoding can pay, and the figures
behind EngineConfig's spec_token_cost and spec_seqs_max defaults).

    python bench/spec_step_cost.py --seqs 1,2,4,8 --draft 0,1,2,4,8 --out OUT            # CPU, bundled model
    python bench/spec_step_cost.py --model 8B.gguf --seqs 1,8,32 --draft 0,1,4,8 --out OUT   # GPU
Writes OUT/spec_step_cost.json and prints a table: ms per step, and r = (t(1+k) - t(1)) / (k * t(1)), the
cost of one more token per sequence relative to a step without drafts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.engine.batch import TokenBatch  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llama_context import LlamaRuntime  # noqa: E402

CONTEXT = 256  # tokens already in every sequence's cache when the step runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: the bundled SmolLM2-135M)")
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--draft", default="0,1,2,4,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")]
    drafts = [int(x) for x in args.draft.split(",")]
    config = EngineConfig(model_path=args.model, n_ctx=CONTEXT + 64, n_parallel=max(seqs), n_batch=2048,
                          n_ubatch=2048, n_threads=args.threads or None, spec_type="ngram-simple",
                          spec_draft_n_max=max(max(drafts), 1))
    rt = LlamaRuntime(config)
    batch = TokenBatch(rt.n_batch)
    for s in range(max(seqs)):  # every sequence's context, once
        batch.clear()
        batch.add_run([100 + (i % 1000) for i in range(CONTEXT)], 0, s, True)
        assert rt.decode(batch.finish()) == 0
    times: dict[tuple[int, int], list[float]] = {(b, k): [] for b in seqs for k in drafts}
    for _ in range(args.reps):  # interleaved: a neighbour's load falls on every shape alike
        for b in seqs:
            for k in drafts:
                batch.clear()
                for s in range(b):
                    rt.seq_rm(s, CONTEXT, -1)
                    batch.add_verify([500 + j for j in range(1 + k)], CONTEXT, s)
                t0 = time.perf_counter()
                assert rt.decode(batch.finish()) == 0
                rt.synchronize()
                times[(b, k)].append(time.perf_counter() - t0)
    rows = []
    for b in seqs:
        base = statistics.median(times[(b, 0)]) if 0 in drafts else None
        for k in drafts:
            ms = 1000 * statistics.median(times[(b, k)])
            r = ((ms / 1000 - base) / (k * base)) if base and k else None
            rows.append({"seqs": b, "draft": k, "ms": round(ms, 3), "r": None if r is None else round(r, 3)})
            print(f"seqs {b:3d} draft {k:2d}: {ms:8.2f} ms" + (f"   r {r:.3f}" if r is not None else ""))
    rt.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_step_cost.json").write_text(json.dumps({"model": str(config.model_file()), "rows": rows},
                                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
