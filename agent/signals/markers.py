"""Marker files: an operator (or a maintenance tool) touches a file to ask for action.

`marker.<name>` is 1.0 while the file exists and 0.0 otherwise; the file's
content (e.g. the drain reason) travels in the sample's "content" label and
is readable through `SignalStore.marker_content(name)`.

Reaction time matters (an operator wants evacuation to start now), so files
are watched with watchdog's inotify observer. Watching the parent directory,
not the file, is what lets us see creation, removal, rename in and out, and
content changes alike. watchdog calls back on its own thread; the handler
only hands the name over to the event loop, which re-reads the file, so
ordering and publishing stay on one thread. Only events that can change a
marker's presence or content count: watchdog also reports opens and
no-write closes, and our own re-read causes exactly those, so reacting to
them would re-read a present marker forever. A periodic re-scan republishes
everything as a safety net (a deleted-and-recreated parent directory silently
loses its inotify watch) and keeps the signals fresh in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog
from watchdog import events as ev
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from agent.model import Clock, Sample, SignalSink, SystemClock
from agent.signals.polled import polled_max_age
from agent.signals.store import LABEL_CONTENT

log = structlog.get_logger(__name__)

MAX_CONTENT_BYTES = 4096
ObserverFactory = Callable[[], BaseObserver]

# chmod can make a marker unreadable, which changes its content. watchdog 7
# reports it as ATTRIB events; older releases (Debian trixie ships 6.0) report it
# as a modification, which is already watched.
_HAS_ATTRIB = hasattr(ev, "EVENT_TYPE_ATTRIB")
# Opened and closed-without-write are deliberately absent (see the module doc).
CHANGE_EVENT_TYPES = frozenset(
    {
        ev.EVENT_TYPE_CREATED,
        ev.EVENT_TYPE_DELETED,
        ev.EVENT_TYPE_MOVED,
        ev.EVENT_TYPE_MODIFIED,
        ev.EVENT_TYPE_CLOSED,  # closed after a write
        *([ev.EVENT_TYPE_ATTRIB] if _HAS_ATTRIB else []),
    }
)
# The same, as classes for the observer's event_filter, so the kernel is not even
# asked for the open/close events of every read in the watched directories.
_CHANGE_EVENT_CLASSES: list[type[FileSystemEvent]] = [
    ev.FileCreatedEvent,
    ev.FileDeletedEvent,
    ev.FileMovedEvent,
    ev.FileModifiedEvent,
    ev.FileClosedEvent,
    ev.DirCreatedEvent,  # a directory at the marker path still counts as present
    ev.DirDeletedEvent,
    ev.DirMovedEvent,
    ev.DirModifiedEvent,
    *([ev.FileAttribEvent, ev.DirAttribEvent] if _HAS_ATTRIB else []),
]


def _inotify_observer() -> BaseObserver:
    # Imported lazily: the module only exists (and only works) on Linux.
    from watchdog.observers.inotify import InotifyObserver

    return InotifyObserver()


class _Handler(FileSystemEventHandler):
    def __init__(self, wanted: Mapping[str, str], hand_over: Callable[[str], None]) -> None:
        self._wanted = wanted  # absolute path -> marker name
        self._hand_over = hand_over

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in CHANGE_EVENT_TYPES:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            name = self._wanted.get(os.fsdecode(raw))
            if name is not None:
                self._hand_over(name)


class MarkerSource:
    """Watches marker files; `markers` maps marker name -> file path."""

    def __init__(
        self,
        markers: Mapping[str, Path],
        clock: Clock | None = None,
        rescan_interval: float = 5.0,
        observer_factory: ObserverFactory = _inotify_observer,
        poll_interval: float = 0.5,
        name: str = "markers",
    ) -> None:
        self.name = name
        self.markers = {m: Path(p).absolute() for m, p in markers.items()}
        self.clock: Clock = clock or SystemClock()
        self.rescan_interval = rescan_interval
        self.poll_interval = poll_interval
        self._observer_factory = observer_factory
        self.backend: str | None = None  # "inotify" or "polling" once running

    def max_ages(self) -> dict[str, float | None]:
        return {f"marker.{m}": polled_max_age(self.rescan_interval) for m in self.markers}

    async def run(self, sink: SignalSink) -> None:
        loop = asyncio.get_running_loop()
        wanted = {str(path): name for name, path in self.markers.items()}

        def hand_over(name: str) -> None:
            # Runs on the observer thread; never touch the sink from here.
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(self.check, name, sink)

        directories = sorted({path.parent for path in self.markers.values()})
        for directory in directories:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("signals.marker_dir_unavailable", path=str(directory), error=str(exc))
        handler = _Handler(wanted, hand_over)
        observer = self._start_observer(handler, [d for d in directories if d.is_dir()])
        try:
            while True:
                self.rescan(sink)
                await asyncio.sleep(self.rescan_interval)
        finally:
            if observer is not None:
                observer.stop()
                # Emitters wake within their read timeout; joining here is what
                # guarantees no watchdog thread outlives the source.
                observer.join(timeout=10)

    def rescan(self, sink: SignalSink) -> None:
        for name in self.markers:
            self.check(name, sink)

    def check(self, name: str, sink: SignalSink) -> None:
        """Read one marker's state now and publish it."""
        path = self.markers[name]
        labels: dict[str, str] = {}
        try:
            with path.open("rb") as f:
                content = f.read(MAX_CONTENT_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            value = 0.0
        except IsADirectoryError:
            value = 1.0  # a directory at the marker path still signals intent
            labels[LABEL_CONTENT] = ""
        except OSError as exc:
            # Present but unreadable (permissions): the operator's intent is there.
            value = 1.0
            labels[LABEL_CONTENT] = ""
            log.warning("signals.marker_unreadable", marker=name, path=str(path), error=str(exc))
        else:
            value = 1.0
            labels[LABEL_CONTENT] = content.decode("utf-8", errors="replace").strip()
        sink.publish(Sample(f"marker.{name}", value, self.clock.time(), labels))

    def _start_observer(
        self, handler: FileSystemEventHandler, directories: list[Path]
    ) -> BaseObserver | None:
        if not directories:
            self.backend = "polling"  # nothing to watch; the re-scan loop does the work
            return None
        try:
            observer = self._schedule_and_start(self._observer_factory(), handler, directories)
            self.backend = "inotify"
            return observer
        except OSError as exc:
            log.warning(
                "signals.inotify_unavailable",
                error=str(exc),
                fallback="polling",
                poll_interval=self.poll_interval,
            )
        observer = self._schedule_and_start(
            PollingObserver(timeout=self.poll_interval), handler, directories
        )
        self.backend = "polling"
        return observer

    @staticmethod
    def _schedule_and_start(
        observer: BaseObserver, handler: FileSystemEventHandler, directories: list[Path]
    ) -> BaseObserver:
        try:
            for directory in directories:
                observer.schedule(
                    handler,
                    str(directory),
                    recursive=False,
                    event_filter=_CHANGE_EVENT_CLASSES,
                )
            observer.start()
        except BaseException:
            # A half-built inotify observer already owns a reader thread.
            observer.stop()
            with contextlib.suppress(RuntimeError):
                observer.join(timeout=10)
            raise
        return observer
