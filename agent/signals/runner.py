"""Running a set of sources: each in its own task, restarted when it crashes.

A source that raises must not take the others (or the agent) down: a broken
command monitor should not blind the agent to a drain marker. Its signals go
stale in the store while it is down, so policies see "unknown", not old data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from agent.backoff import Backoff
from agent.model import SignalSink, SignalSource

log = structlog.get_logger(__name__)


async def supervise(
    source: SignalSource,
    sink: SignalSink,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
) -> None:
    """Run `source` until cancelled, restarting it with capped backoff when it fails or returns."""
    backoff = Backoff(backoff_initial, backoff_max)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        # A source that ran fine for a while before failing starts over at
        # the short delay; one that fails straight away backs off.
        delay = backoff.next()
        try:
            await source.run(sink)
            log.warning("signals.source_returned", source=source.name, restart_in=delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "signals.source_crashed",
                source=source.name,
                error=repr(exc),
                restart_in=delay,
                exc_info=True,
            )
        if loop.time() - started > backoff_max:
            backoff.reset()
            delay = backoff.next()
        await asyncio.sleep(delay)


async def run_sources(
    sources: Sequence[SignalSource],
    sink: SignalSink,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
) -> None:
    """Run every source under `supervise` until cancelled; cancelling stops and awaits them all."""
    async with asyncio.TaskGroup() as group:
        for source in sources:
            group.create_task(
                supervise(source, sink, backoff_initial, backoff_max),
                name=f"signal-source:{source.name}",
            )
