"""Thread <-> asyncio bridges: what a cancellation does to a blocking call under way."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.bridges import to_thread_to_the_end
from tests.helpers import run_async


def test_a_cancelled_caller_hears_of_it_only_once_the_call_has_ended() -> None:
    """The journal's decision write: the caller must not roll back while it may still land."""
    started = threading.Event()
    release = threading.Event()
    written: list[str] = []

    def write() -> str:
        started.set()
        release.wait(10)
        written.append("commit")
        return "done"

    async def scenario() -> None:
        task = asyncio.ensure_future(to_thread_to_the_end(write))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(20):  # give the loop every chance to deliver the cancellation early
            await asyncio.sleep(0)
        assert not task.done() and written == []
        task.cancel()  # a second cancellation does not cut it short either
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert written == ["commit"]

    run_async(scenario())


def test_returns_and_raises_like_the_call() -> None:
    def boom() -> None:
        raise ValueError("disk full")

    async def scenario() -> None:
        assert await to_thread_to_the_end(lambda a, b: a + b, 2, b=3) == 5
        with pytest.raises(ValueError, match="disk full"):
            await to_thread_to_the_end(boom)

    run_async(scenario())
