"""The `evacuate` and `move` actions: drive the migration engine for a policy's decision.

The policy engine already chose a target per container; by the time the action
runs (or retries) a peer may have started draining or gone away, so targets
are re-checked against the PeerDirectory and re-placed when needed.

Before a container is frozen, the eligibility check (through `Movability`)
says whether it can move and which peers would take it. A container that
cannot move for a reason that holds until something changes (`--init`, an
address no peer has) is marked *cannot move*: never frozen, never retried, and
left out of policy selection until the container or a peer changes. One that
fails for a passing reason (a peer unreachable, a rollback) stays running here,
listed as *stuck* with the reason, and is retried with exponential backoff
until it moves, disappears, or the operator ends the evacuation (undrain).
Everything is visible through `status()`, which `ferry status` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Literal, Protocol

import structlog

from agent.backoff import Backoff
from agent.migration.eligibility import Eligibility
from agent.migration.errors import MigrationFailed, MigrationRefused
from agent.model import (
    ActionResult,
    Clock,
    ContainerInfo,
    Decision,
    PeerDirectory,
    SystemClock,
    group_of_labels,
)
from agent.policy.placement import peer_rejection, place
from agent.service.movability import Movability

log = structlog.get_logger(__name__)

ItemState = Literal["queued", "in_progress", "done", "stuck", "cannot_move"]
DEFAULT_PLACEMENT = "spread"
RETARGET_TRIES = 5


class Migrator(Protocol):
    """The migration engine's entry point (`MigrationService.migrate`).

    May be a coroutine function or a blocking one (then it runs in a thread).
    Raises MigrationRefused before the freeze (container untouched) or
    MigrationFailed after it (`rolled_back` says if it runs here again).
    """

    def migrate(self, container: str, target: str, progress: Any = None) -> Any: ...


class PolicyTargets(Protocol):
    peers: Any  # "any" or a list of peer names
    placement: str


async def call_migrate(migrator: Migrator, container: str, target: str, progress: Any) -> Any:
    """Await a coroutine `migrate`; run a blocking one in a thread so the loop keeps serving."""
    migrate = migrator.migrate
    if inspect.iscoroutinefunction(migrate):
        return await migrate(container, target, progress=progress)
    result = await asyncio.to_thread(migrate, container, target, progress)
    return await result if inspect.isawaitable(result) else result


PolicyLookup = Callable[[str], PolicyTargets | None]
Listener = Callable[[], None]


@dataclass
class Item:
    container: str
    policy: str
    kind: str  # evacuate | move
    state: ItemState = "queued"
    target: str | None = None
    phase: str | None = None
    reason: str | None = None
    attempts: int = 0
    retry: bool = True
    next_retry: float | None = None  # monotonic
    info: ContainerInfo | None = None
    started_at: float | None = None  # wall clock
    finished_at: float | None = None
    report: dict[str, Any] | None = None

    def view(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "container": self.container,
            "policy": self.policy,
            "action": self.kind,
            "state": self.state,
            "target": self.target,
            "attempts": self.attempts,
        }
        if self.state == "in_progress":
            out["phase"] = self.phase
            out["started_at"] = self.started_at
        if self.state == "cannot_move":
            out["reason"] = self.reason
            out["retry_in_s"] = None  # asked again only when the container or a peer changes
        if self.state == "stuck":
            out["reason"] = self.reason
            out["retry_in_s"] = (
                round(max(self.next_retry - now, 0.0), 1) if self.next_retry is not None else None
            )
        if self.state == "done":
            out["finished_at"] = self.finished_at
            out["report"] = self.report
        return out


def _group_key(item: Item) -> str | None:
    return group_of_labels(item.info.labels if item.info is not None else None)


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if is_dataclass(report) and not isinstance(report, type):
        return asdict(report)
    to_dict = getattr(report, "to_dict", None) or getattr(report, "model_dump", None)
    if callable(to_dict):
        result = to_dict()
        return result if isinstance(result, dict) else {"report": result}
    return {"report": str(report)}


def _classify(exc: Exception) -> tuple[str, bool]:
    """(reason, retry): a refused or rolled-back migration left the container here, running."""
    reason = str(getattr(exc, "reason", "") or exc) or type(exc).__name__
    if isinstance(exc, MigrationRefused):
        if exc.bad_input:
            # Unknown container or peer: asking again will not change the answer.
            return f"refused: {reason}", False
        return f"refused: {reason}", True
    if isinstance(exc, MigrationFailed):
        if exc.state_lost:
            return f"failed: {exc.state_lost}", False
        if exc.rolled_back:
            return f"failed, rolled back: {reason}", True
        # Not rolled back: the container's state needs a human; retrying could make it worse.
        return f"failed, NOT rolled back (see `ferry history`): {reason}", False
    return f"error: {type(exc).__name__}: {reason}", True


class Evacuator:
    """Runs migrations for decisions, at most `concurrency` at a time, and retries stuck ones."""

    def __init__(
        self,
        migrator: Migrator,
        peers: PeerDirectory,
        concurrency: int = 1,
        *,
        host: str | None = None,
        clock: Clock | None = None,
        retry_base: float = 30.0,
        retry_max: float = 600.0,
        retry_jitter: float = 0.5,
        policy_targets: PolicyLookup | None = None,
        inventory: Callable[[], Sequence[ContainerInfo]] | None = None,
        keep_done: int = 50,
        gate: Callable[[], str | None] | None = None,
        gate_retry: float = 2.0,
        movability: Movability | None = None,
    ) -> None:
        self._migrator = migrator
        self._peers = peers
        self._host = host
        self._clock = clock or SystemClock()
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self.concurrency = max(1, concurrency)
        self._retry = Backoff(retry_base, retry_max, jitter=retry_jitter)
        self._policy_targets = policy_targets
        self._inventory = inventory
        # Why evacuations may not start now (the fleet's drain budget), or None.
        self._gate = gate
        self._gate_retry = gate_retry
        self._movability = movability
        self._active: dict[str, Item] = {}  # container -> queued / in_progress / stuck
        self._done: deque[Item] = deque(maxlen=keep_done)
        self._wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ observers

    def add_listener(self, fn: Listener) -> None:
        """Called after every state change (the runtime updates sd_notify STATUS)."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        for fn in self._listeners:
            try:
                fn()
            except Exception:  # a listener's bug must not stop migrations
                log.exception("evacuation.listener_failed")

    def status(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        items = list(self._active.values())
        in_progress = [i.view(now) for i in items if i.state in ("queued", "in_progress")]
        stuck = [i.view(now) for i in items if i.state == "stuck"]
        cannot = [i.view(now) for i in items if i.state == "cannot_move"]
        state = (
            "in_progress"
            if in_progress
            else "stuck"
            if stuck
            else "done"
            if self._done or cannot
            else "idle"
        )
        return {
            "state": state,
            "concurrency": self.concurrency,
            "in_progress": in_progress,
            "stuck": stuck,
            "cannot_move": cannot,
            "done": [i.view(now) for i in self._done],
        }

    def summary(self) -> str:
        s = self.status()
        if s["state"] == "idle":
            return "idle"
        line = f"{len(s['in_progress'])} moving, {len(s['stuck'])} stuck, {len(s['done'])} moved"
        return line + (f", {len(s['cannot_move'])} cannot move" if s["cannot_move"] else "")

    # ------------------------------------------------------------------ execution

    async def execute(self, decision: Decision, kind: str) -> ActionResult:
        per: dict[str, str] = {}
        batch: list[tuple[Item, str | None]] = []
        for idx, container in enumerate(decision.containers):
            current = self._active.get(container.name)
            if current is not None and current.state not in ("stuck", "cannot_move"):
                per[container.name] = f"skipped: already {current.state.replace('_', ' ')}"
                continue
            target = decision.targets[idx] if idx < len(decision.targets) else None
            item = current or Item(container=container.name, policy=decision.policy, kind=kind)
            item.info = container
            batch.append((item, target))
        why = decision.details.get("unplaced_why") or {}
        for name in decision.details.get("unplaced", []) or []:
            if name not in self._active:
                item = Item(container=name, policy=decision.policy, kind=kind)
                self._stick(
                    item, why.get(name) or "no peer has room for it (placement)", retry=True
                )
                per[name] = f"stuck: {item.reason}"

        if decision.dry_run:
            plan = self._resolve_targets(batch, decision.policy)
            for item, target, why in plan:
                per[item.container] = f"dry run: would move to {target}" if target else why
            ok = all(t is not None for _, t, _ in plan)
            return ActionResult(
                ok=ok, message=f"dry run: {len(plan)} container(s)", per_container=per
            )

        for item, _ in batch:
            # A policy firing again for a stuck container is a fresh request: retry now.
            item.kind, item.policy = kind, decision.policy
            item.state, item.reason, item.next_retry = "queued", None, None
            self._active[item.container] = item
        self._changed()
        results = await self._run_batch(batch, decision.policy)
        per.update(results)
        moved = sum(1 for r in results.values() if r.startswith("moved"))
        failed = len(results) - moved
        stuck_extra = sum(1 for v in per.values() if v.startswith("stuck"))
        ok = failed == 0 and stuck_extra == 0
        message = f"{kind}: moved {moved} of {len(per)}"
        cannot = sum(1 for v in per.values() if v.startswith("cannot move"))
        if cannot:
            message += f"; {cannot} cannot move (not retried; see `ferry status`)"
        if len(per) - moved - cannot:
            message += (
                f"; {len(per) - moved - cannot} stuck or skipped (retrying; see `ferry status`)"
            )
        return ActionResult(ok=ok, message=message, per_container=per)

    def _resolve_targets(
        self, batch: Sequence[tuple[Item, str | None]], policy: str
    ) -> list[tuple[Item, str | None, str]]:
        """Keep targets still eligible; re-place the rest over the currently healthy peers."""
        peers = self._peers.peers()
        by_name = {p.name: p for p in peers}
        lookup = self._policy_targets(policy) if self._policy_targets else None
        allowed = lookup.peers if lookup is not None else "any"
        strategy = lookup.placement if lookup is not None else DEFAULT_PLACEMENT
        out: list[tuple[Item, str | None, str]] = []
        replace: list[Item] = []
        for item, proposed in batch:
            peer = by_name.get(proposed) if proposed else None
            if peer is not None and not peer_rejection(peer, allowed, self._host):
                out.append((item, proposed, ""))
            else:
                if proposed:
                    why = peer_rejection(peer, allowed, self._host) if peer else "unknown peer"
                    log.info(
                        "evacuation.replace_target",
                        container=item.container,
                        target=proposed,
                        why=why,
                    )
                replace.append(item)
        if not replace:
            return out
        infos = [i.info or self._lookup(i.container) for i in replace]
        result = place(strategy, infos, peers, allowed, self._host)
        chosen = {id(c): t for c, t in result.assigned}
        rejected = ", ".join(f"{p}: {r}" for p, r in sorted(result.rejected.items()))
        for item, info in zip(replace, infos, strict=True):
            target = chosen.get(id(info))
            if target is not None:
                out.append((item, target, ""))
            elif rejected and len(result.rejected) == len(peers):
                out.append((item, None, f"no eligible peer ({rejected})"))
            elif not peers:
                out.append((item, None, "no peers known"))
            elif id(info) in {id(c) for c in result.unplaced} and info.name in result.why:
                out.append((item, None, result.why[info.name]))
            else:
                out.append((item, None, "no eligible peer has room for it"))
        return out

    def pick_target(self, verdict: Eligibility, policy: str | None = None) -> str | None:
        """Placement over the peers that accept the container (none: None)."""
        accepting = set(verdict.accepting())
        peers = [p for p in self._peers.peers() if p.name in accepting]
        lookup = self._policy_targets(policy) if self._policy_targets and policy else None
        allowed = lookup.peers if lookup is not None else "any"
        strategy = lookup.placement if lookup is not None else DEFAULT_PLACEMENT
        result = place(strategy, [self._lookup(verdict.container)], peers, allowed, self._host)
        return result.assigned[0][1] if result.assigned else None

    async def _eligible_target(self, item: Item, target: str) -> str | None:
        """The target to use after the eligibility check; None when the item was stuck."""
        if self._movability is None:
            return target
        info = item.info or self._lookup(item.container)
        try:
            verdict = await self._movability.verdict(info)
        except MigrationRefused as exc:
            self._stick(item, f"refused: {exc.reason}", retry=not exc.bad_input)
            return None
        except Exception as exc:  # the check itself broke (Docker away): try again later
            self._stick(item, f"error: eligibility check: {type(exc).__name__}: {exc}", True)
            return None
        if not verdict.movable:
            self._refused(item, verdict)
            return None
        if target in verdict.accepting():
            return target
        chosen = self.pick_target(verdict, item.policy)
        if chosen is None:
            self._stick(item, f"no peer that accepts it has room ({verdict.summary()})", True)
        return chosen

    @staticmethod
    def _outcome(item: Item) -> str:
        return str(item.reason) if item.state == "cannot_move" else f"stuck: {item.reason}"

    def _refused(self, item: Item, verdict: Eligibility) -> None:
        if verdict.permanent:
            if self._movability is not None and item.info is not None:
                self._movability.remember(item.info, verdict)
            self._stick(item, f"cannot move: {verdict.summary()}", retry=False)
            item.state = "cannot_move"
            log.warning("evacuation.cannot_move", container=item.container, reason=item.reason)
            self._changed()
        else:
            self._stick(item, f"refused: {verdict.summary()}", retry=True)

    def _lookup(self, name: str) -> ContainerInfo:
        for c in self._inventory() if self._inventory else ():
            if c.name == name:
                return c
        return ContainerInfo(id=name, name=name, image="", image_id="", labels={}, state="running")

    async def _run_batch(
        self, batch: Sequence[tuple[Item, str | None]], policy: str
    ) -> dict[str, str]:
        plan = self._resolve_targets(batch, policy)
        results: dict[str, str] = {}
        jobs = []
        # A group (compose project or ferry.group) moves as one unit with its first
        # member: the engine takes the others along to the same target.
        followers: dict[str, list[Item]] = {}
        leads: dict[str, str] = {}
        for item, target, why in plan:
            group = _group_key(item)
            if group is not None and group in leads:
                followers.setdefault(leads[group], []).append(item)
                continue
            if target is None:
                self._stick(item, why, retry=True)
                results[item.container] = f"stuck: {why}"
                continue
            if group is not None:
                leads[group] = item.container
            jobs.append(self._migrate_one(item, target))
        for name, outcome in await asyncio.gather(*jobs):
            results[name] = outcome
            for item in followers.get(name, []):
                results[item.container] = self._follow(item, name, outcome)
        return results

    def _follow(self, item: Item, lead: str, outcome: str) -> str:
        """A group member's fate is its group's, decided by the lead's migration."""
        if outcome.startswith("moved"):
            item.state, item.phase, item.reason = "done", None, None
            item.finished_at = self._clock.time()
            self._active.pop(item.container, None)
            self._done.append(item)
            self._changed()
            return f"{outcome} (with its group, led by {lead})"
        self._stick(item, f"its group did not move: {outcome}", retry=True)
        return f"stuck: its group did not move (led by {lead})"

    async def _migrate_one(self, item: Item, target: str) -> tuple[str, str]:
        checked = await self._eligible_target(item, target)
        if checked is None:
            return item.container, self._outcome(item)
        target = checked
        item.target = target
        held = self._gate() if self._gate is not None and item.kind == "evacuate" else None
        if held:
            # Waiting for a turn is not a failed attempt: look again soon, no backoff.
            self._stick(item, held, retry=True)
            item.next_retry = self._clock.monotonic() + self._gate_retry
            return item.container, f"stuck: {held}"
        async with self._sem:
            item.state, item.phase = "in_progress", "starting"
            item.attempts += 1
            item.started_at = self._clock.time()
            self._changed()
            log.info(
                "evacuation.migration_started",
                container=item.container,
                target=target,
                policy=item.policy,
                attempt=item.attempts,
            )
            try:
                report = await self._call(item, target)
            except asyncio.CancelledError:
                self._stick(item, "cancelled (agent shutting down)", retry=False)
                raise
            except MigrationRefused as exc:
                if exc.eligibility is not None:
                    self._refused(item, exc.eligibility)
                else:
                    self._stick_failed(item, exc)
                log.warning(
                    "evacuation.migration_refused",
                    container=item.container,
                    target=target,
                    reason=item.reason,
                    will_retry=item.retry,
                )
                return item.container, self._outcome(item)
            except Exception as exc:
                reason, retry = self._stick_failed(item, exc)
                log.warning(
                    "evacuation.migration_failed",
                    container=item.container,
                    target=target,
                    reason=reason,
                    will_retry=retry,
                )
                return item.container, f"stuck: {reason}"
        item.state, item.phase, item.reason = "done", None, None
        item.finished_at = self._clock.time()
        item.report = _report_dict(report)
        self._active.pop(item.container, None)
        self._done.append(item)
        self._changed()
        log.info("evacuation.migration_done", container=item.container, target=target)
        return item.container, f"moved to {target}"

    async def _call(self, item: Item, target: str) -> Any:
        def progress(*args: Any, **kwargs: Any) -> None:
            first = args[0] if args else None
            phase = kwargs.get("phase") or getattr(first, "phase", None) or first
            if phase is not None and str(phase) != item.phase:
                item.phase = str(phase)
                log.debug("evacuation.progress", container=item.container, phase=item.phase)
                self._changed()

        return await call_migrate(self._migrator, item.container, target, progress)

    def _stick_failed(self, item: Item, exc: Exception) -> tuple[str, bool]:
        reason, retry = _classify(exc)
        # The target turned out unsuitable (e.g. it started draining after it was
        # chosen; agent.fleet): place the container again soon, a few times, no backoff.
        again = getattr(exc, "retarget", False) and item.attempts <= RETARGET_TRIES
        if again:
            reason = f"waiting to be placed again ({reason})"
        self._stick(item, reason, retry=retry)
        if again:
            item.next_retry = self._clock.monotonic() + self._gate_retry
        return reason, retry

    def _stick(self, item: Item, reason: str, retry: bool) -> None:
        item.state, item.phase, item.reason, item.retry = "stuck", None, reason, retry
        if retry:
            delay = self._retry.delay_for(item.attempts)
            item.next_retry = self._clock.monotonic() + delay
        else:
            item.next_retry = None
        self._active[item.container] = item
        self._wake.set()
        self._changed()

    # ------------------------------------------------------------------ retries

    def due(self) -> list[Item]:
        now = self._clock.monotonic()
        return [
            i
            for i in self._active.values()
            if i.state == "stuck" and i.retry and i.next_retry is not None and i.next_retry <= now
        ]

    def _take_due(self) -> dict[str, list[tuple[Item, str | None]]]:
        """Claim due items (marked queued at once, so nothing picks them twice), by policy."""
        items = self.due()
        if not items:
            return {}
        if self._inventory is not None:
            present = {c.name: c for c in self._inventory()}
            for item in [i for i in items if i.container not in present]:
                log.info("evacuation.container_gone", container=item.container)
                self._active.pop(item.container, None)
                items.remove(item)
            for item in items:
                item.info = present[item.container]
        by_policy: dict[str, list[tuple[Item, str | None]]] = {}
        for item in items:
            item.state = "queued"
            log.info("evacuation.retry", container=item.container, attempt=item.attempts + 1)
            by_policy.setdefault(item.policy, []).append((item, None))
        self._changed()
        return by_policy

    async def retry_due(self) -> dict[str, str]:
        """Retry every stuck container whose backoff has expired; returns their outcomes."""
        results: dict[str, str] = {}
        for policy, batch in self._take_due().items():
            results.update(await self._run_batch(batch, policy))
        return results

    async def run_retries(self) -> None:
        """Background loop: sleep until the next retry is due (or state changes), then retry.

        Each batch runs as its own task so a long migration does not hold back
        retries that fall due meanwhile. Cancelling the loop cancels them too.
        """
        try:
            while True:
                pending = [
                    i.next_retry
                    for i in self._active.values()
                    if i.state == "stuck" and i.retry and i.next_retry is not None
                ]
                timeout = max(min(pending) - self._clock.monotonic(), 0.0) if pending else None
                self._wake.clear()
                if timeout is None or timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    continue
                for policy, batch in self._take_due().items():
                    task = asyncio.create_task(
                        self._run_batch(batch, policy), name=f"ferry-retry-{policy}"
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._retry_done)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _retry_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("evacuation.retry_failed", error=repr(task.exception()))

    def cancel(self, kind: str | None = None) -> list[str]:
        """Forget stuck items (e.g. on undrain); in-flight migrations finish on their own."""
        dropped = [
            name
            for name, item in self._active.items()
            if item.state in ("stuck", "cannot_move") and (kind is None or item.kind == kind)
        ]
        for name in dropped:
            del self._active[name]
        if dropped:
            log.info("evacuation.cancelled", containers=dropped, kind=kind)
            self._wake.set()
            self._changed()
        return dropped


class EvacuateAction:
    """Move every selected container off this host (a drain or overload evacuation)."""

    name = "evacuate"
    needs_target = True

    def __init__(self, evacuator: Evacuator) -> None:
        self._evacuator = evacuator

    async def execute(self, decision: Decision) -> ActionResult:
        return await self._evacuator.execute(decision, kind="evacuate")


class MoveAction:
    """Move the selected container(s) to the chosen peer(s)."""

    name = "move"
    needs_target = True

    def __init__(self, evacuator: Evacuator) -> None:
        self._evacuator = evacuator

    async def execute(self, decision: Decision) -> ActionResult:
        return await self._evacuator.execute(decision, kind="move")


class EvacuationHooks:
    """`MigrationHooks` for action plugins: the agent's evacuator, looked up when called.

    Plugins are built before the migration engine exists (their parameters are
    checked with the rest of the input), so the evacuator is found late.
    """

    def __init__(self, evacuator: Callable[[], Evacuator | None]) -> None:
        self._evacuator = evacuator

    def _get(self) -> Evacuator:
        evacuator = self._evacuator()
        if evacuator is None:
            raise RuntimeError("the migration service is not running yet")
        return evacuator

    async def evacuate(self, decision: Decision) -> ActionResult:
        return await self._get().execute(decision, kind="evacuate")

    async def move(self, decision: Decision) -> ActionResult:
        return await self._get().execute(decision, kind="move")

    def status(self) -> dict[str, Any]:
        evacuator = self._evacuator()
        return evacuator.status() if evacuator is not None else {}
