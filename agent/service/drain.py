"""The drain marker file, which is the single truth about whether this host is draining.

It may be created by `ferry drain`, by hand or by a maintenance tool, even
before the agent starts, so every question is answered from the file itself
rather than from state remembered in memory.
"""

from __future__ import annotations

from pathlib import Path


class DrainMarker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def active(self) -> bool:
        return self.path.exists()

    def reason(self) -> str | None:
        try:
            return self.path.read_text(errors="replace").strip() or None
        except OSError:
            return None

    def set(self, reason: str) -> None:
        """Write the marker atomically, so the watcher never reads a half-written reason."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(reason + "\n" if reason else "")
        tmp.replace(self.path)

    def clear(self) -> bool:
        """Remove the marker; returns whether it was there."""
        existed = self.path.exists()
        self.path.unlink(missing_ok=True)
        return existed
