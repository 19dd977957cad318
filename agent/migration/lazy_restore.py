"""Local lazy restore: stop-and-copy without Docker copying every page twice.

`docker start --checkpoint` copies the whole image set through containerd's
content store before CRIU runs: most of a large container's downtime. Here the
full images stay in a directory of Ferry's own; Docker's checkpoint dir gets
every image but the pages, a page map whose lazy entries are marked not
present, and a pages file holding only the rest (a few pages). A local
`criu lazy-pages` daemon serves the missing pages from the full copy. The copy
is held stopped until the commit and may run before every page is in (that is
the downtime saved): all pages are already on this host, so nothing depends on
the network or the source.

Until the daemon exits 0 the copy runs only while it is healthy. If it fails,
the copy it half-filled is killed and the restore is tried again from the same
local images (on the testbed such a retry, same checkpoint name and container,
restored the right memory). The full copy on disk is the durable mark of a fill
not yet confirmed: it goes only once the daemon has reported every page in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.migration import criu_images
from agent.migration.criu_config import CRIU_DIR
from agent.migration.lazy_daemon import DaemonError, LazyPagesDaemon
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)


class LazyRestoreError(Exception):
    """The lazy path cannot be used or failed; the message says why."""


@dataclass
class LazyRestore:
    root: DataRoot
    migration_id: str
    container_id: str
    checkpoint: str
    criu_command: Sequence[str]
    daemon: LazyPagesDaemon = field(init=False, repr=False)

    def __post_init__(self) -> None:
        work = self.root.daemon_path(*self._rel("work"))
        # No stall limit: the pages come from this host's disk, and a held copy may
        # wait for its commit without touching any.
        self.daemon = LazyPagesDaemon(self.criu_command, self.work_dir, work, self.container_id)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.daemon.proc

    # ------------------------------------------------------------ paths

    def _rel(self, suffix: str) -> tuple[str, ...]:
        return (*CRIU_DIR, f"{self.migration_id}.{suffix}")

    @property
    def full_dir(self) -> Path:
        return self.root.local_root.joinpath(*self._rel("images"))

    @property
    def work_dir(self) -> Path:
        return self.root.local_root.joinpath(*self._rel("work"))

    @property
    def docker_dir(self) -> Path:
        return self.root.checkpoint_dir(self.container_id, self.checkpoint)

    @property
    def pending(self) -> bool:
        """A fill not confirmed done: the full images are still here."""
        return self.full_dir.is_dir()

    def criu_options(self) -> list[str]:
        """Lines for the restore's CRIU config: lazy, with our work dir (and its socket)."""
        return ["lazy-pages", f"work-dir {self.root.daemon_path(*self._rel('work'))}"]

    # ------------------------------------------------------------ steps

    def prepare(self) -> tuple[int, int]:
        """Move the full images aside; leave Docker the lazy set. Returns (kept, lazy) pages."""
        full, docker_dir = self.full_dir, self.docker_dir
        if not (docker_dir / "inventory.img").exists():
            raise LazyRestoreError(f"no checkpoint images in {docker_dir}")
        pagemaps = sorted(p.name for p in docker_dir.glob("pagemap-*.img"))
        if not pagemaps:
            raise LazyRestoreError("the checkpoint has no page maps")
        shutil.rmtree(full, ignore_errors=True)
        full.parent.mkdir(parents=True, exist_ok=True)
        os.rename(docker_dir, full)
        docker_dir.mkdir(mode=0o700)
        try:
            for item in full.iterdir():
                if item.name.startswith(("pages-", "pagemap-")) or not item.is_file():
                    continue
                os.link(item, docker_dir / item.name)  # same file system: no copy
            kept = lazy = 0
            for name in pagemaps:
                k, lz = criu_images.make_lazy(full, docker_dir, name)
                kept, lazy = kept + k, lazy + lz
        except (OSError, criu_images.ImageFormatError) as exc:
            self.undo()
            raise LazyRestoreError(f"cannot build the lazy image set: {exc}") from exc
        return kept, lazy

    def undo(self) -> None:
        """Put the full images back where Docker reads them (plain restore)."""
        if self.full_dir.is_dir():
            shutil.rmtree(self.docker_dir, ignore_errors=True)
            os.rename(self.full_dir, self.docker_dir)

    def start_daemon(self, timeout: float = 10.0) -> None:
        """Run `criu lazy-pages` on the full copy (no page server: pages are read from
        this host's disk); return once it listens."""
        try:
            self.daemon.start(["-D", self.root.daemon_path(*self._rel("images"))], timeout)
        except DaemonError as exc:
            raise LazyRestoreError(str(exc)) from exc

    def wait_all_pages(self, timeout: float) -> None:
        """Block until the daemon has served every page (it then exits 0)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop_daemon()
            raise LazyRestoreError(f"not every page was in after {timeout:.0f}s") from None
        if code != 0:
            raise LazyRestoreError(f"criu lazy-pages exited {code}: {self.tail()}")

    def poll(self) -> int | None:
        """The daemon's exit code, None while it runs (or when none was started here)."""
        return self.daemon.poll()

    def pulled(self) -> int:
        return self.daemon.pulled()

    def kill_orphan(self) -> None:
        """Kill a daemon a previous agent left running for this migration, if any."""
        self.daemon.kill_orphan()

    def stop_daemon(self) -> None:
        self.daemon.stop()

    def cleanup(self) -> None:
        """Everything but Docker's own checkpoint dir (that goes with the container)."""
        self.stop_daemon()
        self.kill_orphan()
        shutil.rmtree(self.full_dir, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def tail(self) -> str:
        return self.daemon.error_words()
