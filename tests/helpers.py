"""Shared test helpers: deadlines instead of sleeps, and leak-checked asyncio runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.policy.sim import ManualClock

T = TypeVar("T")


class FakeClock(ManualClock):
    """The tests' one fake `agent.model.Clock`: time moves only when the test moves it.

    It is `ferry test-policy`'s ManualClock, started away from zero by default so
    that a sample stamped 0.0 is always long ago. `now` reads and moves the
    monotonic time (forward only); wall time is `epoch + now`.
    """

    def __init__(self, start: float = 1000.0, epoch: float = 1_700_000_000.0) -> None:
        super().__init__(start, epoch)

    @property
    def now(self) -> float:
        return self.monotonic()

    @now.setter
    def now(self, value: float) -> None:
        self.set(value)

    def ticking(self, step: float = 1.0) -> Callable[[], float]:
        """A wall clock that moves `step` seconds each time it is read, so every
        timestamp a caller takes (the journal's, say) is distinct and ordered."""

        def read() -> float:
            self.advance(step)
            return self.time()

        return read


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


async def until(
    condition: Callable[[], T | None],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """`wait_for` inside a running loop: polls without blocking it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() >= deadline:
            raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


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
