"""Several choices from a server that has no `n`: one request per choice, merged into one stream.

Each delta carries its choice's index, as a server with `n` would send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from server.gateway.backends.base import Delta, GenerationJob

_DONE = object()


async def merged_choices(job: GenerationJob,
                         generate: Callable[[GenerationJob], AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """`job`'s n choices, each a job of its own (seed + i when a seed is set), merged as they arrive."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(index: int) -> None:
        seed = job.params.seed
        params = job.params if seed is None else dataclasses.replace(job.params, seed=seed + index)
        try:
            async for delta in generate(dataclasses.replace(job, n=1, params=params)):
                await queue.put(dataclasses.replace(delta, index=index))
        except BaseException as exc:  # handed to the consumer, which raises it
            await queue.put(exc)
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(i)) for i in range(job.n)]
    open_streams = job.n
    try:
        while open_streams:
            item = await queue.get()
            if item is _DONE:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, Delta)
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
