"""Shared test helpers: deadlines instead of sleeps, and leak-checked asyncio runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlineExceeded(AssertionError):
    pass


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll `condition` until it returns a truthy value, or fail after `timeout` seconds.

    Returns that value so tests can assert on it. Exceptions raised by the
    condition count as "not yet" and the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run a coroutine in a fresh loop and fail if it leaves tasks running."""

    async def runner() -> T:
        result = await asyncio.wait_for(coro, timeout)
        current = asyncio.current_task()
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if leaked:
            for t in leaked:
                t.cancel()
            raise AssertionError(f"test leaked {len(leaked)} asyncio task(s): {leaked!r}")
        return result

    return asyncio.run(runner())
