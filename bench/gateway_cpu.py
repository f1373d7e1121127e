"""The gateway's own CPU time per streamed token, with an upstream that costs nothing: a stand-in OpenAI
server that streams llama-server-shaped chunks as fast as asked, so every CPU second the gateway process
spends is the proxy's own work, whatever the machine.

    python bench/gateway_cpu.py [--streams 8] [--requests 64] [--tokens 192] [--interval-ms 0]

The stand-in answers /health, /v1/models and streamed /v1/completions and /v1/chat/completions with one
chunk per token (its words as llama-server writes them: keys sorted, a usage chunk, [DONE]). The load is
`--streams` clients sending `--requests` requests in all. Reported: the gateway process's user + system CPU
(from /proc) per token streamed through it, and tokens/s through it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving_servers import REPO, Server, edgeserve_cmd, free_port, kit_env

MODEL = "stand-in"


def _chunk(i: int, kind: str, text: str, finish: str | None) -> bytes:
    choice: dict[str, object] = {"finish_reason": finish, "index": 0}
    if kind == "chat":
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    body = {"choices": [choice], "created": 1765000000, "id": f"cmpl-{i}", "model": MODEL,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "system_fingerprint": "b0000-standin"}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval_s: float) -> None:
    counter = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next((int(h.split(":", 1)[1]) for h in lines
                           if h.lower().startswith("content-length")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if method == "GET":
                payload = (json.dumps({"data": [{"id": MODEL, "object": "model", "owned_by": "llamacpp"}]})
                           if path.startswith("/v1/models") else '{"status":"ok"}').encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
                continue
            counter += 1
            kind = "chat" if "chat" in path else "completion"
            n = int(body.get("max_tokens", 16))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")

            def send(data: bytes) -> None:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

            for _ in range(n):
                send(_chunk(counter, kind, " the", None))
                if interval_s:
                    await asyncio.sleep(interval_s)
                await writer.drain()
            send(_chunk(counter, kind, "", "length"))
            usage = {"choices": [], "created": 1765000000, "id": f"cmpl-{counter}", "model": MODEL,
                     "object": "text_completion", "usage": {"completion_tokens": n, "prompt_tokens": 8,
                                                             "total_tokens": n + 8}}
            send(b"data: " + json.dumps(usage).encode() + b"\n\n")
            send(b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_stand_in(port: int, interval_s: float) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _answer(r, w, interval_s), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, streams: int, requests: int, tokens: int) -> int:
    body = {"model": MODEL, "prompt": "Say something.", "max_tokens": tokens, "stream": True,
            "temperature": 0.7, "stream_options": {"include_usage": True}}
    left = list(range(requests))
    got = 0

    async def stream(client: httpx.AsyncClient) -> None:
        nonlocal got
        while left:
            left.pop()
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        got += 1

    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(stream(client) for _ in range(streams)))
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tokens", type=int, default=192)
    p.add_argument("--interval-ms", type=float, default=0.0, help="the stand-in's pause between tokens")
    p.add_argument("--gateway-args", default="")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeserve-gateway-cpu")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import multiprocessing

    up_port = free_port()
    stand_in = multiprocessing.get_context("spawn").Process(
        target=serve_stand_in, args=(up_port, args.interval_ms / 1000), daemon=True)
    stand_in.start()
    env = kit_env(None, None, args.work)
    port = free_port()
    time.sleep(0.5)
    gateway = Server("gateway", [*edgeserve_cmd(env), "--backend", "openai", "--upstream-url",
                                 f"http://127.0.0.1:{up_port}", "--port", str(port), "--n-parallel",
                                 str(args.streams), "--max-queue", "4096", "--log-level", "warning",
                                 *args.gateway_args.split()], env, port, "/ready", args.work / "gateway.log")
    try:
        asyncio.run(drive(gateway.url, 2, 4, 16))  # warm-up
        cpu0, t0 = cpu_seconds(gateway.proc.pid), time.perf_counter()
        tokens = asyncio.run(drive(gateway.url, args.streams, args.requests, args.tokens))
        cpu, wall = cpu_seconds(gateway.proc.pid) - cpu0, time.perf_counter() - t0
    finally:
        gateway.stop()
        stand_in.kill()
    print(json.dumps({"streams": args.streams, "tokens": tokens, "wall_s": round(wall, 2),
                      "tokens_per_s": round(tokens / wall), "gateway_cpu_s": round(cpu, 2),
                      "gateway_cpu_ms_per_token": round(1000 * cpu / tokens, 4),
                      "python": sys.version.split()[0], "repo": str(REPO)}))


if __name__ == "__main__":
    main()
