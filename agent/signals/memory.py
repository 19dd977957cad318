"""Memory headroom and free space on Docker's data root.

A host short of memory or of disk under the Docker data root cannot take a
migrated container (checkpoint images and layers land there), and is itself
a reason to move work away.

Signals: mem.available_bytes, mem.total_bytes, mem.available_ratio,
disk.docker.free_bytes, disk.docker.total_bytes, disk.docker.free_ratio.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from agent.model import Clock, Sample, SignalSink, SystemClock
from agent.signals.polled import PolledSource

log = structlog.get_logger(__name__)


class StatvfsResult(Protocol):
    @property
    def f_frsize(self) -> int: ...
    @property
    def f_blocks(self) -> int: ...
    @property
    def f_bavail(self) -> int: ...


StatvfsFn = Callable[[str], StatvfsResult]


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` -> bytes by key ("MemTotal", "MemAvailable", ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


class MemoryDiskSource(PolledSource):
    """Polls `<proc_root>/meminfo` and statvfs of the Docker data root."""

    prefixes = ("mem.", "disk.docker.")

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        data_root: Path = Path("/var/lib/docker"),
        clock: Clock | None = None,
        interval: float = 5.0,
        statvfs: StatvfsFn = os.statvfs,
        name: str = "memory",
    ) -> None:
        self.name = name
        self.proc_root = Path(proc_root)
        self.data_root = Path(data_root)
        self.clock: Clock = clock or SystemClock()
        self.interval = interval
        self._statvfs = statvfs
        # Each failure is logged once until it recovers, not every interval.
        self._failing: set[str] = set()

    def poll(self, sink: SignalSink) -> None:
        now = self.clock.time()
        try:
            info = parse_meminfo((self.proc_root / "meminfo").read_text())
            total = info["MemTotal"]
            # Kernels before 3.14 lack MemAvailable; free + page cache is the
            # conventional estimate there.
            available = info.get("MemAvailable")
            if available is None:
                available = info["MemFree"] + info.get("Cached", 0) + info.get("Buffers", 0)
        except (OSError, KeyError, ValueError) as exc:
            self._fail("meminfo", exc)
        else:
            self._ok("meminfo")
            sink.publish(Sample("mem.available_bytes", float(available), now))
            sink.publish(Sample("mem.total_bytes", float(total), now))
            if total > 0:
                sink.publish(Sample("mem.available_ratio", available / total, now))

        try:
            st = self._statvfs(str(self.data_root))
        except OSError as exc:
            self._fail("statvfs", exc)
        else:
            self._ok("statvfs")
            free = st.f_bavail * st.f_frsize
            total_disk = st.f_blocks * st.f_frsize
            sink.publish(Sample("disk.docker.free_bytes", float(free), now))
            sink.publish(Sample("disk.docker.total_bytes", float(total_disk), now))
            if st.f_blocks > 0:
                sink.publish(Sample("disk.docker.free_ratio", st.f_bavail / st.f_blocks, now))

    def _fail(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            path = self.proc_root / "meminfo" if what == "meminfo" else self.data_root
            log.warning("signals.memory_unreadable", what=what, path=str(path), error=str(exc))

    def _ok(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("signals.memory_readable_again", what=what)
