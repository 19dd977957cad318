"""The target side of a migration: the peer API handlers.

prepare -> (image) -> stage -> state -> restore -> commit, or abort at any
point before the commit. Every step is journalled (role "target") so a
restarted agent can tell a half-made container (removed) from one it holds
(asks the source) or one it runs (kept).

The restore leaves every process of the copy stopped (CRIU `leave-stopped`):
it runs no application code until the source, the only authority on the
outcome, has journalled its commit and said so. Without that word the copy
stays stopped, whatever happens (docs/commit-protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from agent.archive import (
    ArchiveError,
    ArchiveTooLarge,
    DigestMismatch,
    StagedUnpack,
    UnsafeArchive,
)
from agent.backoff import Backoff
from agent.bridges import spawn_tracked, to_thread_to_the_end
from agent.config import FerryConfig
from agent.docker_adapter import (
    CHECKPOINT_NAME_RE,
    DockerAdapter,
    DockerConflict,
    DockerError,
    DockerNotFound,
    DockerUnavailable,
)
from agent.journal import Journal, JournalError
from agent.migration import (
    admission,
    criu_config,
    criu_log,
    fresh_start,
    held,
    hooks,
    networks,
)
from agent.migration.accept import SpecShapeError, parse_spec
from agent.migration.ctrd import CtrdSweeper
from agent.migration.disk_space import target_need
from agent.migration.incoming import Incoming, incoming_from_record, lazy_bytes
from agent.migration.lazy_restore import LazyRestore, LazyRestoreError
from agent.migration.paths import DataRootResolver
from agent.migration.resources import CapacityRefused, Reservations, state_cap
from agent.migration.spec import DEFAULT_NETWORKS, ContainerSpec
from agent.migration.target_fill import CopyActions, LazyFills
from agent.migration.target_image import ImageReceiver
from agent.migration.target_postcopy import PostcopyPulls
from agent.migration.target_quiet import SilenceCheck
from agent.migration.target_stage import Stager, dump_matched
from agent.model import Clock, SystemClock
from agent.peer import protocol
from agent.peer.api import BodyTooLarge, ByteStream, HandlerError, valid_migration_id

log = structlog.get_logger(__name__)

RESERVATION_TTL = 600.0

# Target-side journal phases.
T_PREPARED = "prepared"
T_IMAGE = "image"
T_STAGED = "staged"
T_RECEIVED = "received"
T_RESTORE = "restore"
T_RESTORED = "restored"  # restored and held stopped, waiting for the source's decision
T_POSTCOPY = "postcopy"  # running, pulling its pages from the paused source
# Until a copy is held here the source cannot have committed: a migration it has
# gone silent on may be dropped then. T_RESTORE with no request running is a
# restore whose handler failed past its own clean-up; its answer never said "held".
_DROPPABLE = (T_PREPARED, T_IMAGE, T_STAGED, T_RECEIVED, T_RESTORE)
DECISION_POLL_MAX = 30.0


def _refuse(reason: str, code: str = "refused", status: int = 409) -> HandlerError:
    return HandlerError(status, code, reason)


class TargetHandlers:
    """Implements agent.peer.api.PeerHandlers for the target side of migrations."""

    def __init__(
        self,
        adapter: DockerAdapter,
        config: FerryConfig,
        journal: Journal,
        draining: Callable[[], bool] = lambda: False,
        clock: Clock | None = None,
        peer_status: Callable[[str, str], Awaitable[dict[str, Any] | None]] | None = None,
        processes: held.ProcessTable | None = None,
        ctrd: CtrdSweeper | None = None,
    ) -> None:
        self.adapter = adapter
        self.ctrd = ctrd or CtrdSweeper(config.docker.containerd_tmp)
        self.procs: held.ProcessTable = processes or held.HostProcesses()
        self.config = config
        self.journal = journal
        self.draining = draining
        self.clock = clock or SystemClock()
        # Asks a source peer about a migration (used by reconcile); None in tests.
        self.peer_status = peer_status
        self.data_root = DataRootResolver(adapter.data_root, config.docker.data_root)
        # Tries a published port in this host's network namespace (tests replace it).
        self.bind_port: admission.Binder = admission.try_bind
        # Until prepare asks the daemon: staged state lands under Docker's data root.
        self.reservations = Reservations(
            self.clock, config.docker.data_root or Path(config.state_dir)
        )
        self.incoming: dict[str, Incoming] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cleanup_tasks: set[asyncio.Task[None]] = set()
        # State received and unpacked into staging dirs, waiting for restore.
        self._staged: dict[str, StagedUnpack] = {}
        # Held copies waiting for the source's word: who asks when it does not come.
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.stager = Stager(adapter, config, journal, self.data_root)
        self.images = ImageReceiver(adapter, config.name)
        # Post-copy restores: the daemon pulling each one's pages.
        self.pulls = PostcopyPulls(
            config=config,
            journal=journal,
            adapter=adapter,
            data_root=self.data_root,
            ctrd=self.ctrd,
            lock=self._lock,
            discard=self._discard,
            spawn=self._spawn,
        )
        # Lazy restores whose pages are still being filled in from local disk.
        self.fills = LazyFills(
            config,
            journal,
            adapter,
            self.data_root,
            self.clock,
            CopyActions(
                self._lock, self._lazy, self._restore_once, self._continue, self._after_commit
            ),
            self._spawn,
        )
        # Asks a source that went silent before any hold whether its migration is on.
        self.silence = SilenceCheck(
            incoming=self.incoming,
            journal=journal,
            locks=self._locks,
            reservations=self.reservations,
            reservation_ttl=RESERVATION_TTL,
            droppable=_DROPPABLE,
            peer_status=peer_status,
            discard=self._discard,
            clock=self.clock,
            spawn=self._spawn,
        )

    # ------------------------------------------------------------ helpers

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
        return spawn_tracked(self._cleanup_tasks, coro)

    def _lock(self, mid: str) -> asyncio.Lock:
        return self._locks.setdefault(mid, asyncio.Lock())

    def _get(self, peer: str, mid: str) -> Incoming:
        inc = self.incoming.get(mid)
        if inc is None:
            raise _refuse(f"no migration {mid} in progress here", "unknown_migration", 404)
        if inc.peer != peer:
            raise _refuse(f"migration {mid} belongs to another peer", "forbidden", 403)
        inc.last_heard = self.clock.monotonic()
        return inc

    async def _phase(self, inc: Incoming, phase: str, extra: dict[str, Any] | None = None) -> None:
        # One commit for the phase and the report, off the loop; done before the phase starts.
        report = inc.journal_report() | (extra or {})
        await to_thread_to_the_end(self.journal.set_phase, inc.migration_id, phase, report)

    async def _save(self, inc: Incoming) -> None:
        report = inc.journal_report()
        await to_thread_to_the_end(self.journal.update_report, inc.migration_id, report)

    async def close(self) -> None:
        self.silence.close()
        for task in list(self._cleanup_tasks):
            task.cancel()
        await asyncio.gather(*self._cleanup_tasks, return_exceptions=True)

    # ------------------------------------------------------------ PeerHandlers

    async def health(self) -> dict[str, Any]:
        return {
            "migrations_in_progress": len(self.incoming),
            "reserved_memory_bytes": sum(r.memory_bytes for r in self.reservations.active()),
        }

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        mid = str(body.get("migration_id", ""))
        name = str(body.get("name", ""))
        if not valid_migration_id(mid) or not name:
            raise _refuse("prepare needs migration_id and name", "bad_request", 400)
        if not CHECKPOINT_NAME_RE.match(f"ferry-{mid}"):
            raise _refuse(
                f"migration id {mid!r} makes an invalid checkpoint name", "bad_request", 400
            )
        if self.draining():
            raise _refuse(f"{self.config.name} is draining", "draining", 503)
        too_old = protocol.refusal(peer, self.config.name, body)
        if too_old:
            raise _refuse(too_old, "protocol")
        if mid in self.incoming:
            raise _refuse(f"migration {mid} is already in progress here", "conflict")
        # The members of one group migration count as one.
        group = str(body.get("group_id") or "") or None
        units = {i.group_id or m for m, i in self.incoming.items()}
        if group not in units and len(units) >= self.config.limits.max_concurrent_migrations:
            raise _refuse(
                f"{self.config.name} is already receiving {len(units)} migration(s)",
                "busy",
                503,
            )
        image_id = str(body.get("image_id", ""))
        try:
            reasons, has_image = await asyncio.to_thread(self._prepare_checks, body, name, image_id)
        except DockerError as exc:
            raise _refuse(
                f"{self.config.name}'s Docker daemon: {exc}", "docker_unavailable", 503
            ) from exc
        if reasons:
            raise _refuse("; ".join(reasons))
        inc = Incoming(mid, peer, name, str(body.get("container_id", "")))
        inc.checkpoint = f"ferry-{mid}"
        inc.network_specs = [n for n in body.get("network_specs") or [] if isinstance(n, dict)]
        inc.group_id = group
        inc.image_id = image_id
        # The state may unpack to what was declared (plus slack), and that much disk is
        # reserved; the image upload likewise, when one is needed.
        inc.state_cap = state_cap(int(body.get("state_bytes_estimate") or 0))
        if not has_image:
            inc.image_cap = min(
                state_cap(int(body.get("image_bytes") or 0)),
                int(self.config.migration.max_image_bytes),
            )
        # The data root Docker writes to, as this agent sees it (not state_dir's disk).
        root = await asyncio.to_thread(self.data_root.get)
        self.reservations.data_root = root.local_root
        memory = int(body.get("memory_bytes") or 0)
        disk = target_need(inc.state_cap, memory, inc.image_cap)
        try:
            await asyncio.to_thread(
                self.reservations.reserve, mid, peer, memory, disk, RESERVATION_TTL
            )
        except CapacityRefused as exc:
            raise _refuse(f"{self.config.name}: {exc}", "no_capacity") from exc
        try:
            await to_thread_to_the_end(
                self.journal.begin,
                mid,
                container_id=inc.source_container_id,
                container_name=name,
                source=peer,
                target=self.config.name,
                role="target",
                phase=T_PREPARED,
            )
        except JournalError as exc:
            self.reservations.release(mid)
            raise _refuse(str(exc), "conflict") from exc
        inc.last_heard = self.clock.monotonic()
        self.incoming[mid] = inc
        self.silence.arm(mid)
        log.info("migration.target.prepared", migration=mid, peer=peer, container=name)
        return {
            "accepted": True,
            "has_image": has_image,
            "reservation_ttl_s": RESERVATION_TTL,
            protocol.KEY: protocol.PROTOCOL,
        }

    async def check(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        """A dry run of prepare: would this host take the container now? Reserves nothing."""
        name = str(body.get("name", ""))
        if not name:
            raise _refuse("check needs the container's name", "bad_request", 400)
        reasons: list[str] = []
        transient = False
        if self.draining():
            reasons.append(f"{self.config.name} is draining")
        too_old = protocol.refusal(peer, self.config.name, body)
        if too_old:
            reasons.append(too_old)
        try:
            found, has_image = await asyncio.to_thread(
                self._prepare_checks, body, name, str(body.get("image_id", ""))
            )
            reasons += found
            if body.get("spec") is not None:
                reasons += await self._spec_reasons(body["spec"])
        except DockerError as exc:
            reasons.append(f"{self.config.name}'s Docker daemon: {exc}")
            transient, has_image = True, False
        disk = target_need(
            int(body.get("state_bytes_estimate") or 0),
            int(body.get("memory_bytes") or 0),
            0 if has_image else int(body.get("image_bytes") or 0),
        )
        try:
            root = await asyncio.to_thread(self.data_root.get)
            self.reservations.data_root = root.local_root
            self.reservations.fits(int(body.get("memory_bytes") or 0), disk)
        except CapacityRefused as exc:
            reasons.append(f"{self.config.name}: {exc}")
            transient = True
        except DockerError as exc:
            reasons.append(f"{self.config.name}'s Docker daemon: {exc}")
            transient = True
        return {
            "reasons": reasons,
            "transient": transient,
            "has_image": has_image,
            protocol.KEY: protocol.PROTOCOL,
        }

    async def _spec_reasons(self, data: Any) -> list[str]:
        """For a dry run: what stage would refuse in this spec (shape, migration.accept)."""
        try:
            spec = parse_spec(data)
        except SpecShapeError as exc:
            return [str(exc)]
        refused = await self.stager.accept_reasons(spec)
        return [f"{self.config.name} does not accept: {r}" for r in refused]

    def _prepare_checks(
        self, body: dict[str, Any], name: str, image_id: str
    ) -> tuple[list[str], bool]:
        reasons: list[str] = []
        here = self.config.name
        if self.adapter.find_container(name) is not None:
            reasons.append(f"a container named {name} already exists on {here}")
        ports = list(body.get("ports") or [])
        if ports:
            published = admission.published_here(self.adapter.list_containers())
            reasons += admission.port_problems(ports, published, here, self.bind_port)
        reasons += admission.address_problems(body.get("addresses") or {}, self.adapter, here)
        described = {
            str(n.get("name")): n for n in body.get("network_specs") or [] if isinstance(n, dict)
        }
        existing = self.adapter.network_names()
        for net in body.get("networks", []):
            if net in DEFAULT_NETWORKS or net in existing:
                continue
            if net not in described:
                reasons.append(f"network {net} does not exist on {here}")
            else:
                reasons.extend(networks.problems(described[net]))
        for vol in body.get("volumes", []):
            with contextlib.suppress(DockerNotFound):
                self.adapter.inspect_volume(vol)
                reasons.append(f"volume {vol} already exists on {here}")
        has_image = bool(image_id) and self.adapter.has_image(image_id)
        return sorted(set(reasons)), has_image

    async def status(self, peer: str, migration_id: str) -> dict[str, Any]:
        try:
            rec = self.journal.get(migration_id)
        except JournalError:
            raise _refuse(f"no migration {migration_id}", "unknown_migration", 404) from None
        if rec.source != peer and rec.target != peer:
            raise _refuse(f"migration {migration_id} does not involve {peer}", "forbidden", 403)
        out: dict[str, Any] = {
            "migration_id": rec.id,
            "role": rec.role,
            "phase": rec.phase,
            "outcome": rec.outcome,
            "reason": rec.reason,
            # The source's journalled decision: what a target holding a stopped copy obeys.
            "decision": rec.report.get("decision") if rec.role == "source" else None,
            "held": rec.role == "target" and rec.outcome is None and rec.phase == T_RESTORED,
        }
        if rec.role == "target" and rec.phase == T_POSTCOPY:
            target = (rec.report or {}).get("target") or {}
            inc_now = self.incoming.get(rec.id)
            out["postcopy"] = {
                "bytes_pulled": self.pulls.pulled(rec.id),
                "bytes_total": lazy_bytes(inc_now.timings if inc_now else target.get("timings")),
                "pages_in": bool(inc_now.pages_in if inc_now else target.get("pages_in")),
                "failed": (inc_now.page_failure if inc_now else None)
                or (rec.reason if rec.outcome not in (None, "succeeded") else None),
            }
        cid = (rec.report.get("target") or {}).get("container_id") if rec.role == "target" else None
        fill = self.fills.status(rec.id)
        if fill is not None and rec.role == "target":
            out["fill"] = fill
        if cid:
            out["container_id"] = cid
            try:
                info = await asyncio.to_thread(self.adapter.find_container, cid)
                out["running"] = bool(info and (info.get("State") or {}).get("Running"))
                out["exists"] = info is not None
            except DockerError as exc:
                out["running"] = None
                out["docker_error"] = str(exc)
        return out

    async def stage(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock(migration_id):
            inc = self._get(peer, migration_id)
            self.reservations.extend(migration_id, RESERVATION_TTL)
            try:
                spec = await self.stager.accepted_spec(inc, body.get("spec"))
                result = await asyncio.to_thread(self.stager.create, inc, spec)
            except HandlerError as exc:
                await self._discard(inc, exc.reason)
                raise
            except DockerUnavailable as exc:
                raise _refuse(
                    f"{self.config.name}'s Docker daemon: {exc}", "docker_unavailable", 503
                ) from exc
            except DockerError as exc:
                reason = f"cannot create the container on {self.config.name}: {exc.message}"
                await self._discard(inc, reason)
                raise _refuse(reason) from exc
            await self._phase(inc, T_STAGED)
            log.info(
                "migration.target.staged", migration=migration_id, container_id=inc.container_id
            )
            return result

    async def receive_image(
        self, peer: str, migration_id: str, stream: ByteStream, meta: dict[str, Any]
    ) -> dict[str, Any]:
        async with self._lock(migration_id):
            inc = self._get(peer, migration_id)
            self.reservations.extend(migration_id, RESERVATION_TTL)
            try:
                declared = self.images.expected(inc, meta)
                await self._phase(inc, T_IMAGE)
                return await self.images.load(inc, stream, declared, self._save)
            except (HandlerError, BodyTooLarge) as exc:
                # A refused upload leaves nothing behind, now rather than at the source's abort.
                await self._discard(inc, getattr(exc, "reason", None) or str(exc))
                raise

    async def receive_state(
        self, peer: str, migration_id: str, stream: ByteStream, digest: str | None
    ) -> dict[str, Any]:
        async with self._lock(migration_id):
            inc = self._get(peer, migration_id)
            self.reservations.extend(migration_id, RESERVATION_TTL)
            if inc.container_id is None:
                raise _refuse("state sent before the container was staged", "bad_order")
            try:
                return await self._receive_state(inc, stream, digest)
            except (HandlerError, BodyTooLarge) as exc:
                # A refused upload leaves nothing behind, now rather than at the source's abort.
                await self._discard(inc, getattr(exc, "reason", None) or str(exc))
                raise

    async def _receive_state(
        self, inc: Incoming, stream: ByteStream, digest: str | None
    ) -> dict[str, Any]:
        migration_id = inc.migration_id
        await self._phase(inc, T_RECEIVED)
        previous = self._staged.pop(migration_id, None)
        if previous is not None:  # a resent state replaces what came before
            await asyncio.to_thread(previous.discard)
        # Capped at what prepare declared and reserved; refused at the first byte past it.
        cap = inc.state_cap or state_cap(0)
        staged = StagedUnpack(await self._sections(inc), max_raw_bytes=cap, fail_fast=True)
        # Unpacked while it arrives, into staging dirs next to the destinations;
        # restore moves them into place once the source's digest matches.
        try:
            result = await staged.receive(
                stream,
                expected_digest=digest,
                max_bytes=min(int(self.config.limits.max_request_bytes), cap),
            )
        except DigestMismatch as exc:
            raise _refuse(str(exc), "digest_mismatch", 422) from exc
        except ArchiveTooLarge as exc:
            raise _refuse(
                f"{exc} (the state declared at prepare, with slack)", "too_large", 413
            ) from exc
        except UnsafeArchive as exc:
            raise _refuse(str(exc), "unsafe_archive", 422) from exc
        except ArchiveError as exc:
            raise _refuse(str(exc), "bad_archive", 422) from exc
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # Something else took the room reserved at prepare: say so, not "internal error".
            raise _refuse(
                f"{self.config.name}: no space left on its Docker data root while the state "
                "was unpacked",
                "no_space",
                507,
            ) from exc
        self._staged[migration_id] = staged
        inc.staging_dirs = staged.staging_dirs
        inc.archive_digest = result.digest
        inc.archive_bytes = result.size
        await self._save(inc)
        return {"digest": result.digest, "bytes": result.size}

    async def restore(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock(migration_id):
            inc = self._get(peer, migration_id)
            if inc.container_id is None or migration_id not in self._staged or inc.spec is None:
                raise _refuse(
                    "restore before the container was staged and its state sent", "bad_order"
                )
            digest = str(body.get("digest") or "")
            if digest != inc.archive_digest:
                await self._discard(
                    inc, f"digest mismatch: got {inc.archive_digest}, source says {digest}"
                )
                raise _refuse(
                    f"state digest {inc.archive_digest} does not match the source's {digest}",
                    "digest_mismatch",
                    422,
                )
            wanted = body.get("postcopy")
            if isinstance(wanted, dict) and isinstance(wanted.get("port"), int):
                # Journalled with the phase: a post-copy copy runs at once, so an agent that
                # dies before "postcopy" is written must still know this one may run.
                inc.postcopy_port = int(wanted["port"])
            await self._phase(inc, T_RESTORE)
            t0 = self.clock.monotonic()
            timings: dict[str, float] = {}
            try:
                await self._unpack(inc, digest)
                timings["unpack_s"] = round(self.clock.monotonic() - t0, 4)
                await hooks.gate(
                    Path(self.config.state_dir), hooks.BEFORE_RESTORE, self.clock, asdict(inc)
                )
                if inc.aborted:
                    raise _refuse("the source aborted this migration", "aborted")
                t1 = self.clock.monotonic()
                if inc.postcopy_port is not None:
                    await asyncio.to_thread(self.pulls.start, inc)
                    await hooks.gate(
                        Path(self.config.state_dir),
                        hooks.POSTCOPY_STARTED,
                        self.clock,
                        {"migration": migration_id},
                    )
                else:
                    await asyncio.to_thread(self._start_held, inc)
                    self.fills.watch(inc.migration_id)
                timings["start_s"] = round(self.clock.monotonic() - t1, 4)
                timings.update(inc.timings)  # how many pages the lazy path left to its daemon
            except HandlerError as exc:
                await self._discard(inc, exc.reason)
                raise
            except (DockerError, ArchiveError, OSError) as exc:
                reason = f"restore on {self.config.name} failed: {exc}{self._criu_words(inc)}"
                await self._discard(inc, reason)
                code = "unsafe_archive" if isinstance(exc, UnsafeArchive) else "restore_failed"
                raise _refuse(reason, code, 422 if code == "unsafe_archive" else 500) from exc
            inc.timings = timings
            if inc.postcopy_port is not None:
                await self._phase(inc, T_POSTCOPY, {"timings": timings})
                self.pulls.watch(inc)
                log.info("migration.target.postcopy_running", migration=migration_id)
                return {"postcopy": True, "running": True, "timings": timings}
            await self._phase(inc, T_RESTORED, {"timings": timings})
            self._watch_decision(inc)
            log.info("migration.target.held", migration=migration_id, container_id=inc.container_id)
            return {
                "restored": True,
                "held": True,
                "container_id": inc.container_id,
                "timings": timings,
            }

    def _criu_words(self, inc: Incoming) -> str:
        # A copy in the agent's state dir: the config's log goes when the migration is cleaned.
        conf = criu_config.for_migration(self.data_root.get(), inc.migration_id)
        logs = Path(self.config.state_dir) / criu_log.LOGS_DIR
        kept = criu_log.keep(conf.local_log, logs, f"ferry-{inc.migration_id}.restore.log")
        words = criu_log.describe(kept)
        return f"; {words}" if words else ""

    async def commit(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The source journalled its commit: let the held copy run. Idempotent."""
        try:
            rec = self.journal.get(migration_id)
        except JournalError:
            raise _refuse(f"no migration {migration_id} here", "unknown_migration", 404) from None
        if rec.source != peer:
            raise _refuse(f"migration {migration_id} belongs to another peer", "forbidden", 403)
        inc = self.incoming.get(migration_id) or incoming_from_record(rec)
        async with self._lock(migration_id):
            if rec.outcome is None:
                await self._confirm_commit(rec)
            return await self._commit(inc, rec.id)

    async def _confirm_commit(self, rec: Any) -> None:
        """A commit can arrive late (held in a cut link's buffers) after an operator chose
        the source's copy: run only on what the source's journal says now."""
        if self.peer_status is None:
            return
        verdict = await self.peer_status(rec.source, rec.id)
        decision = (verdict or {}).get("decision")
        if decision == "commit":
            return
        if decision == "rollback":
            inc = self.incoming.get(rec.id) or incoming_from_record(rec)
            await self._discard(inc, "a late commit; the source's journal says rollback")
            raise _refuse(f"migration {rec.id}: the source's journal says rollback now", "not_held")
        raise _refuse(
            f"migration {rec.id}: cannot confirm the source's commit ({decision or 'no answer'})",
            "commit_unconfirmed",
            503,
        )

    async def _finish_postcopy(self, inc: Incoming, rec: Any) -> dict[str, Any]:
        await to_thread_to_the_end(
            self.journal.finish, rec.id, "succeeded", report=inc.journal_report()
        )
        self._forget(rec.id)
        self.pulls.finished(rec.id)
        await asyncio.to_thread(self._after_commit, inc)
        log.info("migration.target.running", migration=rec.id, container_id=inc.container_id)
        return {"running": True, "container_id": inc.container_id}

    async def _commit(self, inc: Incoming, migration_id: str) -> dict[str, Any]:
        rec = self.journal.get(migration_id)
        if rec.outcome == "succeeded":
            return {"running": True, "container_id": inc.container_id, "already": True}
        if rec.outcome is None and rec.phase == T_POSTCOPY and inc.container_id:
            if not inc.pages_in:
                raise _refuse(
                    f"migration {migration_id}: not every page is in yet", "pages_missing"
                )
            return await self._finish_postcopy(inc, rec)
        if rec.outcome is not None or rec.phase != T_RESTORED or not inc.container_id:
            raise _refuse(
                f"migration {migration_id} holds no restored copy here "
                f"(phase {rec.phase}, outcome {rec.outcome})",
                "not_held",
            )
        await hooks.gate(
            Path(self.config.state_dir),
            hooks.BEFORE_CONTINUE,
            self.clock,
            {"migration": migration_id},
        )
        t0 = self.clock.monotonic()
        try:
            await self.fills.ensure(inc, continued=False)
            await asyncio.to_thread(self._continue, inc)
        except (DockerError, LazyRestoreError) as exc:
            # Still stopped and still ours: the source retries, or an operator resolves.
            raise _refuse(
                f"cannot continue the restored copy on {self.config.name}: {exc}",
                "continue_failed",
                503,
            ) from exc
        timings = dict((rec.report or {}).get("timings") or {})
        timings["continue_s"] = round(self.clock.monotonic() - t0, 4)
        await to_thread_to_the_end(
            self.journal.finish,
            migration_id,
            "succeeded",
            report=inc.journal_report() | {"timings": timings},
        )
        self._forget(migration_id)
        await self._stop_watcher(migration_id)
        if self.fills.pending(migration_id):
            # Running, its pages still filling in: the rest of the clean-up (restart
            # policy, checkpoint, config) waits for the last page, as a retry needs them.
            log.info("migration.target.running", migration=migration_id, filling=True)
            return {
                "running": True,
                "container_id": inc.container_id,
                "timings": timings,
                "filling": True,
            }
        self.fills.finished(migration_id)
        lost = await asyncio.to_thread(self._after_commit, inc)
        log.info("migration.target.running", migration=migration_id, container_id=inc.container_id)
        answer = {"running": True, "container_id": inc.container_id, "timings": timings}
        return answer | ({"state_lost": lost} if lost else {})

    async def _sections(self, inc: Incoming) -> dict[str, Path]:
        assert inc.container_id and inc.upper_dir
        root = await asyncio.to_thread(self.data_root.get)
        ckpt = root.checkpoint_dir(inc.container_id, inc.checkpoint)
        sections = {"checkpoint": ckpt, "upper": Path(inc.upper_dir)}
        sections.update({k: Path(v) for k, v in inc.volume_dirs.items()})
        return sections

    async def _unpack(self, inc: Incoming, digest: str) -> None:
        """Check the digest, then move the staged state into place (renames, no copy)."""
        staged = self._staged.pop(inc.migration_id)
        await asyncio.to_thread(staged.commit, digest)
        inc.staging_dirs = []

    def _lazy(self, inc: Incoming) -> LazyRestore:
        assert inc.container_id
        return LazyRestore(
            self.data_root.get(),
            inc.migration_id,
            inc.container_id,
            inc.checkpoint,
            self.config.docker.criu_command,
        )

    def _restores_lazily(self, inc: Incoming) -> bool:
        migration = self.config.migration
        if migration.restore_via != "lazy":
            return False
        assert inc.container_id
        pages = _page_bytes(self.data_root.get().checkpoint_dir(inc.container_id, inc.checkpoint))
        inc.timings["page_bytes"] = pages
        if pages >= migration.lazy_min_bytes:
            return True
        log.info(
            "migration.target.restore_plain",
            migration=inc.migration_id,
            page_bytes=pages,
            reason=f"under migration.lazy_min_bytes ({int(migration.lazy_min_bytes)})",
        )
        return False

    def _start_held(self, inc: Incoming) -> None:
        """Restore (lazily when it can), and prove that nothing of it runs yet."""
        assert inc.container_id
        conf = criu_config.for_migration(self.data_root.get(), inc.migration_id)
        lazy: LazyRestore | None = None
        assert inc.spec
        extra = dump_matched(ContainerSpec.from_dict(inc.spec))
        if self._restores_lazily(inc):
            lazy = self._lazy(inc)
            try:
                t0 = self.clock.monotonic()
                kept, left = lazy.prepare()
                t1 = self.clock.monotonic()
                lazy.start_daemon()
                inc.timings["lazy_prepare_s"] = round(t1 - t0, 4)
                inc.timings["daemon_start_s"] = round(self.clock.monotonic() - t1, 4)
                extra = [*extra, *lazy.criu_options()]
                inc.timings["lazy_pages"] = left
                inc.timings["present_pages"] = kept
            except LazyRestoreError as exc:
                # Like a missing inotify: say so, and take the slower path that works.
                log.warning(
                    "migration.target.lazy_unavailable", migration=inc.migration_id, reason=str(exc)
                )
                lazy.stop_daemon()
                lazy.undo()
                lazy.cleanup()
                lazy = None
        conf.write(criu_config.restore_options(conf.daemon_log, extra=extra))
        if lazy is None:
            self._restore_once(inc)
            return
        first: Exception | None = None
        for attempt in (1, 2):
            try:
                hooks.gate_sync(
                    Path(self.config.state_dir), hooks.LAZY_DAEMON, {"migration": inc.migration_id}
                )
                t0 = self.clock.monotonic()
                self._restore_once(inc)
                t1 = self.clock.monotonic()
                inc.timings["held_s"] = round(t1 - t0, 4)
                if self.config.migration.lazy_hold_until_pages_in:
                    lazy.wait_all_pages(float(self.config.migration.restore_timeout))
                    inc.timings["pages_in_s"] = round(self.clock.monotonic() - t1, 4)
                else:
                    # The copy stays held until the commit; the fill goes on meanwhile,
                    # watched by _watch_fill from here on.
                    self.fills.track(lazy, inc, t1)
                return
            except (DockerError, LazyRestoreError) as exc:
                # The copy may hold zero-filled pages: it must never run. Kill it and
                # restore again from the same local images.
                log.error(
                    "migration.target.lazy_failed",
                    migration=inc.migration_id,
                    attempt=attempt,
                    error=str(exc),
                )
                lazy.stop_daemon()
                with contextlib.suppress(DockerError):
                    self.adapter.kill(inc.container_id)
                if isinstance(exc, DockerUnavailable):
                    raise  # no daemon to retry with: say that, not "failed twice"
                if first is not None:
                    why = str(exc) if str(exc) == str(first) else f"{first}; then: {exc}"
                    raise DockerError("restore", f"lazy restore failed twice: {why}") from exc
                first = exc
                lazy.start_daemon()

    # ------------------------------------------------------------ pages still coming

    def page_progress(self) -> dict[str, dict[str, Any]]:
        """Migrations whose memory pages are still coming in here, and how far they are."""
        return self.pulls.progress(self.incoming) | self.fills.progress()

    async def reconcile_fills(self) -> list[str]:
        """At agent start: every committed lazy restore still holding its full images."""
        return await self.fills.reconcile()

    def _restore_once(self, inc: Incoming) -> None:
        assert inc.container_id
        mig = self.config.migration
        with self.ctrd.restoring():
            self.adapter.start(inc.container_id, checkpoint=inc.checkpoint)
        self.adapter.wait_running(inc.container_id, timeout=mig.restore_timeout)
        procs = self.procs.processes(inc.container_id)
        if not held.all_stopped(procs):
            # CRIU ignored leave-stopped: it would run before the commit. Never keep that.
            with contextlib.suppress(DockerError):
                self.adapter.remove(inc.container_id, force=True)
            running = [p.pid for p in procs if p.state not in ("T", "t")]
            raise DockerError(
                "restore",
                f"the restored copy is not held stopped (running pids {running[:5]}); removed",
            )

    def _continue(self, inc: Incoming) -> None:
        """SIGCONT every process, inside a pause so they all resume at once."""
        assert inc.container_id
        cid = inc.container_id
        procs = self.procs.processes(cid)
        if not procs:
            raise DockerError("continue", f"no processes of {cid[:12]} found")
        paused = False
        try:
            self.adapter.pause(cid)
            paused = True
        except DockerError as exc:
            log.warning("migration.target.pause_failed", container_id=cid, error=str(exc))
        try:
            self.procs.cont(procs)
        finally:
            if paused:
                self.adapter.unpause(cid)
        deadline = self.clock.monotonic() + 10.0
        while True:
            left = [p for p in self.procs.processes(cid) if p.state in ("T", "t")]
            if not left:
                return
            if self.clock.monotonic() > deadline:
                raise DockerError("continue", f"pids {[p.pid for p in left][:5]} stay stopped")
            self.procs.cont(left)
            time.sleep(0.02)

    def _after_commit(self, inc: Incoming) -> str | None:
        """Running here for good: restart policy back, health, and no state left behind.

        Returns why its state is lost if Docker restarted the restored copy from scratch.
        """
        assert inc.container_id
        spec = ContainerSpec.from_dict(inc.spec) if inc.spec else None
        cid = inc.container_id
        try:
            if spec is not None and (spec.restart_policy.get("Name") or "no") != "no":
                self.adapter.update_restart_policy(cid, spec.restart_policy)
            if spec is not None and spec.has_healthcheck:
                self.adapter.wait_running(
                    cid, timeout=self.config.migration.health_timeout, healthy=True
                )
        except DockerError as exc:
            log.warning("migration.target.after_commit", container_id=cid, error=str(exc))
        with contextlib.suppress(DockerError):
            self.adapter.checkpoint_delete(cid, inc.checkpoint)
        root = self.data_root.get()
        shutil.rmtree(root.checkpoint_dir(cid, inc.checkpoint), ignore_errors=True)
        criu_config.for_migration(root, inc.migration_id).remove()
        self._lazy(inc).cleanup()
        # Ferry created this copy: any restart since is Docker's restart policy, from scratch.
        lost = fresh_start.check_fresh_start(self.adapter, cid, {"RestartCount": 0}, True)
        if lost:
            log.error("migration.target.state_lost", container_id=cid, reason=lost)
        return lost

    def _watch_decision(self, inc: Incoming) -> None:
        """If the commit does not come, ask the source for its decision until it answers."""

        async def watch() -> None:
            await asyncio.sleep(float(self.config.migration.commit_timeout))
            backoff = Backoff(2.0, DECISION_POLL_MAX)
            while True:
                try:
                    outcome = await self.resolve_held(inc.migration_id)
                except Exception as exc:  # keep watching: the copy stays stopped meanwhile
                    outcome = f"error: {exc}"
                if outcome != "waiting":
                    log.info("migration.target.decided", migration=inc.migration_id, how=outcome)
                    return
                await asyncio.sleep(backoff.next())

        self._watchers[inc.migration_id] = self._spawn(watch())

    async def _stop_watcher(self, mid: str) -> None:
        task = self._watchers.pop(mid, None)
        if task is None or task is asyncio.current_task() or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def resolve_held(self, migration_id: str) -> str:
        """Act on the source's decision for a copy held here: continue, remove, or wait."""
        rec = self.journal.get(migration_id)
        if rec.outcome is not None or rec.phase != T_RESTORED:
            return f"done ({rec.outcome or rec.phase})"
        verdict = None
        if self.peer_status is not None:
            verdict = await self.peer_status(rec.source, migration_id)
        if verdict is None:
            return "waiting"
        inc = incoming_from_record(rec)
        decision = verdict.get("decision")
        if decision == "commit":
            async with self._lock(migration_id):
                await self._commit(inc, migration_id)
            return "continued: the source committed"
        if decision == "rollback" or (
            verdict.get("outcome") in ("rolled_back", "refused", "failed") and decision is None
        ):
            await self._discard(inc, "the source rolled back; held copy removed")
            return "removed: the source rolled back"
        return "waiting"

    async def abort(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        inc = self.incoming.get(migration_id)
        if inc is None:
            # Perhaps from before a restart: the journal still knows what was made.
            try:
                rec = self.journal.get(migration_id)
            except JournalError:
                return {"aborted": False, "reason": "unknown migration"}
            if rec.source != peer:
                raise _refuse(f"migration {migration_id} belongs to another peer", "forbidden", 403)
            if rec.outcome == "succeeded":
                raise _refuse(
                    f"migration {migration_id} already finished: the container runs here",
                    "already_running",
                )
            inc = incoming_from_record(rec)
        elif inc.peer != peer:
            raise _refuse(f"migration {migration_id} belongs to another peer", "forbidden", 403)
        inc.aborted = True
        async with self._lock(migration_id):
            rec = self.journal.get(migration_id)
            if rec.outcome == "succeeded":
                raise _refuse(
                    f"migration {migration_id} already finished: the container runs here",
                    "already_running",
                )
            reason = str(body.get("reason") or "aborted by the source")
            removed = await self._discard(inc, reason)
        return {"aborted": True, "removed": removed}

    async def _discard(self, inc: Incoming, reason: str) -> bool:
        """Remove everything this migration made here; retry later if Docker is away."""
        await self._stop_watcher(inc.migration_id)
        staged = self._staged.pop(inc.migration_id, None)
        if staged is not None:
            await asyncio.to_thread(staged.discard)
        try:
            await asyncio.to_thread(self._remove_made, inc)
        except DockerError as exc:
            log.warning(
                "migration.target.cleanup_deferred", migration=inc.migration_id, error=str(exc)
            )
            self._forget(inc.migration_id)
            self._spawn_cleanup(inc, reason)
            return False
        with contextlib.suppress(JournalError):
            await to_thread_to_the_end(
                self.journal.finish,
                inc.migration_id,
                "aborted",
                reason=reason,
                report=inc.journal_report(),
            )
        self._forget(inc.migration_id)
        # A network another member of the same group still used goes with the last one.
        with contextlib.suppress(DockerError):
            await asyncio.to_thread(self.stager.sweep_networks)
        log.info("migration.target.aborted", migration=inc.migration_id, reason=reason)
        return True

    def _remove_made(self, inc: Incoming) -> None:
        for staging in inc.staging_dirs:
            # Known from the journal after a restart; they also go with the container.
            if Path(staging).name.startswith(".ferry-stage-"):
                shutil.rmtree(staging, ignore_errors=True)
        if inc.container_id:
            with contextlib.suppress(DockerNotFound):
                self.adapter.remove(inc.container_id, force=True)
            # The checkpoint dir goes with the container; nothing else to remove.
        for vol in inc.created_volumes:
            with contextlib.suppress(DockerNotFound):
                self.adapter.remove_volume(vol)
        self.pulls.drop(inc.migration_id)
        self.fills.drop(inc.migration_id)
        with contextlib.suppress(DockerError, OSError):
            criu_config.for_migration(self.data_root.get(), inc.migration_id).remove()
            if inc.container_id:
                self._lazy(inc).cleanup()
        # Only what this migration made: tags it added (if still on its image), then the
        # image it loaded, which Docker keeps while anything else uses or names it.
        for tag in inc.added_tags:
            with contextlib.suppress(DockerNotFound, DockerConflict):
                if self.adapter.inspect_image(tag).get("Id") == inc.image_id:
                    self.adapter.remove_image(tag)
        if inc.loaded_image:
            self.images.remove([inc.loaded_image])

    def _spawn_cleanup(self, inc: Incoming, reason: str) -> None:
        async def retry() -> None:
            backoff = Backoff(1.0, 30.0)
            while True:
                await asyncio.sleep(backoff.next())
                try:
                    await asyncio.to_thread(self._remove_made, inc)
                except DockerError:
                    continue
                with contextlib.suppress(JournalError):
                    await to_thread_to_the_end(
                        self.journal.finish, inc.migration_id, "aborted", reason=reason
                    )
                with contextlib.suppress(DockerError):
                    await asyncio.to_thread(self.stager.sweep_networks)
                log.info("migration.target.cleanup_done", migration=inc.migration_id)
                return

        self._spawn(retry())

    def _forget(self, mid: str) -> None:
        self.silence.disarm(mid)
        self.incoming.pop(mid, None)
        self._locks.pop(mid, None)
        self.reservations.release(mid)

    # ------------------------------------------------------------ reconcile

    async def reconcile_record(self, rec: Any) -> str:
        """Resolve an unfinished target-side migration after a restart.

        Raises while the source's decision cannot be learned: the caller retries,
        and the copy stays stopped meanwhile.
        """
        inc = incoming_from_record(rec)
        info = None
        if inc.container_id:
            info = await asyncio.to_thread(self.adapter.find_container, inc.container_id)
        running = bool(info and (info.get("State") or {}).get("Running"))
        if rec.phase == T_POSTCOPY or (rec.phase == T_RESTORE and inc.postcopy_port is not None):
            # A post-copy restore runs as soon as it starts, "restore" or not; only one the
            # source was told of (phase "postcopy") can have been committed.
            verdict = None
            if rec.phase == T_POSTCOPY and self.peer_status is not None:
                verdict = await self.peer_status(rec.source, rec.id)
            if running and verdict is not None and verdict.get("decision") == "commit":
                await to_thread_to_the_end(
                    self.journal.finish, rec.id, "succeeded", reason="post-copy committed"
                )
                await asyncio.to_thread(self._after_commit, inc)
                return "kept: the source committed"
            # Whether every page arrived is unknown now: the paused source is the copy.
            with contextlib.suppress(DockerError):
                if inc.container_id:
                    await asyncio.to_thread(self.adapter.kill, inc.container_id)
            await self._discard(inc, "post-copy interrupted by an agent restart; source resumes")
            return "removed: post-copy interrupted"
        if running and rec.phase in (T_RESTORE, T_RESTORED):
            procs = await asyncio.to_thread(self.procs.processes, str(inc.container_id))
            continued = bool(procs) and not any(p.state in ("T", "t") for p in procs)
            if continued and rec.phase == T_RESTORE:
                # Running, though no commit can have let it: the source never heard "held"
                # (that answer follows the phase "restored"), and may have resumed.
                with contextlib.suppress(DockerError):
                    await asyncio.to_thread(self.adapter.kill, str(inc.container_id))
                await self._discard(inc, "the restored copy ran before any commit; removed")
                return "removed: ran before any commit"
            if continued:
                # Continued, then the agent died before journalling it: only a commit does that.
                await to_thread_to_the_end(
                    self.journal.finish,
                    rec.id,
                    "succeeded",
                    reason="continued; confirmed at reconcile",
                )
                if await self.fills.refill_if_unconfirmed(inc):
                    return "kept: running here; its pages were filled in again"
                await asyncio.to_thread(self._after_commit, inc)
                return "kept: running here"
            if rec.phase == T_RESTORE:
                # Held, but the source never heard so: it cannot have committed, and has
                # rolled back or will. Dropped now, as the silence check would.
                await self._discard(inc, "restored but never reported held; removed at restart")
                return "removed: never reported held"
            outcome = await self.resolve_held(rec.id)
            if outcome == "waiting":
                raise RuntimeError(
                    f"holding {rec.container_name} stopped: source {rec.source} has not said "
                    "whether it committed"
                )
            return outcome
        await self._discard(inc, "half-made container removed at agent start")
        return "removed half-made container"


def _page_bytes(checkpoint_dir: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_dir.glob("pages-*.img"))
