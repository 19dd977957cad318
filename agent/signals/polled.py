"""What sources that read the host on a timer share: the loop, and when their values go stale."""

from __future__ import annotations

import asyncio

from agent.model import SignalSink


def polled_max_age(interval: float) -> float:
    """Stale after three missed polls, and never sooner than 15 s, so that a short
    interval on a busy host does not make a policy's input flicker in and out."""
    return max(3 * interval, 15.0)


class PolledSource:
    """Base for sources that publish everything they read every `interval` seconds."""

    interval: float
    # Signal name prefixes the source publishes, for the store's staleness hints.
    prefixes: tuple[str, ...] = ()

    def poll(self, sink: SignalSink) -> None:
        raise NotImplementedError

    def max_ages(self) -> dict[str, float | None]:
        age = polled_max_age(self.interval)
        return dict.fromkeys(self.prefixes, age)

    async def run(self, sink: SignalSink) -> None:
        while True:
            self.poll(sink)
            await asyncio.sleep(self.interval)
