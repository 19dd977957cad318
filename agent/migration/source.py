"""The source side: drive one migration from prepare to finish, or roll it back.

Before the freeze nothing on this host changes, so any failure there simply
refuses (`MigrationRefused`). From the freeze on, this agent is the only
authority on the outcome. The target restores its copy held stopped; this side
journals its decision (commit or roll back) before it acts on it or tells the
target. Until the commit is journalled, any failure rolls back here, which is
safe because the held copy never runs without the commit. Once it is
journalled, this side never resumes its copy on a guess: if the target cannot
confirm, the migration is "in doubt" (docs/commit-protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.archive import ArchiveError, GrowingFiles, Packer
from agent.backoff import Backoff
from agent.bridges import aiter_blocking, spawn_tracked, to_thread_to_the_end
from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError
from agent.journal import Journal, JournalError, MigrationRecord
from agent.migration import held, hooks, networks, postcopy
from agent.migration import report as rp
from agent.migration.checkpointers import (
    Checkpointer,
    make_checkpointer,
)
from agent.migration.disk_space import shortfall, source_need
from agent.migration.eligibility import Eligibility, EligibilityChecker, admission_body, refusal
from agent.migration.errors import MigrationError, MigrationFailed, MigrationRefused
from agent.migration.fresh_start import check_fresh_start, state_lost_sentence
from agent.migration.paths import DataRootResolver, PathOutsideDataRoot
from agent.migration.report import MigrationReport, ProgressEvent, ProgressFn
from agent.migration.rollback import (
    StateNotRestored,
    restore_locally,
    wait_checkpoint_settled,
)
from agent.migration.source_copy import SourceCopies
from agent.migration.source_messages import IN_DOUBT, PeerLike, PeerMessages
from agent.migration.source_recovery import Recovery
from agent.migration.source_run import Run, await_pages
from agent.migration.spec import (
    DEFAULT_NETWORKS,
    ContainerSpec,
    SpecError,
    container_name,
    source_problems,
    spec_from_inspect,
)
from agent.migration.target import RESERVATION_TTL, TargetHandlers
from agent.model import Clock, SystemClock, group_of_labels
from agent.peer import protocol
from agent.peer.api import MIGRATIONS_PATH, migration_path
from agent.peer.client import PeerError, PeerRefused, PeerUnavailable

log = structlog.get_logger(__name__)


def group_of(inspect: dict[str, Any]) -> str | None:
    """The group a container moves with (`ferry.group`, else its compose project)."""
    return group_of_labels((inspect.get("Config") or {}).get("Labels"))


def new_migration_id(clock: Clock) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock.time()))
    return f"{stamp}-{secrets.token_hex(3)}"


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class MigrationService:
    """Migrates containers from this host; see `migrate` and `reconcile`."""

    def __init__(
        self,
        adapter: DockerAdapter,
        config: FerryConfig,
        journal: Journal,
        peers: Mapping[str, PeerLike],
        draining: Callable[[], bool] = lambda: False,
        clock: Clock | None = None,
        processes: held.ProcessTable | None = None,
    ) -> None:
        self.adapter = adapter
        self.procs: held.ProcessTable = processes or held.HostProcesses()
        self.config = config
        self.journal = journal
        self.peers = peers
        self.draining = draining
        self.clock = clock or SystemClock()
        self.data_root = DataRootResolver(adapter.data_root, config.docker.data_root)
        # migration.checkpoint_via: Docker's checkpoint API, or dockerd's runc directly.
        self.checkpointer: Checkpointer = make_checkpointer(config, adapter, self.data_root.get)
        self.owns_adapter = False  # set by build_service when it made the adapter
        # Policy evacuations and `ferry migrate` share this host's limit; extra ones wait.
        self._slots = asyncio.Semaphore(config.limits.max_concurrent_migrations)
        self.active: dict[str, str] = {}  # container id -> migration id
        # Post-copy moves this side serves pages for: how far the target is.
        self._serving: dict[str, dict[str, Any]] = {}
        # Disk promised to checkpoints in flight here (container id -> bytes), so that
        # group members and concurrent migrations cannot each fit "just".
        self._disk_claims: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.eligibility = EligibilityChecker(
            adapter,
            config,
            peers,
            active=self.active.get,
            data_root_size=self._upper_bytes,
            describe_networks=self._network_specs,
        )
        self.handlers = TargetHandlers(
            adapter,
            config,
            journal,
            draining,
            self.clock,
            peer_status=self._peer_status,
            processes=self.procs,
        )
        self.messages = PeerMessages(self.clock, self._spawn, ABORT_RETRY_FOR)
        self.copies = SourceCopies(adapter, journal, self.clock, self._spawn)
        self.recovery = Recovery(
            adapter=adapter,
            config=config,
            journal=journal,
            peers=peers,
            data_root=self.data_root,
            procs=self.procs,
            ctrd=self.handlers.ctrd,
            messages=self.messages,
            active=self.active,
            clock=self.clock,
            spawn=self._spawn,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.handlers.close()
        for peer in self.peers.values():
            closer = getattr(peer, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        if self.owns_adapter:
            await asyncio.to_thread(self.adapter.close)

    def _every(self, run: Run, seconds: float) -> bool:
        """True at most once per `seconds` for this run: progress lines, not a flood."""
        now = self.clock.monotonic()
        if now - run.last_emit < seconds:
            return False
        run.last_emit = now
        return True

    def page_progress(self) -> dict[str, dict[str, Any]]:
        """Migrations moving memory pages now, either side: {id: container, how, bytes}."""
        return {**self._serving, **self.handlers.page_progress()}

    async def _peer_status(self, peer_name: str, mid: str) -> dict[str, Any] | None:
        peer = self.peers.get(peer_name)
        if peer is None:
            return None
        try:
            return await peer.get_json(migration_path(mid))
        except PeerError:
            return None

    async def reconcile(self) -> list[dict[str, Any]]:
        """Resolve every unfinished migration in the journal (call at agent start).

        Ones that cannot be resolved yet (a peer unreachable after a restore
        was requested) are retried in the background until they are.
        """
        with contextlib.suppress(Exception):  # best effort; never blocks the start
            await self.copies.sweep()
        results: list[dict[str, Any]] = []
        pending: list[MigrationRecord] = []
        for rec in self.journal.unfinished() + self.journal.in_doubt():
            try:
                outcome = await self._reconcile_one(rec)
            except Exception as exc:
                outcome = f"unresolved: {exc}"
                pending.append(rec)
            log.info("migration.reconciled", migration=rec.id, role=rec.role, outcome=outcome)
            results.append({"migration_id": rec.id, "role": rec.role, "outcome": outcome})
        if pending:
            self._spawn(self._retry_reconcile(pending))
        try:
            for mid in await self.handlers.reconcile_fills():
                results.append({"migration_id": mid, "role": "target", "outcome": "refilled"})
        except Exception as exc:  # never blocks the start; the images stay on disk
            log.error("migration.reconcile_fills_failed", error=str(exc))
        return results

    async def _reconcile_one(self, rec: MigrationRecord) -> str:
        if rec.role == "source":
            return await self.reconcile_record(rec)
        return await self.handlers.reconcile_record(rec)

    async def _retry_reconcile(self, pending: list[MigrationRecord]) -> None:
        backoff = Backoff(2.0, 60.0)
        while pending:
            await asyncio.sleep(backoff.next())
            still: list[MigrationRecord] = []
            for rec in pending:
                try:
                    outcome = await self._reconcile_one(rec)
                    log.info("migration.reconciled", migration=rec.id, outcome=outcome)
                except Exception as exc:
                    log.warning("migration.reconcile_pending", migration=rec.id, error=str(exc))
                    still.append(rec)
            pending = still

    def _spawn(self, coro: Any) -> None:
        spawn_tracked(self._tasks, coro)

    # ---------------------------------------------------------------- migrate

    async def check(self, container: str, target: str | None = None) -> Eligibility:
        """Could `container` move now (to `target`, or to any peer), and what would change."""
        return await self.eligibility.check(container, target)

    def _upper_bytes(self, spec: ContainerSpec) -> int:
        try:
            return _dir_size(self.data_root.get().local(spec.upper_dir or ""))
        except (PathOutsideDataRoot, DockerError, OSError):
            return 0

    async def migrate(
        self,
        container: str,
        target: str,
        progress: ProgressFn | None = None,
        postcopy: bool = False,
    ) -> MigrationReport:
        """Move `container` to peer `target`. Raises MigrationRefused / MigrationFailed.

        `postcopy`: an operator asks for post-copy; refused with the reason when
        this host cannot do it (stop-and-copy stays available).
        """
        if self._slots.locked() and progress is not None:
            progress(ProgressEvent("", rp.PREPARE, "waiting for a free migration slot"))
        async with self._slots:
            return await self._migrate(container, target, progress, postcopy)

    def _wants_postcopy(self, inspect: dict[str, Any], asked: bool) -> bool:
        mode = self.config.migration.postcopy
        labelled = ((inspect.get("Config") or {}).get("Labels") or {}).get("ferry.postcopy")
        wanted = asked or mode == "always" or (mode == "opt_in" and labelled == "true")
        if not wanted:
            return False
        if mode == "off":
            raise MigrationRefused(
                "post-copy is off on this host (migration.postcopy: off)", bad_input=asked
            )
        why = postcopy.preflight()
        if why is None:
            return True
        if asked:
            raise MigrationRefused(why)
        # Asked for by a label or `always`: move it the safe way, and say why.
        log.warning("migration.postcopy_unavailable", reason=why)
        return False

    async def _migrate(
        self, container: str, target: str, progress: ProgressFn | None, asked_postcopy: bool
    ) -> MigrationReport:
        peer = self.peers.get(target)
        if peer is None:
            known = ", ".join(sorted(self.peers)) or "none configured"
            raise MigrationRefused(f"unknown peer {target!r} (peers: {known})", bad_input=True)
        inspect = await self.eligibility.inspect(container)
        group = group_of(inspect)
        if group is not None:
            return await self._migrate_group(group, peer, progress)
        # The same check as `ferry check`: every reason, source's and target's, before any freeze.
        verdict = await self.eligibility.check(container, target, inspect=inspect)
        if not verdict.movable:
            raise refusal(verdict)
        spec = self._check_source(inspect)
        wants_postcopy = self._wants_postcopy(inspect, asked_postcopy)
        run = await self._start_run(spec, peer)
        run.postcopy = wants_postcopy
        emit = self._emitter(run, progress)
        try:
            return await self._run(run, inspect, emit)
        except MigrationError as exc:
            exc.report = run.report
            raise
        finally:
            self.active.pop(spec.id, None)

    def _check_source(self, inspect: dict[str, Any]) -> ContainerSpec:
        try:
            spec = spec_from_inspect(inspect)
        except SpecError as exc:
            raise MigrationRefused(str(exc)) from exc
        # The target restores with options matching these (checkpointers.restore_options_for).
        spec.dump_options = list(self.checkpointer.options)
        if spec.id in self.active:
            # Alone: mid-migration the container is frozen, so the other checks would
            # also say "paused", which is only a symptom of this.
            raise MigrationRefused(
                f"{spec.name} is already being migrated ({self.active[spec.id]})"
            )
        problems = source_problems(inspect, spec, self.config.migration.copy_named_volumes)
        if problems:
            raise MigrationRefused("; ".join(problems))
        return spec

    async def _start_run(
        self, spec: ContainerSpec, peer: PeerLike, group: str | None = None
    ) -> Run:
        mid = new_migration_id(self.clock)
        report = MigrationReport(mid, spec.name, self.config.name, peer.name)
        if group is not None:
            report.details["group"] = group
        run = Run(mid, spec, peer, report, self.clock)
        # Claimed before the journal write yields the loop: a second request for the
        # same container meanwhile is refused by _check_source, not run twice.
        self.active[spec.id] = mid
        try:
            # A synced SQLite write: off the loop, and never cut short by a cancellation.
            await to_thread_to_the_end(
                self.journal.begin,
                mid,
                container_id=spec.id,
                container_name=spec.name,
                source=self.config.name,
                target=peer.name,
                role="source",
                phase=rp.PREPARE,
                report=self._journal_data(run),
            )
        except BaseException:
            self.active.pop(spec.id, None)
            raise
        log.info(
            "migration.started", migration=mid, container=spec.name, target=peer.name, group=group
        )
        return run

    # ---------------------------------------------------------------- groups

    async def _migrate_group(
        self, group: str, peer: PeerLike, progress: ProgressFn | None
    ) -> MigrationReport:
        """Move every running member of a group to one target, in one freeze window.

        All are frozen, all transferred, all restored held; then one journalled
        decision covers all of them: all run on the target, or all roll back here.
        """
        listed = await asyncio.to_thread(self.adapter.list_containers)
        member_ids = [
            str(c["Id"])
            for c in listed
            if c.get("State") == "running"
            and group_of({"Config": {"Labels": c.get("Labels")}}) == group
        ]
        inspects = [
            await asyncio.to_thread(self.adapter.inspect_container, cid) for cid in member_ids
        ]
        inspects.sort(key=container_name)
        problems: list[str] = []
        specs: list[tuple[ContainerSpec, dict[str, Any]]] = []
        verdicts: list[Eligibility] = []
        for inspect in inspects:
            # Each member through the same check as a single container, target's answer too.
            name = container_name(inspect)
            verdict = await self.eligibility.check(name, peer.name, inspect=inspect)
            verdicts.append(verdict)
            if not verdict.movable:
                problems.append(f"{name}: {verdict.summary()}")
                continue
            try:
                specs.append((self._check_source(inspect), inspect))
            except MigrationRefused as exc:
                problems.append(f"{name}: {exc.reason}")
        if problems or not specs:
            refused = MigrationRefused(
                f"group {group} cannot move as a unit: " + ("; ".join(problems) or "no members")
            )
            blocked = [v for v in verdicts if not v.movable]
            if blocked and all(v.permanent for v in blocked):
                # Lasting, like a single container's: drain does not retry the group for it.
                refused.eligibility = blocked[0]
            raise refused
        runs: list[Run] = []
        try:
            for spec, _ in specs:
                runs.append(await self._start_run(spec, peer, group))
        except BaseException:
            for r in runs:  # nothing frozen yet: the members begun so far are let go
                self.active.pop(r.spec.id, None)
            raise
        members = [r.spec.name for r in runs]
        for r in runs:
            r.report.details["members"] = members
            r.group_id = runs[0].mid
        emits = {r.mid: self._emitter(r, progress) for r in runs}
        log.info("migration.group_started", group=group, members=members, target=peer.name)
        try:
            return await self._run_group(group, runs, [i for _, i in specs], emits)
        finally:
            for r in runs:
                self.active.pop(r.spec.id, None)

    async def _run_group(
        self,
        group: str,
        runs: list[Run],
        inspects: list[dict[str, Any]],
        emits: dict[str, Callable[..., None]],
    ) -> MigrationReport:
        lead = runs[0]
        try:
            for r, inspect in zip(runs, inspects, strict=True):
                await self._before_freeze(r, inspect, emits[r.mid])
        except BaseException as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            for r in runs:
                await asyncio.shield(self._abort_target(r, str(reason)))
                await self._end(r, "refused", f"group {group}: {reason}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            refused = MigrationRefused(f"group {group}: {reason}")
            refused.report = lead.report
            raise refused from exc
        try:
            for r in runs:
                await self._freeze(r, emits[r.mid])
            for r in runs:
                await self._transfer(r, emits[r.mid])
            for r in runs:
                await self._restore_held(r, emits[r.mid])
        except BaseException as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.CancelledError):
                reason = "migration cancelled"
            why = f"group {group}: {reason}"
            for r, before in zip(runs, inspects, strict=True):
                with contextlib.suppress(MigrationFailed):
                    await asyncio.shield(self._roll_back(r, why, emits[r.mid], before=before))
            if isinstance(exc, asyncio.CancelledError):
                raise
            failed = MigrationFailed(
                why, rolled_back=all(r.report.outcome == "rolled_back" for r in runs)
            )
            failed.report = self._group_report(group, runs)
            raise failed from exc
        # One decision for every member, in one journal transaction.
        for r in runs:
            r.decision = rp.DECISION_COMMIT
        await to_thread_to_the_end(
            self.journal.decide, {r.mid: self._journal_data(r) for r in runs}, rp.COMMIT
        )
        in_doubt: list[str] = []
        for r in runs:
            emits[r.mid](rp.COMMIT, f"committing: {r.peer.name} runs it")
            try:
                await self._commit(r, emits[r.mid])
                await self._finish(r, emits[r.mid])
            except MigrationFailed as exc:
                in_doubt.append(f"{r.spec.name}: {exc.reason}")
                if not exc.in_doubt:
                    await self._mark_in_doubt(r, exc.reason)
        report = self._group_report(group, runs)
        if in_doubt:
            failed = MigrationFailed(f"group {group}: " + "; ".join(in_doubt), in_doubt=True)
            failed.report = report
            raise failed
        log.info("migration.group_succeeded", group=group, downtime_s=report.downtime_s)
        return report

    def _group_report(self, group: str, runs: list[Run]) -> MigrationReport:
        """The lead member's report, with the whole group's outcome in details."""
        lead = runs[0].report
        outcomes = {r.spec.name: r.report.outcome for r in runs}
        lead.details["group"] = group
        lead.details["member_reports"] = [r.report.to_dict() for r in runs[1:]]
        lead.details["member_outcomes"] = outcomes
        frozen = [r.frozen_at for r in runs if r.frozen_at is not None]
        if frozen and all(r.report.outcome == "succeeded" for r in runs):
            # From the first freeze until the last member runs on the target.
            lead.downtime_s = max(
                (r.frozen_at or 0) + (r.report.downtime_s or 0) for r in runs
            ) - min(frozen)
            lead.downtime_s = round(lead.downtime_s, 4)
        return lead

    def _emitter(self, run: Run, progress: ProgressFn | None) -> Callable[..., None]:
        def emit(phase: str, message: str = "", done: int = 0, total: int | None = None) -> None:
            if progress is None:
                return
            try:
                progress(
                    ProgressEvent(
                        run.mid, phase, message, done, total, round(run.timer.elapsed(), 3)
                    )
                )
            except Exception:  # a progress consumer's bug must not break a migration
                log.exception("migration.progress_callback_failed")

        return emit

    @staticmethod
    def _journal_data(run: Run) -> dict[str, Any]:
        data = run.report.to_dict()
        data["checkpoint"] = run.checkpoint
        data["restart_policy"] = run.spec.restart_policy
        data["staged"] = run.staged
        data["restore_sent"] = run.restore_sent
        data["decision"] = run.decision
        return data

    async def _save(self, run: Run) -> None:
        with contextlib.suppress(JournalError):
            await to_thread_to_the_end(self.journal.update_report, run.mid, self._journal_data(run))

    async def _phase(
        self, run: Run, phase: str, emit: Callable[..., None], message: str = ""
    ) -> None:
        # One commit: the phase and the report so far, off the loop, durable before it starts.
        await to_thread_to_the_end(self.journal.set_phase, run.mid, phase, self._journal_data(run))
        log.info("migration.phase", migration=run.mid, phase=phase, container=run.spec.name)
        emit(phase, message)

    async def _run(
        self, run: Run, inspect: dict[str, Any], emit: Callable[..., None]
    ) -> MigrationReport:
        try:
            await self._before_freeze(run, inspect, emit)
        except MigrationRefused as exc:
            await self._abort_target(run, exc.reason)
            await self._end(run, "refused", exc.reason)
            log.info("migration.refused", migration=run.mid, reason=exc.reason)
            raise
        except asyncio.CancelledError:
            # Nothing here was touched yet; only the target may hold a staged copy.
            await asyncio.shield(self._abort_target(run, "migration cancelled"))
            await self._end(run, "refused", "migration cancelled before the freeze")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            await self._abort_target(run, reason)
            await self._end(run, "refused", reason)
            log.exception("migration.refused", migration=run.mid, reason=reason)
            raise MigrationRefused(reason) from exc

        try:
            await self._freeze_and_move(run, emit)
        except BaseException as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.CancelledError):
                reason = "migration cancelled"
            if run.decision == rp.DECISION_COMMIT:
                # Committed: never roll back. A stopping agent leaves the journal to
                # reconcile; anything else leaves the migration in doubt.
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if isinstance(exc, MigrationFailed) and exc.in_doubt:
                    raise
                await self._mark_in_doubt(run, str(reason))
                raise MigrationFailed(str(reason), in_doubt=True) from exc
            await asyncio.shield(self._roll_back(run, str(reason), emit, before=inspect))
            if isinstance(exc, asyncio.CancelledError):
                raise
            if run.report.outcome == "succeeded":
                return run.report  # the target had it running after all
            if isinstance(exc, MigrationFailed):
                exc.rolled_back = run.report.outcome == "rolled_back"
                raise
            raise MigrationFailed(
                str(reason), rolled_back=run.report.outcome == "rolled_back"
            ) from exc
        return run.report

    # ------------------------------------------------------------ before freeze

    async def _before_freeze(
        self, run: Run, inspect: dict[str, Any], emit: Callable[..., None]
    ) -> None:
        spec, peer = run.spec, run.peer
        emit(rp.PREPARE, f"asking {peer.name}")
        with run.timer.phase(rp.PREPARE):
            root = await asyncio.to_thread(self.data_root.get)
            try:
                upper = root.local(spec.upper_dir or "")
            except PathOutsideDataRoot as exc:
                raise MigrationRefused(f"writable layer not reachable: {exc}") from exc
            if not upper.is_dir():
                raise MigrationRefused(
                    f"writable layer {upper} is not visible to the agent (check docker.data_root)"
                )
            memory = await asyncio.to_thread(self.adapter.memory_usage, spec.id)
            # Refused here, not mid-dump: a dump that runs out of disk loses the state.
            self._disk_claims = {c: n for c, n in self._disk_claims.items() if c in self.active}
            others = sum(n for c, n in self._disk_claims.items() if c != spec.id)
            need = source_need(memory) + others
            what = "the checkpoint" + (" and the others in flight" if others else "")
            short = await asyncio.to_thread(
                shortfall, self.config.name, root.local_root, need, what
            )
            if short:
                raise MigrationRefused(short)
            self._disk_claims[spec.id] = source_need(memory)
            upper_bytes = await asyncio.to_thread(_dir_size, upper)
            # Volumes travel in the state too; the target caps the stream at this estimate.
            for vol in spec.volumes:
                upper_bytes += await asyncio.to_thread(_dir_size, root.local(vol.daemon_path))
            image = await asyncio.to_thread(self.adapter.inspect_image, spec.image_id)
            image_bytes = int(image.get("Size") or 0)
            body = admission_body(spec, memory, image_bytes, memory + upper_bytes, run.mid)
            body["network_specs"] = await asyncio.to_thread(self._network_specs, spec)
            body["group_id"] = run.group_id
            answer = await self._call(peer.post_json(MIGRATIONS_PATH, body))
            run.staged = True  # from here the target may hold something to clean up
            too_old = protocol.refusal(peer.name, self.config.name, answer)
            if too_old:
                raise MigrationRefused(too_old)
        if not answer.get("has_image"):
            mig = self.config.migration
            if not mig.allow_image_shipping:
                raise MigrationRefused(
                    f"{peer.name} lacks image {spec.image_ref or spec.image_id} and "
                    "migration.allow_image_shipping is off"
                )
            if image_bytes > int(mig.max_image_bytes):
                raise MigrationRefused(
                    f"image {spec.image_ref} is {image_bytes} bytes, over "
                    f"migration.max_image_bytes ({int(mig.max_image_bytes)})"
                )
            await self._phase(run, rp.PRESTAGE, emit, "shipping image")
            with run.timer.phase("image"):
                await self._ship_image(run, image, image_bytes, emit)
        else:
            await self._phase(run, rp.PRESTAGE, emit, "creating the target container")
        with run.timer.phase(rp.PRESTAGE):
            staged = await self._call(
                peer.post_json(migration_path(run.mid, "stage"), {"spec": spec.to_dict()})
            )
        run.report.target_container_id = str(staged.get("container_id"))
        await self._save(run)

    def _network_specs(self, spec: ContainerSpec) -> list[dict[str, Any]]:
        out = []
        for name in spec.networks:
            if name not in DEFAULT_NETWORKS:
                out.append(networks.describe(self.adapter.inspect_network(name)))
        return out

    async def _ship_image(
        self, run: Run, image: dict[str, Any], size: int, emit: Callable[..., None]
    ) -> None:
        spec = run.spec
        tags = [t for t in image.get("RepoTags") or [] if t and t != "<none>:<none>"]
        # Saving by tag keeps the tag on the target; the ID is kept either way.
        names = [spec.image_ref] if spec.image_ref in tags else (tags[:1] or [spec.image_id])
        stream = await asyncio.to_thread(self.adapter.image_save, names)
        limit = int(self.config.migration.max_image_bytes)

        async def chunks() -> Any:
            sent = 0
            async for chunk in aiter_blocking(stream, stream.close):
                sent += len(chunk)
                if sent > limit:
                    raise MigrationRefused(
                        f"image stream exceeds migration.max_image_bytes ({limit})"
                    )
                run.report.bytes_image = sent
                emit("image", "shipping image", sent, size)
                yield chunk

        meta = {"image": spec.image_ref, "image_id": spec.image_id, "names": names}
        await self._call(run.peer.upload_image(run.mid, chunks(), meta))
        run.report.image_shipped = True
        log.info("migration.image_shipped", migration=run.mid, bytes=run.report.bytes_image)

    async def _call(self, coro: Any) -> dict[str, Any]:
        """A peer call before the freeze: any failure refuses the migration."""
        try:
            result: dict[str, Any] = await coro
            return result
        except PeerRefused as exc:
            raise MigrationRefused(f"{exc.peer} refused: {exc.reason}") from exc
        except PeerError as exc:
            raise MigrationRefused(str(exc)) from exc

    # ------------------------------------------------------------ freeze and move

    async def _freeze_and_move(self, run: Run, emit: Callable[..., None]) -> None:
        if run.postcopy:
            await self._postcopy(run, emit)
            return
        if self.checkpointer.via == "runc" and self.config.migration.stream_during_dump:
            await self._freeze_streaming(run, emit)
        else:
            await self._freeze(run, emit)
            await self._transfer(run, emit)
        await self._restore_held(run, emit)
        # The decision is durable before anyone acts on it; from here there is no rollback.
        run.decision = rp.DECISION_COMMIT
        await to_thread_to_the_end(
            self.journal.decide, {run.mid: self._journal_data(run)}, rp.COMMIT
        )
        log.info("migration.phase", migration=run.mid, phase=rp.COMMIT, container=run.spec.name)
        emit(rp.COMMIT, f"committing: {run.peer.name} runs it")
        await self._commit(run, emit)
        await self._finish(run, emit)

    async def _freeze(
        self,
        run: Run,
        emit: Callable[..., None],
        dumped: Callable[[], None] | None = None,
    ) -> None:
        spec = run.spec
        await self._phase(run, rp.FREEZE, emit, "checkpointing")
        run.frozen_at = self.clock.monotonic()
        with run.timer.phase(rp.FREEZE):
            if (spec.restart_policy.get("Name") or "no") != "no":
                await asyncio.to_thread(self.adapter.update_restart_policy, spec.id, {"Name": "no"})
            run.report.details["checkpoint_via"] = self.checkpointer.via
            await asyncio.to_thread(self.checkpointer.checkpoint, spec.id, run.checkpoint)
            run.frozen_ok = True
        if dumped is not None:
            dumped()
        await hooks.gate(
            Path(self.config.state_dir), hooks.AFTER_FREEZE, self.clock, {"migration": run.mid}
        )

    async def _state_sections(self, run: Run) -> dict[str, Path]:
        spec = run.spec
        root = await asyncio.to_thread(self.data_root.get)
        sections = {
            "checkpoint": root.checkpoint_dir(spec.id, run.checkpoint),
            "upper": root.local(spec.upper_dir or ""),
        }
        for i, vol in enumerate(spec.volumes):
            sections[f"vol{i}"] = root.local(vol.daemon_path)
        return sections

    def _progress(
        self, run: Run, emit: Callable[..., None], sections: Mapping[str, Path]
    ) -> Callable[[int, int], None]:
        estimate = [sum(_dir_size(p) for p in sections.values())]

        def on_progress(raw: int, compressed: int) -> None:
            run.report.bytes_state_raw = raw
            run.report.bytes_state = compressed
            if raw > estimate[0]:  # the dump was still growing when it was sized
                estimate[0] = sum(_dir_size(p) for p in sections.values())
            if self._every(run, 0.1):
                emit(rp.TRANSFER, "streaming state", raw, estimate[0])

        return on_progress

    async def _transfer(self, run: Run, emit: Callable[..., None]) -> None:
        await self._phase(run, rp.TRANSFER, emit, "streaming state")
        sections = await self._state_sections(run)
        with run.timer.phase(rp.TRANSFER):
            packer = Packer(sections, progress=self._progress(run, emit, sections))
            await self._uploaded(run, self._upload_guarded(run, packer.aiter()))
        run.report.details["digest"] = packer.digest

    async def _uploaded(self, run: Run, upload: Awaitable[None]) -> None:
        try:
            await upload
        except PeerRefused as exc:
            raise MigrationFailed(f"{run.peer.name} refused the state: {exc.reason}") from exc
        except PeerError as exc:
            raise MigrationFailed(f"state transfer broke: {exc}") from exc
        except ArchiveError as exc:
            raise MigrationFailed(f"cannot pack the state: {exc}") from exc

    async def _freeze_streaming(self, run: Run, emit: Callable[..., None]) -> None:
        """The dump and the transfer at once: CRIU's page images go out as it writes them.

        The upload starts with the freeze; the packer sends each pages-N.img's
        written prefix in whole parts while runc still dumps, and the rest (every
        other image, the writable layer, the files' tails) once it has returned.
        A failed dump abandons the upload; the target drops what it got.
        """
        sections = await self._state_sections(run)
        growing = GrowingFiles("checkpoint", sections["checkpoint"])
        packer = Packer(sections, progress=self._progress(run, emit, sections), growing=growing)
        upload = asyncio.ensure_future(
            self._upload_guarded(run, packer.aiter(), waiting=lambda: growing.running)
        )
        try:
            await self._freeze(run, emit, dumped=growing.finish)
        except BaseException:
            growing.abandon("the checkpoint did not complete")
            upload.cancel()
            with contextlib.suppress(BaseException):
                await upload
            raise
        # Read at the dump's end: what went out while it ran (the rest follows now).
        run.report.details["streamed_during_dump_bytes"] = sum(growing.sent.values())
        await self._phase(run, rp.TRANSFER, emit, "streaming state")
        with run.timer.phase(rp.TRANSFER):
            await self._uploaded(run, upload)
        run.report.details["digest"] = packer.digest

    async def _restore_held(self, run: Run, emit: Callable[..., None]) -> None:
        peer = run.peer
        digest = run.report.details["digest"]
        run.restore_sent = True
        await self._phase(run, rp.RESTORE, emit, f"restoring on {peer.name}")
        with run.timer.phase(rp.RESTORE):
            # Whatever the target did, its copy is held stopped: giving up on a silent
            # target, and rolling back, is safe.
            answer = await self._ask_restore(
                run, {"digest": digest, "checkpoint": run.checkpoint}, watched=True
            )
            if not answer.get("held"):
                raise MigrationFailed(f"{peer.name} did not report its copy held stopped")
        run.report.details["target_timings"] = answer.get("timings", {})
        run.held_at = self.clock.monotonic() - float(
            (answer.get("timings") or {}).get("pages_in_s", 0.0)
        )
        await hooks.gate(
            Path(self.config.state_dir), hooks.BEFORE_DECISION, self.clock, {"migration": run.mid}
        )

    async def _ask_restore(
        self, run: Run, body: dict[str, Any], *, watched: bool
    ) -> dict[str, Any]:
        """The restore call; `watched`: given up once the target answers nothing at all."""
        peer = run.peer
        call = peer.post_json(
            migration_path(run.mid, "restore"),
            body,
            timeout=self.config.migration.restore_timeout + 15,
        )
        try:
            answer: dict[str, Any] = await (
                self._while_target_answers(run, call) if watched else call
            )
        except PeerRefused as exc:
            raise MigrationFailed(f"{peer.name} could not restore: {exc.reason}") from exc
        except PeerUnavailable as exc:
            raise MigrationFailed(f"the restore call to {peer.name} broke: {exc}") from exc
        return answer

    async def _while_target_answers(self, run: Run, call: Awaitable[Any]) -> Any:
        """Await a long peer call (the restore) while the target still answers at all.

        A restore may rightly take minutes (restore_timeout), but a cut link must not
        hold the container frozen that long: the target is asked how the migration
        stands every few seconds, and after migration.stall_timeout without any answer
        the call is given up (PeerUnavailable). Its copy is held stopped until a
        commit, so giving up and rolling back is safe.
        """
        stall = float(self.config.migration.stall_timeout)
        task = asyncio.ensure_future(call)
        last_answer = self.clock.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(2.0, stall / 4))
                if done:
                    return task.result()
                try:
                    await run.peer.get_json(migration_path(run.mid), timeout=min(5.0, stall))
                    last_answer = self.clock.monotonic()
                except PeerRefused:
                    last_answer = self.clock.monotonic()  # it answered, just not yes
                except PeerError:
                    if self.clock.monotonic() - last_answer > stall:
                        raise PeerUnavailable(
                            run.peer.name,
                            f"no answer from {run.peer.name} for {stall:.0f}s during the "
                            "call (migration.stall_timeout)",
                        ) from None
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _commit(self, run: Run, emit: Callable[..., None]) -> None:
        """Tell the target to run its copy; the commit is already journalled."""
        assert run.decision == rp.DECISION_COMMIT and run.frozen_at is not None
        peer, mig = run.peer, self.config.migration
        await hooks.gate(
            Path(self.config.state_dir), hooks.AFTER_DECISION, self.clock, {"migration": run.mid}
        )
        with run.timer.phase(rp.COMMIT):
            committed = await self.messages.send_commit(
                run.peer, run.mid, float(mig.commit_timeout)
            )
        if committed is None:
            raise MigrationFailed(
                f"{peer.name} held no copy to commit",
            )
        if committed is IN_DOUBT:
            why = (
                f"committed, but {peer.name} did not confirm within "
                f"{float(mig.commit_timeout):.0f}s; nothing runs here, state kept"
            )
            await self._mark_in_doubt(run, why)
            raise MigrationFailed(why, in_doubt=True)
        if run.report.downtime_s is None:
            run.report.downtime_s = round(self.clock.monotonic() - run.frozen_at, 4)
        run.filling = bool(committed.get("filling"))
        if committed.get("state_lost"):
            # It runs there, but Docker restarted it from scratch after the restore.
            run.report.state_lost = state_lost_sentence(
                run.spec.name, f"on {peer.name}: {committed['state_lost']}"
            )
            log.error("migration.state_lost", migration=run.mid, reason=run.report.state_lost)
        emit(rp.COMMIT, f"running on {peer.name}")

    async def _finish(self, run: Run, emit: Callable[..., None]) -> None:
        spec, peer = run.spec, run.peer
        await self._phase(run, rp.FINISH, emit, "cleaning up the source")
        with run.timer.phase(rp.FINISH):
            run.report.details["source_copy"] = await self._dispose_source(run)
        if run.filling:
            await self._await_fill(run, emit)
        elif "all_pages_in_s" not in run.report.details and run.report.downtime_s is not None:
            run.report.details["all_pages_in_s"] = run.report.downtime_s
        run.timer.finish()
        await self._end(run, "succeeded", None)
        log.info(
            "migration.succeeded",
            migration=run.mid,
            container=spec.name,
            target=peer.name,
            downtime_s=run.report.downtime_s,
            bytes=run.report.bytes_moved,
        )
        emit("done", "succeeded")

    async def _await_fill(self, run: Run, emit: Callable[..., None]) -> None:
        """For the report: the target runs already and fills its pages in from its own disk.

        Nothing here depends on it (the target retries a failed fill itself); a target
        that does not say is reported as such, not waited on for ever.
        """
        assert run.frozen_at is not None
        emit(rp.FINISH, f"running on {run.peer.name}; its pages filling in from its disk")
        deadline = self.clock.monotonic() + float(self.config.migration.restore_timeout)
        while self.clock.monotonic() < deadline:
            status = await self._peer_status(run.peer.name, run.mid)
            fill = (status or {}).get("fill")
            if status is not None and not isinstance(fill, dict):
                break  # the target no longer knows (it restarted): it refills on its own
            if isinstance(fill, dict) and fill.get("pending") and self._every(run, 0.5):
                emit(
                    rp.FINISH,
                    f"running on {run.peer.name}; filling pages in from its disk",
                    int(fill.get("bytes_done") or 0),
                    int(fill.get("bytes_total") or 0) or None,
                )
            if isinstance(fill, dict) and fill.get("failed"):
                run.report.details["fill"] = f"failed on {run.peer.name}: {fill['failed']}"
                return
            if isinstance(fill, dict) and not fill.get("pending", True):
                # The target's own clock: from its copy held to its last page in.
                took = float(fill.get("pages_in_s") or 0.0)
                held = (run.held_at or run.frozen_at) - run.frozen_at
                run.report.details["all_pages_in_s"] = round(
                    max(run.report.downtime_s or 0.0, held + took), 4
                )
                return
            await asyncio.sleep(0.05)
        run.report.details["fill"] = f"{run.peer.name} did not report every page in"

    # ------------------------------------------------------------ post-copy

    async def _postcopy(self, run: Run, emit: Callable[..., None]) -> None:
        """Freeze all but memory, restore at once on the target, serve pages behind it.

        The source stays paused (not killed) until the target has every page and
        the commit is journalled: until then it is the only complete copy, and a
        failure kills the target copy and lets this one run on.
        """
        spec, peer, mig = run.spec, run.peer, self.config.migration
        await self._phase(run, rp.FREEZE, emit, "dumping all but memory")
        run.frozen_at = self.clock.monotonic()
        with run.timer.phase(rp.FREEZE):
            if (spec.restart_policy.get("Name") or "no") != "no":
                await asyncio.to_thread(self.adapter.update_restart_policy, spec.id, {"Name": "no"})
            root = await asyncio.to_thread(self.data_root.get)
            tls = postcopy.TlsFiles(root)
            t = self.config.tls
            assert t.ca and t.cert and t.key
            await asyncio.to_thread(tls.install, t.ca, t.cert, t.key)
            port = await asyncio.to_thread(postcopy.free_port, "0.0.0.0", mig.postcopy_port)
            # Paused first: CRIU gives a frozen cgroup back frozen, so the source
            # survives whatever happens to the page stream (--leave-running).
            await asyncio.to_thread(self.adapter.pause, spec.id)
            dump = postcopy.PageServerDump(
                root,
                await self.recovery.runc_prefix(),
                spec.id,
                run.checkpoint,
                run.mid,
                port,
                tls,
            )
            run.pagedump = dump
            run.report.details["postcopy_port"] = port
            await self._save(run)
            try:
                await asyncio.to_thread(dump.start, float(mig.checkpoint_timeout))
            except postcopy.PostcopyError as exc:
                raise MigrationFailed(f"post-copy dump failed: {exc}") from exc
            run.frozen_ok = True
        await hooks.gate(
            Path(self.config.state_dir), hooks.AFTER_FREEZE, self.clock, {"migration": run.mid}
        )
        await self._transfer(run, emit)
        run.restore_sent = True
        await self._phase(run, rp.RESTORE, emit, f"restoring on {peer.name}, pages to follow")
        with run.timer.phase(rp.RESTORE):
            body = {
                "digest": run.report.details["digest"],
                "checkpoint": run.checkpoint,
                "postcopy": {"port": port},
            }
            # Not given up while it runs: the target's copy runs, and it stops on its own
            # when the page stream does.
            answer = await self._ask_restore(run, body, watched=False)
            if not answer.get("postcopy"):
                raise MigrationFailed(f"{peer.name} did not start a post-copy restore")
        run.report.downtime_s = round(self.clock.monotonic() - run.frozen_at, 4)
        run.report.details["target_timings"] = answer.get("timings", {})
        run.decision = rp.DECISION_POSTCOPY
        await self._phase(run, rp.POSTCOPY, emit, f"running on {peer.name}; pulling pages")
        with run.timer.phase(rp.POSTCOPY):
            try:
                await await_pages(
                    run,
                    dump,
                    emit,
                    stall=float(mig.postcopy_stall_timeout),
                    clock=self.clock,
                    serving=self._serving,
                    mark_in_doubt=self._mark_in_doubt,
                )
            finally:
                self._serving.pop(run.mid, None)
        run.report.details["all_pages_in_s"] = round(self.clock.monotonic() - run.frozen_at, 4)
        run.decision = rp.DECISION_COMMIT
        await to_thread_to_the_end(
            self.journal.decide, {run.mid: self._journal_data(run)}, rp.COMMIT
        )
        await self._commit(run, emit)
        dump.cleanup()
        await self._finish(run, emit)

    async def _upload_guarded(
        self, run: Run, chunks: Any, waiting: Callable[[], bool] = lambda: False
    ) -> None:
        """Send the state; give up when nothing moves for migration.stall_timeout.

        The producer is pulled only as fast as the socket drains, so a chunk
        taken is progress on the wire. Without this a cut link would hold the
        container frozen until TCP gives up (about 15 minutes).
        """
        stall = float(self.config.migration.stall_timeout)
        last = [self.clock.monotonic()]
        gated = [False]
        state_dir = Path(self.config.state_dir)

        async def tracked() -> Any:
            sent = 0
            hooked = False
            async for chunk in chunks:
                yield chunk
                sent += len(chunk)
                last[0] = self.clock.monotonic()
                if not hooked and sent >= hooks.MID_TRANSFER_BYTES:
                    hooked = True
                    gated[0] = True
                    try:
                        await hooks.gate(
                            state_dir, hooks.MID_TRANSFER, self.clock, {"migration": run.mid}
                        )
                    finally:
                        gated[0] = False
                        last[0] = self.clock.monotonic()

        task = asyncio.ensure_future(run.peer.upload_state(run.mid, tracked()))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, stall / 4))
                if done:
                    task.result()
                    return
                if waiting():
                    # The dump runs (bounded by checkpoint_timeout); no bytes yet is normal.
                    last[0] = self.clock.monotonic()
                if not gated[0] and self.clock.monotonic() - last[0] > stall:
                    raise MigrationFailed(
                        f"state transfer to {run.peer.name} stalled: no progress for "
                        f"{stall:.0f}s (migration.stall_timeout)"
                    )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _mark_in_doubt(self, run: Run, reason: str) -> None:
        log.error(
            "migration.in_doubt",
            migration=run.mid,
            container=run.spec.name,
            target=run.peer.name,
            reason=reason,
        )
        run.timer.finish()
        await self._end(run, rp.IN_DOUBT, reason)
        self._spawn(self.recovery.resolve_in_doubt(run.mid))

    async def _dispose_source(self, run: Run) -> str:
        how, kept_until = await self.copies.dispose(
            run.spec.id,
            run.spec.name,
            run.mid,
            float(self.config.migration.keep_source_copy_for),
            self.checkpointer.frozen_in_place,
        )
        if kept_until is not None:
            run.report.details["kept_until"] = kept_until
        return how

    # ------------------------------------------------------------ rollback

    async def _roll_back(
        self,
        run: Run,
        reason: str,
        emit: Callable[..., None],
        before: dict[str, Any] | None = None,
    ) -> None:
        log.warning("migration.rolling_back", migration=run.mid, reason=reason)
        # Journalled before the target hears it: a held copy asks for exactly this.
        run.decision = rp.DECISION_ROLLBACK
        with contextlib.suppress(JournalError):
            await self._phase(run, rp.ROLLBACK, emit, reason)
        with run.timer.phase(rp.ROLLBACK):
            if run.postcopy and run.restore_sent:
                # A post-copy target runs: it must be dead before the source runs on.
                if not await self.messages.confirmed_abort(run.peer, run.mid, reason):
                    # Its own watch kills it once no page came for the stall timeout.
                    await asyncio.sleep(float(self.config.migration.postcopy_stall_timeout) + 2)
            elif await self._abort_target(run, reason):
                log.warning("migration.target_has_it", migration=run.mid)
                run.report.details["source_copy"] = await self._dispose_source(run)
                run.timer.finish()
                await self._end(
                    run, "succeeded", f"target refused the abort, it runs there: {reason}"
                )
                return
            try:
                if run.frozen_at is None:
                    how = "never frozen: it kept running"
                elif run.postcopy:
                    how = await self.recovery.release_paused_source(
                        run.spec.id, run.report.details.get("postcopy_port")
                    )
                    if run.pagedump is not None:
                        run.pagedump.cleanup()
                    if (run.spec.restart_policy.get("Name") or "no") != "no":
                        await asyncio.to_thread(
                            self.adapter.update_restart_policy, run.spec.id, run.spec.restart_policy
                        )
                else:
                    how = await self._restore_here(run)
                fresh = None
                if before is not None:
                    fresh = await asyncio.to_thread(
                        check_fresh_start,
                        self.adapter,
                        run.spec.id,
                        before,
                        how.startswith("restored"),
                    )
                if fresh:
                    raise StateNotRestored("rollback", fresh)
            except Exception as exc:
                run.timer.finish()
                detail = exc.message if isinstance(exc, DockerError) else str(exc)
                lost = state_lost_sentence(run.spec.name, detail)
                why = f"{reason}; AND its state could not be restored here: {detail}"
                run.report.state_lost = lost
                await self._end(run, "failed", why)
                log.error("migration.state_lost", migration=run.mid, reason=why)
                emit("done", lost)
                raise MigrationFailed(why, rolled_back=False, state_lost=lost) from exc
        run.report.details["rollback"] = how
        if run.frozen_at is not None:
            # Not "downtime" (that means running on the target); how long it was down here.
            run.report.details["down_until_rollback_s"] = round(
                self.clock.monotonic() - run.frozen_at, 4
            )
        run.timer.finish()
        await self._end(run, "rolled_back", reason)
        log.warning("migration.rolled_back", migration=run.mid, reason=reason, how=how)
        emit("done", f"rolled back: {reason}")

    async def _restore_here(self, run: Run) -> str:
        root = await asyncio.to_thread(self.data_root.get)
        if not run.frozen_ok:
            # The dump may still run (a timed-out API call) or be writing its images.
            settled = await asyncio.to_thread(
                wait_checkpoint_settled,
                self.adapter,
                root,
                run.spec.id,
                run.checkpoint,
                float(self.config.migration.checkpoint_timeout),
                in_progress=self.procs.dump_in_progress,
            )
            if settled == "missing":
                raise StateNotRestored(
                    "rollback", f"no checkpoint images for {run.spec.name}; it is left stopped"
                )
        return await asyncio.to_thread(
            restore_locally,
            self.adapter,
            root,
            run.spec.id,
            run.checkpoint,
            run.spec.restart_policy,
            self.config.migration.restore_timeout,
            self.handlers.ctrd,
        )

    async def _abort_target(self, run: Run, reason: str) -> bool:
        """Tell the target to drop its copy; True if it says the container already runs there."""
        if not run.staged:
            return False
        return await self.messages.send_abort(run.peer, run.mid, reason)

    async def _end(self, run: Run, outcome: str, reason: str | None) -> None:
        if run.postcopy:
            with contextlib.suppress(DockerError, OSError):
                postcopy.cleanup_source(self.data_root.get(), run.mid)
        run.report.outcome = outcome
        run.report.reason = reason
        if not run.report.total_s:
            run.timer.finish()
        data = self._journal_data(run)
        try:
            await to_thread_to_the_end(
                self.journal.finish, run.mid, outcome, reason=reason, report=data
            )
        except JournalError:
            log.exception("migration.journal_failed", migration=run.mid)

    # ------------------------------------------------------------ reconcile

    async def reconcile_record(self, rec: MigrationRecord) -> str:
        """Resolve one unfinished (or in-doubt) source-side migration after a restart.

        Raises while it cannot be resolved yet; the caller retries.
        """
        return await self.recovery.reconcile_record(rec)

    async def resolve(self, migration_id: str, keep: str) -> str:
        """An operator ends an in-doubt migration: keep the source's or the target's copy."""
        return await self.recovery.resolve(migration_id, keep)


# An unheard abort is retried this long: after it the target drops the migration itself.
ABORT_RETRY_FOR = RESERVATION_TTL
