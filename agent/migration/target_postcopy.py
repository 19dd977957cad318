"""The target's post-copy restores: the copy runs at once and pulls its pages from the source.

Until the last page has arrived the paused source is the only complete copy:
the copy here runs only while its page daemon is healthy. Whatever ends the
daemon short of every page in (the source's page server gone, a cut link past
the stall timeout, the daemon killed), the copy is killed first and the
migration discarded, so the source resumes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from agent.bridges import to_thread_to_the_end
from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError
from agent.journal import Journal, JournalError
from agent.migration import criu_config, criu_images, postcopy
from agent.migration.ctrd import CtrdSweeper
from agent.migration.incoming import Incoming, lazy_bytes
from agent.migration.paths import DataRootResolver

log = structlog.get_logger(__name__)

WATCH_POLL = 0.25  # how often the daemon's exit is looked for (the guard acts on its own)


class PostcopyPulls:
    """Every post-copy restore of this target and the watch over its page daemon."""

    def __init__(
        self,
        *,
        config: FerryConfig,
        journal: Journal,
        adapter: DockerAdapter,
        data_root: DataRootResolver,
        ctrd: CtrdSweeper,
        lock: Callable[[str], asyncio.Lock],
        discard: Callable[[Incoming, str], Awaitable[Any]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.config = config
        self.journal = journal
        self.adapter = adapter
        self.data_root = data_root
        self.ctrd = ctrd
        self.lock = lock
        self.discard = discard
        self.spawn = spawn  # the target's tasks: cancelled when it closes
        self.clients: dict[str, postcopy.PageClient] = {}

    def pulled(self, mid: str) -> int:
        client = self.clients.get(mid)
        return client.pulled() if client is not None and client.proc is not None else 0

    def progress(self, incoming: dict[str, Incoming]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for mid, client in list(self.clients.items()):
            inc = incoming.get(mid)
            if inc is None or client.proc is None:
                continue
            total = lazy_bytes(inc.timings)
            done = client.pulled()
            out[mid] = {
                "container": inc.name,
                "how": "post-copy",
                "bytes_done": min(done, total) if total else done,
                "bytes_total": total,
            }
        return out

    def finished(self, mid: str) -> None:
        self.clients.pop(mid, None)

    def drop(self, mid: str) -> None:
        client = self.clients.pop(mid, None)
        if client is not None:
            client.cleanup()

    def _source_host(self, peer: str) -> str:
        for p in self.config.peers:
            if p.name == peer:
                host = str(p.address).removeprefix("https://").rpartition(":")[0]
                return host.strip("[]")
        raise DockerError("restore", f"no address for peer {peer} in this host's config")

    def start(self, inc: Incoming) -> None:
        """Restore running at once; a lazy-pages daemon pulls every page from the source."""
        assert inc.container_id and inc.postcopy_port is not None
        root = self.data_root.get()
        tls = postcopy.TlsFiles(root)
        t = self.config.tls
        assert t.ca and t.cert and t.key
        tls.install(t.ca, t.cert, t.key)
        client = postcopy.PageClient(
            root,
            self.config.docker.criu_command,
            inc.migration_id,
            root.daemon_checkpoint_dir(inc.container_id, inc.checkpoint),
            self._source_host(inc.peer),
            inc.postcopy_port,
            tls,
            inc.container_id,
            float(self.config.migration.postcopy_stall_timeout),
        )
        conf = criu_config.for_migration(root, inc.migration_id)
        conf.write(
            criu_config.restore_options(
                conf.daemon_log, leave_stopped=False, extra=client.criu_options()
            )
        )
        try:
            client.start()
        except postcopy.PostcopyError as exc:
            raise DockerError("restore", str(exc)) from exc
        self.clients[inc.migration_id] = client
        with contextlib.suppress(OSError, criu_images.ImageFormatError):
            # For progress only: how much the daemon has to pull.
            ckpt = root.checkpoint_dir(inc.container_id, inc.checkpoint)
            inc.timings["lazy_pages"] = criu_images.lazy_pages_in(ckpt)
        try:
            with self.ctrd.restoring():
                self.adapter.start(inc.container_id, checkpoint=inc.checkpoint)
            self.adapter.wait_running(
                inc.container_id, timeout=self.config.migration.restore_timeout
            )
        except DockerError:
            client.kill()
            raise

    def watch(self, inc: Incoming) -> None:
        """The copy runs only while its pages keep coming: any failure kills it at once."""
        client = self.clients.get(inc.migration_id)
        assert client is not None and client.proc is not None

        def wait() -> tuple[int, str]:
            # The page guard decides a stall (postcopy_stall_timeout) and kills the copy
            # before the daemon; stopping the daemon from here would do it the other
            # way round. Its exit, whatever the cause, is what this acts on.
            proc = client.proc
            assert proc is not None
            while (rc := proc.poll()) is None:
                time.sleep(WATCH_POLL)
            return rc, client.error_words()

        async def watch() -> None:
            rc, words = await asyncio.to_thread(wait)
            if rc == 0:
                inc.pages_in = True
                with contextlib.suppress(JournalError):
                    await to_thread_to_the_end(
                        self.journal.update_report, inc.migration_id, inc.journal_report()
                    )
                log.info("migration.target.pages_in", migration=inc.migration_id)
                return
            inc.page_failure = f"page daemon exited {rc}: {words}"
            log.error(
                "migration.target.pages_failed", migration=inc.migration_id, reason=inc.page_failure
            )
            # Running on missing pages is worse than not running: kill it now.
            with contextlib.suppress(DockerError):
                await asyncio.to_thread(self.adapter.kill, str(inc.container_id))
            async with self.lock(inc.migration_id):
                await self.discard(inc, inc.page_failure)

        self.spawn(watch())
