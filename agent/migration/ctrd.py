"""Remove the checkpoint copies containerd leaves behind after a restore.

Every `docker start --checkpoint` makes containerd write a copy of the images
to `/tmp/ctrd-checkpoint*` in its own mount namespace and never remove it
(1.1 GiB per 1 GiB restore before the lazy path; 4.1 GiB piled up within an
hour of tests). Ferry removes the ones its own restores leave: restores on
this host go one at a time through `restoring()`, and whatever appeared in that
window is ours.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PREFIX = "ctrd-checkpoint"


class CtrdSweeper:
    def __init__(self, tmp_dir: Path | None) -> None:
        self.tmp_dir = tmp_dir
        self._lock = threading.Lock()

    def _listing(self) -> set[str]:
        if self.tmp_dir is None or not self.tmp_dir.is_dir():
            return set()
        with contextlib.suppress(OSError):
            return {p.name for p in self.tmp_dir.iterdir() if p.name.startswith(PREFIX)}
        return set()

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Blocking. Wrap one `docker start --checkpoint`; afterwards remove its copy."""
        with self._lock:
            before = self._listing()
            try:
                yield
            finally:
                for name in sorted(self._listing() - before):
                    assert self.tmp_dir is not None
                    shutil.rmtree(self.tmp_dir / name, ignore_errors=True)
                    log.debug("migration.ctrd_copy_removed", path=str(self.tmp_dir / name))
