"""Marker files through real inotify (watchdog) on tmp_path, and the polling fallback."""

from __future__ import annotations

import asyncio
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog import events as ev
from watchdog.observers.api import BaseObserver

from agent.signals.markers import MarkerSource, _Handler
from agent.signals.store import SignalStore
from tests.helpers import run_async


async def until(store: SignalStore, condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait on the store's own change notification; returns when (monotonic) it held."""
    deadline = time.monotonic() + timeout
    while True:
        version = store.version
        if condition():
            return time.monotonic()
        remaining = deadline - time.monotonic()
        assert remaining > 0, "condition not reached in time"
        await store.wait_changed(version, timeout=remaining)


async def running(source: MarkerSource, store: SignalStore) -> asyncio.Task[None]:
    task = asyncio.create_task(source.run(store))
    # The observer is started before the first scan publishes, so once every
    # marker has a value the watch is in place.
    await until(store, lambda: all(store.value(f"marker.{m}") is not None for m in source.markers))
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    # Cancellation, not some error the source hit, must be what ends it.
    with pytest.raises(asyncio.CancelledError):
        await task


def test_marker_appearance_seen_via_inotify_not_the_rescan(tmp_path: Path) -> None:
    marker = tmp_path / "ferry" / "drain"  # parent does not exist yet: the source creates it
    store = SignalStore(default_max_age=None)
    # The re-scan is an hour away, so a change seen within the wait's deadline
    # can only have come through inotify. How fast is not asserted here: a
    # loaded CI host stretches any fixed bound, and speed is the bench's job.
    source = MarkerSource({"drain": marker}, rescan_interval=3600)

    async def main() -> None:
        task = await running(source, store)
        try:
            assert source.backend == "inotify"
            assert marker.parent.is_dir()
            assert store.value("marker.drain") == 0.0

            marker.write_text("kernel upgrade CHG-1234\n")
            await until(store, lambda: store.value("marker.drain") == 1.0)
            await until(store, lambda: store.marker_content("drain") == "kernel upgrade CHG-1234")

            marker.write_text("moved to Friday")  # content change while present
            await until(store, lambda: store.marker_content("drain") == "moved to Friday")

            marker.unlink()
            await until(store, lambda: store.value("marker.drain") == 0.0)
            assert store.marker_content("drain") is None
        finally:
            await stop(task)

    run_async(main())


def test_rename_in_and_out_and_two_markers_in_one_dir(tmp_path: Path) -> None:
    drain = tmp_path / "drain"
    hold = tmp_path / "hold"
    store = SignalStore(default_max_age=None)
    source = MarkerSource({"drain": drain, "hold": hold}, rescan_interval=3600)

    async def main() -> None:
        task = await running(source, store)
        try:
            staging = tmp_path / ".drain.tmp"
            staging.write_text("atomic write")
            os.rename(staging, drain)  # how tools write files atomically
            await until(store, lambda: store.marker_content("drain") == "atomic write")
            assert store.value("marker.hold") == 0.0

            os.rename(drain, hold)  # out of one marker, into the other
            await until(
                store,
                lambda: store.value("marker.drain") == 0.0 and store.value("marker.hold") == 1.0,
            )
            assert store.marker_content("hold") == "atomic write"

            os.rename(hold, tmp_path / "elsewhere")
            await until(store, lambda: store.value("marker.hold") == 0.0)
        finally:
            await stop(task)

    run_async(main())


def test_marker_present_at_start(tmp_path: Path) -> None:
    (tmp_path / "drain").write_text("already there")
    store = SignalStore(default_max_age=None)
    source = MarkerSource({"drain": tmp_path / "drain"}, rescan_interval=3600)

    async def main() -> None:
        task = await running(source, store)
        await stop(task)

    run_async(main())
    assert store.value("marker.drain") == 1.0
    assert store.marker_content("drain") == "already there"


def test_falls_back_to_polling_with_one_warning_when_inotify_unavailable(tmp_path: Path) -> None:
    def no_inotify() -> BaseObserver:
        raise OSError(24, "inotify instance limit reached")

    marker = tmp_path / "drain"
    store = SignalStore(default_max_age=None)
    source = MarkerSource(
        {"drain": marker}, rescan_interval=3600, observer_factory=no_inotify, poll_interval=0.05
    )

    async def main() -> None:
        task = await running(source, store)
        try:
            assert source.backend == "polling"
            marker.write_text("via polling")
            await until(store, lambda: store.marker_content("drain") == "via polling")
        finally:
            await stop(task)

    with capture_logs() as logs:
        run_async(main())
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["signals.inotify_unavailable"]
    assert "instance limit" in warnings[0]["error"]
    assert warnings[0]["fallback"] == "polling"


def test_rescan_catches_what_the_watch_cannot_see(tmp_path: Path) -> None:
    """The parent directory is removed and recreated: its inotify watch is gone for good."""
    parent = tmp_path / "markers"
    marker = parent / "drain"
    store = SignalStore(default_max_age=None)
    source = MarkerSource({"drain": marker}, rescan_interval=0.05)

    async def main() -> None:
        task = await running(source, store)
        try:
            parent.rmdir()
            parent.mkdir()
            marker.write_text("after recreate")
            await until(store, lambda: store.marker_content("drain") == "after recreate")
        finally:
            await stop(task)

    run_async(main())


def test_handler_reacts_to_changes_only_not_to_opens_and_plain_closes(tmp_path: Path) -> None:
    marker = str(tmp_path / "drain")
    handed: list[str] = []
    handler = _Handler({marker: "drain"}, handed.append)

    # What reading the marker makes watchdog report: must not trigger another read.
    handler.dispatch(ev.FileOpenedEvent(marker))
    handler.dispatch(ev.FileClosedNoWriteEvent(marker))
    assert handed == []

    for event in (
        ev.FileCreatedEvent(marker),
        ev.FileModifiedEvent(marker),
        ev.FileAttribEvent(marker),
        ev.FileClosedEvent(marker),  # closed after a write
        ev.FileDeletedEvent(marker),
        ev.FileMovedEvent(str(tmp_path / ".drain.tmp"), marker),
        ev.FileMovedEvent(marker, str(tmp_path / "elsewhere")),
        ev.DirCreatedEvent(marker),
    ):
        handler.dispatch(event)
    assert handed == ["drain"] * 8

    handler.dispatch(ev.FileCreatedEvent(str(tmp_path / "unrelated")))
    assert len(handed) == 8


def test_reading_a_present_marker_does_not_hand_it_over_again(tmp_path: Path) -> None:
    """Each re-read must not cause the next one (that loop spun at 100% CPU while draining).

    Both markers live in one directory, so their events come through one inotify
    queue in order: once `hold` is handed over, everything the reads of `drain`
    caused before it has been handed over too.
    """
    drain = tmp_path / "drain"
    hold = tmp_path / "hold"
    drain.write_text("kernel upgrade")
    source = MarkerSource({"drain": drain, "hold": hold}, rescan_interval=3600)
    handed: queue.SimpleQueue[str] = queue.SimpleQueue()
    handler = _Handler({str(p): m for m, p in source.markers.items()}, handed.put)
    observer = source._start_observer(handler, [tmp_path])
    assert observer is not None and source.backend == "inotify"
    try:
        store = SignalStore(default_max_age=None)
        for _ in range(3):
            source.check("drain", store)  # what the event loop does on each hand-over
        assert store.marker_content("drain") == "kernel upgrade"
        hold.write_text("x")
        before_hold = []
        while (name := handed.get(timeout=5)) != "hold":
            before_hold.append(name)
        assert before_hold == []
    finally:
        observer.stop()
        observer.join(timeout=10)
