"""The target's view of its own capacity, and reservations that expire."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.model import Clock

# A state stream may unpack to its declared estimate plus this slack, and no more:
# the estimate (memory in use + writable layer + volumes) is made before the dump,
# and the tar stream adds headers and padding.
STATE_SLACK_RATIO = 0.10
STATE_SLACK_BYTES = 64 * 1024 * 1024


def state_cap(estimate: int) -> int:
    """What a state stream declared at `estimate` bytes may unpack to (and is reserved)."""
    return int(max(estimate, 0) * (1 + STATE_SLACK_RATIO)) + STATE_SLACK_BYTES


@dataclass
class Reservation:
    migration_id: str
    peer: str
    memory_bytes: int
    disk_bytes: int
    expires: float  # clock.monotonic()


class CapacityRefused(Exception):
    pass


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_free(path: Path) -> int:
    # The data root may not exist yet on a fresh host; its filesystem is its nearest parent's.
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0


class Reservations:
    """Capacity promised to migrations in flight, so two at once cannot both fit 'just'."""

    def __init__(
        self,
        clock: Clock,
        data_root: Path,
        meminfo: Path = Path("/proc/meminfo"),
        headroom: float = 0.1,
    ) -> None:
        self.clock = clock
        self.data_root = data_root
        self.meminfo = meminfo
        self.headroom = headroom
        self._held: dict[str, Reservation] = {}

    def _expire(self) -> None:
        now = self.clock.monotonic()
        for mid in [m for m, r in self._held.items() if r.expires <= now]:
            del self._held[mid]

    def active(self) -> list[Reservation]:
        self._expire()
        return list(self._held.values())

    def reserve(
        self, migration_id: str, peer: str, memory: int, disk: int, ttl: float
    ) -> Reservation:
        self.fits(memory, disk)
        r = Reservation(migration_id, peer, memory, disk, self.clock.monotonic() + ttl)
        self._held[migration_id] = r
        return r

    def fits(self, memory: int, disk: int) -> None:
        """Raise CapacityRefused unless `memory` and `disk` bytes fit beside what is held."""
        self._expire()
        held_mem = sum(r.memory_bytes for r in self._held.values())
        held_disk = sum(r.disk_bytes for r in self._held.values())
        need_mem = int(memory * (1 + self.headroom))
        need_disk = int(disk * (1 + self.headroom))
        free_mem = mem_available(self.meminfo) - held_mem
        free_disk = disk_free(self.data_root) - held_disk
        if need_mem > free_mem:
            raise CapacityRefused(
                f"not enough memory: needs {_mib(need_mem)}, {_mib(max(free_mem, 0))} available"
            )
        if need_disk > free_disk:
            raise CapacityRefused(
                f"not enough free disk under {self.data_root}: needs {amount(need_disk)}, "
                f"{amount(max(free_disk, 0))} free"
            )

    def extend(self, migration_id: str, ttl: float) -> None:
        r = self._held.get(migration_id)
        if r is not None:
            r.expires = max(r.expires, self.clock.monotonic() + ttl)

    def release(self, migration_id: str) -> None:
        self._held.pop(migration_id, None)


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


def amount(n: int) -> str:
    """MiB for people, and the exact bytes: refusals are compared against `df -B1`."""
    return f"{_mib(n)} ({n} bytes)"
