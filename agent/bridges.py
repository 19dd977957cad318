"""Bridges between worker threads and asyncio: the only place they are written.

Blocking code (the Docker SDK, tarfile, zstandard, HTTP uploads over
requests) runs in threads; the agent runs on one event loop. Every hand-off
between them is bounded, passes errors across instead of losing them, and
stops the other side when one side goes away.

- `put_until`: a thread hands an item to a bounded queue unless told to stop.
- `aiter_blocking`: the loop pulls a blocking iterator, one item per thread hop.
- `aiter_thread`: a thread produces ahead into a bounded queue; the loop consumes.
- `feed_blocking_consumer`: the loop feeds an async source to a blocking consumer.
- `to_thread_to_the_end`: a blocking call whose outcome the caller must know,
  off the loop, that a cancellation does not cut short (journal writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from typing import Any, TypeVar

T = TypeVar("T")

# How often a thread blocked on a full queue re-checks that it should stop.
PUT_WAIT = 0.5

_END = object()


def put_until(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put `item`, waiting for room, unless `stop` is set first; True if it was put.

    A plain blocking put would hang forever once the other side has gone away.
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=PUT_WAIT)
            return True
        except queue.Full:
            continue
    return False


async def to_thread_to_the_end(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`asyncio.to_thread`, except that a cancellation waits for the call to end.

    The thread cannot be stopped anyway; what this adds is that the caller
    never goes on (or rolls back) while a write it started may still land: when
    the CancelledError reaches it, the call has finished one way or the other.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # seen here; the cancellation is what the caller gets
        raise


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


async def aiter_thread(
    produce: Callable[[], Iterable[T]], prefetch: int = 4, name: str = "ferry-producer"
) -> AsyncGenerator[T, None]:
    """Run `produce()` in its own thread, up to `prefetch` items ahead of the consumer.

    The event loop keeps running while the thread works. An error in the
    thread is raised at the consumer; closing or cancelling the iterator stops
    the thread and waits for it.
    """
    q: queue.Queue[Any] = queue.Queue(max(1, prefetch))
    stop = threading.Event()

    def offer(item: Any) -> bool:
        return put_until(q, item, stop)

    def run() -> None:
        end: Any = _END
        try:
            for item in produce():
                if not offer(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            end = exc
        if not offer(end):
            # Stopped: a consumer parked in q.get() finds the queue empty, so this fits.
            with contextlib.suppress(queue.Full):
                q.put_nowait(_END)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                item = await asyncio.to_thread(q.get)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Full):
            q.put_nowait(_END)  # a getter still parked in a worker thread wakes up
        await asyncio.to_thread(thread.join)


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


def spawn_tracked(
    tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]
) -> asyncio.Task[Any]:
    """Start `coro` as a task kept in `tasks` until it ends, so its owner can cancel it."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
