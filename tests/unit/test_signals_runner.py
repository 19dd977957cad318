"""run_sources: a crashing source is restarted and does not stop the others."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from agent.model import Sample, SignalSink
from agent.signals.runner import run_sources
from agent.signals.store import SignalStore
from tests.helpers import run_async


class Flaky:
    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    async def run(self, sink: SignalSink) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise RuntimeError(f"boom {self.attempts}")
        sink.publish(Sample("flaky.ok", float(self.attempts), 0.0))
        await asyncio.Event().wait()


class Steady:
    name = "steady"

    async def run(self, sink: SignalSink) -> None:
        sink.publish(Sample("steady.ok", 1.0, 0.0))
        await asyncio.Event().wait()


def test_crashing_source_is_restarted_and_others_keep_running() -> None:
    store = SignalStore(default_max_age=None)
    flaky = Flaky(failures=2)

    async def main() -> None:
        task = asyncio.create_task(run_sources([flaky, Steady()], store, 0.01, 0.05))
        while store.value("flaky.ok") is None or store.value("steady.ok") is None:
            await store.wait_changed(timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with capture_logs() as logs:
        run_async(main())
    assert store.value("flaky.ok") == 3.0
    crashes = [e for e in logs if e["event"] == "signals.source_crashed"]
    assert [c["source"] for c in crashes] == ["flaky", "flaky"]
    assert "boom 1" in crashes[0]["error"]
