"""Bridges between asyncio byte streams and the blocking Docker SDK."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from agent.queues import put_until

T = TypeVar("T")

_END = object()


async def aiter_blocking(
    it: Iterator[bytes], close: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """Pull a blocking iterator from a worker thread, one chunk at a time."""
    try:
        while True:
            chunk = await asyncio.to_thread(next, it, None)
            if chunk is None:
                return
            yield chunk
    finally:
        if close is not None:
            close()


async def feed_blocking_consumer(
    source: AsyncIterable[bytes],
    consumer: Callable[[Iterator[bytes]], T],
    maxsize: int = 8,
) -> T:
    """Run `consumer(iterator)` in a thread, feeding it what `source` yields.

    If the source fails, the consumer's iterator raises the same error (so an
    HTTP upload in the consumer is aborted, not completed short); if the
    consumer stops early, feeding stops too.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize)
    consumer_done = threading.Event()

    def chunks() -> Iterator[bytes]:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def run() -> T:
        try:
            return consumer(chunks())
        finally:
            consumer_done.set()

    def put(item: Any) -> bool:
        return put_until(q, item, consumer_done)

    async def offer(item: Any) -> bool:
        # Without a thread hop while the queue has room: most chunks go this way.
        if consumer_done.is_set():
            return False
        try:
            q.put_nowait(item)
            return True
        except queue.Full:
            return await asyncio.to_thread(put, item)

    task = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        try:
            async for chunk in source:
                if not await offer(chunk):
                    break
        except BaseException as exc:
            await offer(ConnectionAbortedError(f"upload broke: {exc}"))
            await asyncio.gather(task, return_exceptions=True)
            raise
        await offer(_END)
        return await task
    finally:
        if not task.done():
            await asyncio.gather(task, return_exceptions=True)
