"""Daemon-side paths, translated to where this agent sees them.

dockerd may run in its own mount namespace (the testbed does, and so can a
real host), so paths it reports (DockerRootDir, GraphDriver.Data.UpperDir,
volume mountpoints) are only meaningful to us after swapping the daemon's
DockerRootDir prefix for `config.docker.data_root`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class PathOutsideDataRoot(ValueError):
    pass


@dataclass(frozen=True)
class DataRoot:
    daemon_root: str  # DockerRootDir as the daemon reports it
    local_root: Path  # the same directory as this agent sees it

    def local(self, daemon_path: str) -> Path:
        norm = posixpath.normpath(daemon_path)
        root = posixpath.normpath(self.daemon_root)
        if norm == root:
            return self.local_root
        if not norm.startswith(root.rstrip("/") + "/"):
            raise PathOutsideDataRoot(f"{daemon_path} is not under the daemon's data root {root}")
        rel = norm[len(root.rstrip("/")) + 1 :]
        return self.local_root / rel

    def checkpoints_dir(self, container_id: str) -> Path:
        return self.local_root / "containers" / container_id / "checkpoints"

    def checkpoint_dir(self, container_id: str, name: str) -> Path:
        return self.checkpoints_dir(container_id) / name

    def daemon_path(self, *parts: str) -> str:
        """A path under the data root as the daemon (and its runc) sees it."""
        return posixpath.join(self.daemon_root, *parts)

    def daemon_checkpoint_dir(self, container_id: str, name: str) -> str:
        """Where `docker start --checkpoint NAME` reads images from, in the daemon's view."""
        return self.daemon_path("containers", container_id, "checkpoints", name)


class DataRootResolver:
    """Asks the daemon for its DockerRootDir once, and pairs it with our view of it."""

    def __init__(self, daemon_root: Callable[[], str], configured: Path | None) -> None:
        self._daemon_root = daemon_root
        self._configured = configured
        self._cached: DataRoot | None = None

    def get(self) -> DataRoot:
        """Blocking (asks the daemon the first time)."""
        if self._cached is None:
            daemon = self._daemon_root()
            self._cached = DataRoot(daemon, self._configured or Path(daemon))
        return self._cached
