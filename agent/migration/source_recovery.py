"""The source's recovery: migrations known only by their journal record.

After a restart, an in-doubt commit, or an operator's `ferry resolve`, the
source has no live run, only what it journalled. A journalled commit is
finished (or, when the target proves it holds nothing, rolled back here);
anything short of a commit rolls back here, after the target has been told.
A container is never started fresh: the checkpoint, or the paused post-copy
source, is its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import structlog

from agent.backoff import Backoff
from agent.bridges import to_thread_to_the_end
from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.journal import Journal, JournalError, MigrationRecord
from agent.migration import held, postcopy
from agent.migration import report as rp
from agent.migration.checkpointers import WORK_PREFIX, in_daemon_namespaces
from agent.migration.ctrd import CtrdSweeper
from agent.migration.errors import MigrationFailed, MigrationRefused
from agent.migration.fresh_start import state_lost_sentence
from agent.migration.paths import DataRootResolver
from agent.migration.rollback import StateNotRestored, restore_locally, wait_checkpoint_settled
from agent.migration.source_messages import IN_DOUBT, PeerLike, PeerMessages
from agent.model import Clock
from agent.peer.api import migration_path
from agent.peer.client import PeerError

log = structlog.get_logger(__name__)


class Recovery:
    def __init__(
        self,
        *,
        adapter: DockerAdapter,
        config: FerryConfig,
        journal: Journal,
        peers: Mapping[str, PeerLike],
        data_root: DataRootResolver,
        procs: held.ProcessTable,
        ctrd: CtrdSweeper,
        messages: PeerMessages,
        active: dict[str, str],
        clock: Clock,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.journal = journal
        self.peers = peers
        self.data_root = data_root
        self.procs = procs
        self.ctrd = ctrd
        self.messages = messages
        self.active = active  # container id -> migration id of the runs going on now
        self.clock = clock
        self.spawn = spawn

    async def reconcile_record(self, rec: MigrationRecord) -> str:
        """Resolve one unfinished (or in-doubt) source-side migration after a restart.

        Raises while it cannot be resolved yet; the caller retries.
        """
        data = dict(rec.report or {})
        peer = self.peers.get(rec.target)
        decision = data.get("decision")
        port = (data.get("details") or {}).get("postcopy_port")
        if port is not None and decision == rp.DECISION_POSTCOPY and rec.outcome is None:
            st = None
            if peer is not None:
                with contextlib.suppress(PeerError):
                    st = await peer.get_json(migration_path(rec.id))
            pc = (st or {}).get("postcopy") or {}
            if pc.get("pages_in"):
                data["decision"] = rp.DECISION_COMMIT
                await to_thread_to_the_end(self.journal.decide, {rec.id: data}, rp.COMMIT)
                decision = rp.DECISION_COMMIT
            elif st is not None and st.get("outcome") is None and not pc.get("failed"):
                raise MigrationFailed(f"{rec.target} is still pulling pages", rolled_back=False)
        if rec.outcome == rp.IN_DOUBT or decision == rp.DECISION_COMMIT:
            outcome = await self._settle_commit(rec, patience=0)
            if outcome is None:
                if rec.outcome != rp.IN_DOUBT:
                    await to_thread_to_the_end(
                        self.journal.finish,
                        rec.id,
                        rp.IN_DOUBT,
                        reason=f"committed; {rec.target} has not confirmed it runs the container",
                    )
                    log.error("migration.in_doubt", migration=rec.id, target=rec.target)
                self.spawn(self.resolve_in_doubt(rec.id))
                return "in doubt: committed, target silent; nothing runs here, state kept"
            return outcome
        if rec.phase not in rp.FROZEN_PHASES:
            await self.messages.send_abort(peer, rec.id, "source agent restarted before the freeze")
            await to_thread_to_the_end(
                self.journal.finish, rec.id, "refused", reason="agent restarted before the freeze"
            )
            return "untouched: restarted before the freeze"
        # No commit was journalled: roll back, and say so first.
        data["decision"] = rp.DECISION_ROLLBACK
        await to_thread_to_the_end(self.journal.update_report, rec.id, data)
        if port is not None:
            if not await self.messages.confirmed_abort(
                peer, rec.id, "source rolled back at reconcile"
            ):
                await asyncio.sleep(float(self.config.migration.postcopy_stall_timeout) + 2)
            return await self._restore_record(
                dataclasses.replace(rec, report=data), f"agent restarted during {rec.phase}; "
            )
        if await self.messages.send_abort(peer, rec.id, "source rolled back at reconcile"):
            log.error("migration.target_ran_uncommitted", migration=rec.id, target=rec.target)
            raise MigrationFailed(
                f"{rec.target} says it runs a copy that was never committed", rolled_back=False
            )
        return await self._restore_record(
            dataclasses.replace(rec, report=data), f"agent restarted during {rec.phase}; "
        )

    async def resolve(self, migration_id: str, keep: str) -> str:
        """An operator ends an in-doubt migration: keep the source's or the target's copy."""
        try:
            rec = self.journal.get(migration_id)
        except JournalError:
            raise MigrationRefused(f"no migration {migration_id}", bad_input=True) from None
        if rec.role != "source":
            raise MigrationRefused(
                f"{migration_id} was received here; resolve it on its source {rec.source}",
                bad_input=True,
            )
        if rec.outcome not in (None, rp.IN_DOUBT):
            raise MigrationRefused(f"{migration_id} already ended: {rec.outcome}", bad_input=True)
        if rec.outcome is None and rec.id in self.active.values():
            raise MigrationRefused(f"{migration_id} is still running", bad_input=True)
        peer = self.peers.get(rec.target)
        data = dict(rec.report or {})
        if keep == "target":
            if peer is not None:
                with contextlib.suppress(PeerError):
                    await peer.post_json(migration_path(rec.id, "commit"), {}, timeout=10)
            data["decision"] = rp.DECISION_COMMIT
            with contextlib.suppress(DockerNotFound):
                await asyncio.to_thread(self.adapter.remove, rec.container_id, True)
            await to_thread_to_the_end(
                self.journal.finish,
                rec.id,
                "succeeded",
                reason="resolved by an operator: kept the target's copy",
                report=data,
            )
            log.warning("migration.resolved", migration=rec.id, keep="target")
            return f"kept {rec.target}'s copy; the source copy and its checkpoint are removed"
        if keep != "source":
            raise MigrationRefused("keep must be 'source' or 'target'", bad_input=True)
        if await self.messages.send_abort(peer, rec.id, "an operator kept the source's copy"):
            raise MigrationRefused(
                f"{rec.target} reports the container running there: use --keep target"
            )
        data["decision"] = rp.DECISION_ROLLBACK
        await to_thread_to_the_end(self.journal.update_report, rec.id, data)
        how = await self._restore_record(
            dataclasses.replace(rec, report=data), "resolved by an operator: kept the source; "
        )
        log.warning("migration.resolved", migration=rec.id, keep="source", how=how)
        lost = (self.journal.get(rec.id).report or {}).get("state_lost")
        if lost:
            # Not a resolution to report as one: `ferry resolve` exits 1 with this sentence.
            raise MigrationFailed(str(lost), rolled_back=False, state_lost=str(lost))
        return how

    async def resolve_in_doubt(self, mid: str) -> None:
        """Keep asking the target until one side's state is proven (or an operator decides)."""
        backoff = Backoff(2.0, 30.0)
        while True:
            await asyncio.sleep(backoff.next())
            try:
                rec = self.journal.get(mid)
            except JournalError:
                return
            if rec.outcome != rp.IN_DOUBT:
                return
            try:
                outcome = await self._settle_commit(rec, patience=0)
            except Exception as exc:
                log.warning("migration.in_doubt_retry", migration=mid, error=str(exc))
                continue
            if outcome is not None:
                log.warning("migration.in_doubt_resolved", migration=mid, outcome=outcome)
                return

    async def _settle_commit(self, rec: MigrationRecord, patience: float) -> str | None:
        """For a journalled commit: finish it, or restore here if the target has nothing.

        Returns how it ended, or None while the target stays silent.
        """
        peer = self.peers.get(rec.target)
        answer = await self.messages.send_commit(peer, rec.id, patience)
        if answer is IN_DOUBT:
            return None
        data = dict(rec.report or {})
        if answer is None:
            # Proven: the target holds no copy and never will run one. Ours is the state.
            data["decision"] = rp.DECISION_ROLLBACK
            await to_thread_to_the_end(self.journal.update_report, rec.id, data)
            return await self._restore_record(
                rec, f"{rec.target} proved it holds no copy after the commit; "
            )
        info = await asyncio.to_thread(self.adapter.find_container, rec.container_id)
        if info is not None:
            with contextlib.suppress(DockerNotFound):
                await asyncio.to_thread(self.adapter.remove, rec.container_id, True)
        if (data.get("details") or {}).get("postcopy_port") is not None:
            with contextlib.suppress(DockerError, OSError):
                postcopy.cleanup_source(self.data_root.get(), rec.id)
        await to_thread_to_the_end(
            self.journal.finish,
            rec.id,
            "succeeded",
            reason="the target confirmed it runs the container",
            report=data,
        )
        return "target runs it; source copy removed"

    async def _restore_record(self, rec: MigrationRecord, why: str = "") -> str:
        """Roll a journalled migration back here; never starts the container fresh."""
        data = dict(rec.report or {})
        checkpoint = str(data.get("checkpoint") or f"ferry-{rec.id}")
        policy = dict(data.get("restart_policy") or {"Name": "no"})
        info = await asyncio.to_thread(self.adapter.find_container, rec.container_id)
        if info is None:
            await to_thread_to_the_end(
                self.journal.finish, rec.id, "failed", reason="container gone from the source"
            )
            return "container missing"
        port = (data.get("details") or {}).get("postcopy_port")
        if port is not None:
            # Post-copy keeps no images here: the paused container is the state.
            with contextlib.suppress(DockerError, OSError):
                postcopy.cleanup_source(self.data_root.get(), rec.id)
            try:
                how = await self.release_paused_source(rec.container_id, int(port))
                if (policy.get("Name") or "no") != "no":
                    await asyncio.to_thread(
                        self.adapter.update_restart_policy, rec.container_id, policy
                    )
            except StateNotRestored as exc:
                await to_thread_to_the_end(
                    self.journal.finish, rec.id, "failed", reason=f"state lost: {exc.message}"
                )
                return f"failed: {exc.message}"
            await to_thread_to_the_end(
                self.journal.finish, rec.id, "rolled_back", reason=f"{why}{how}", report=data
            )
            return f"rolled back: {how}"
        root = await asyncio.to_thread(self.data_root.get)
        settled = await asyncio.to_thread(
            wait_checkpoint_settled,
            self.adapter,
            root,
            rec.container_id,
            checkpoint,
            float(self.config.migration.checkpoint_timeout),
            in_progress=self.procs.dump_in_progress,
        )
        # A dump the killed agent left running kept its work dir; the dump is over now.
        shutil.rmtree(root.local_root / "tmp" / f"{WORK_PREFIX}{checkpoint}", ignore_errors=True)
        # Frozen in place by the runc checkpointer: restore_locally unpauses it.
        frozen = bool((info.get("State") or {}).get("Paused"))
        try:
            if settled == "running" and not frozen:
                how = "still running (the checkpoint never completed)"
                if (policy.get("Name") or "no") != "no":
                    await asyncio.to_thread(
                        self.adapter.update_restart_policy, rec.container_id, policy
                    )
            else:
                how = await asyncio.to_thread(
                    restore_locally,
                    self.adapter,
                    root,
                    rec.container_id,
                    checkpoint,
                    policy,
                    self.config.migration.restore_timeout,
                    self.ctrd,
                )
        except StateNotRestored as exc:
            data["state_lost"] = state_lost_sentence(rec.container_name, exc.message)
            await to_thread_to_the_end(
                self.journal.finish,
                rec.id,
                "failed",
                reason=f"state not restored: {exc.message}",
                report=data,
            )
            log.error("migration.state_lost", migration=rec.id, reason=exc.message)
            return f"failed: {data['state_lost']}"
        data["details"] = dict(data.get("details") or {}) | {"rollback": how}
        await to_thread_to_the_end(
            self.journal.finish, rec.id, "rolled_back", reason=f"{why}{how}", report=data
        )
        log.warning("migration.rolled_back", migration=rec.id, how=how)
        return f"rolled back: {how}"

    async def release_paused_source(self, container_id: str, port: int | None) -> str:
        """Make CRIU give up a page stream (if one runs) and let the paused source run on."""
        if port is not None and await asyncio.to_thread(self.procs.dump_in_progress, container_id):
            deadline = self.clock.monotonic() + 30
            while await asyncio.to_thread(self.procs.dump_in_progress, container_id):
                await asyncio.to_thread(postcopy.end_page_stream, port)
                if self.clock.monotonic() > deadline:
                    raise MigrationFailed("the page server would not stop", rolled_back=False)
                await asyncio.sleep(0.5)
        info = await asyncio.to_thread(self.adapter.inspect_container, container_id)
        state = info.get("State") or {}
        if state.get("Paused"):
            try:
                await asyncio.to_thread(self.adapter.unpause, container_id)
            except DockerError as exc:
                if "not paused" not in exc.message:
                    raise
                # CRIU thawed it behind Docker's back (Docker still says paused): freeze it
                # through runc so both agree, then let Docker thaw it.
                await asyncio.to_thread(
                    subprocess.run,
                    [*await self.runc_prefix(), "pause", container_id],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                await asyncio.to_thread(self.adapter.unpause, container_id)
        if not state.get("Running"):
            raise StateNotRestored("rollback", "the paused source is gone; its state is lost")
        return "resumed: the paused source runs on"

    async def runc_prefix(self) -> list[str]:
        """dockerd's runc, as the runc checkpointer runs it."""
        command = list(self.config.docker.runc_command)
        if not self.config.docker.runc_in_daemon_namespaces:
            return command
        pid = await asyncio.to_thread(self.adapter.daemon_pid)
        if pid is None:
            raise MigrationFailed("cannot tell dockerd's process to run runc in its namespaces")
        return in_daemon_namespaces(pid, command)
