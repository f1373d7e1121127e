"""What a message between the engine's front and its core costs: pickling and the trip across processes.

    python bench/core_messages.py [--rounds 2000]

For the messages the engine really sends (a step's outputs for 1, 8 and 64 sequences; a request with a
1,000-token prompt; a stats snapshot) it times pickling, unpickling, and a ping-pong between two processes
over (a) a pipe with multiprocessing's Connection framing (what the engine uses) and (b) ZeroMQ PAIR over
ipc:// when pyzmq is installed (what vLLM and SGLang use). One-way time = round trip / 2.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.protocol import AddRequest, StatsUpdate, StepOutputs, TokenOutput
from server.engine.stats import EngineStats
from server.engine.types import SamplingParams


def messages() -> dict[str, object]:
    params = SamplingParams(max_tokens=192, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05)
    stats = EngineStats(True, 64, 64, 0, 80000, 0, 131072, 0, 1000, 64000, 64, 64, 512, 64, 1, 2, 3, 4, 5, 6,
                        step_seconds={"wait": 1.0, "decode": 2.0})
    out = {f"step, {n} outputs": StepOutputs(tuple(TokenOutput(i, 0, 1000 + i) for i in range(n)), n, n)
           for n in (1, 8, 64)}
    out["request, 1000-token prompt"] = AddRequest(1, tuple(range(1000)), (params,))
    out["stats snapshot"] = StatsUpdate(stats)
    return out


def _echo_pipe(rx: Connection, tx: Connection) -> None:
    while True:
        data = rx.recv_bytes()
        if not data:
            return
        tx.send_bytes(data)


def _echo_zmq(addr_in: str, addr_out: str) -> None:
    import zmq

    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    rx.connect(addr_in)
    tx.connect(addr_out)
    while True:
        data = rx.recv()
        if not data:
            return
        tx.send(data)


def pipe_rtt(payloads: list[bytes], rounds: int) -> float:
    mp = get_context("spawn")
    rx, b_tx = mp.Pipe(duplex=False)  # os.pipe underneath, as between the engine's front and core
    b_rx, tx = mp.Pipe(duplex=False)
    proc = mp.Process(target=_echo_pipe, args=(b_rx, b_tx))
    proc.start()
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        tx.send_bytes(payloads[i % len(payloads)])
        rx.recv_bytes()
        times.append(time.perf_counter() - t)
    tx.send_bytes(b"")
    proc.join()
    return statistics.median(times)


def zmq_rtt(payloads: list[bytes], rounds: int) -> float | None:
    try:
        import zmq
    except ImportError:
        return None
    folder = tempfile.mkdtemp()
    addr_out, addr_in = f"ipc://{folder}/to", f"ipc://{folder}/from"
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    tx.bind(addr_out)
    rx.bind(addr_in)
    proc = get_context("spawn").Process(target=_echo_zmq, args=(addr_out, addr_in))
    proc.start()
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        tx.send(payloads[i % len(payloads)])
        rx.recv()
        times.append(time.perf_counter() - t)
    tx.send(b"")
    proc.join()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    print("| message | bytes | pickle us | unpickle us | pipe one-way us | zmq one-way us |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, msg in messages().items():
        data = pickle.dumps(msg, protocol=5)
        t = time.perf_counter()
        for _ in range(args.rounds):
            pickle.dumps(msg, protocol=5)
        dumps = (time.perf_counter() - t) / args.rounds
        t = time.perf_counter()
        for _ in range(args.rounds):
            pickle.loads(data)
        loads = (time.perf_counter() - t) / args.rounds
        pipe = pipe_rtt([data], args.rounds) / 2
        zmq = zmq_rtt([data], args.rounds)
        shown = f"{zmq / 2 * 1e6:.1f}" if zmq is not None else "(pyzmq not installed)"
        print(f"| {name} | {len(data):,} | {dumps * 1e6:.1f} | {loads * 1e6:.1f} | {pipe * 1e6:.1f} "
              f"| {shown} |",
              flush=True)


if __name__ == "__main__":
    main()
