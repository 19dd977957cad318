"""PolicyEngine: runs every policy through the pipeline once per tick and starts actions.

The runtime calls ``await engine.tick()`` every second and right away when a
marker changes. Actions run as background tasks so a long migration does not
stop evaluation; their results are reported as transitions on a later tick.
``await engine.aclose()`` (shutdown) cancels them; ``wait_idle()`` waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from agent.errors import InputError, Problem
from agent.model import Action, ActionResult, Clock, Decision, PeerDirectory, SignalView
from agent.policy import pipeline
from agent.policy.actions import ActionRegistry, needs_target
from agent.policy.models import Policy
from agent.policy.state import DONE, FAILED, PolicyState, PolicyStatus, Transition

log = structlog.get_logger("ferry.policy")


@dataclass(frozen=True)
class EngineLimits:
    """Caps shared by all policies (from the config's ``limits`` section)."""

    max_concurrent_migrations: int = 1
    max_migrations: int = 10
    window: float = 3600.0

    @classmethod
    def from_config(cls, limits: object) -> EngineLimits:
        return cls(
            max_concurrent_migrations=int(getattr(limits, "max_concurrent_migrations", 1)),
            max_migrations=int(getattr(limits, "max_migrations", 10)),
            window=float(getattr(limits, "window", 3600.0)),
        )


class PolicyEngine:
    def __init__(
        self,
        policies: Sequence[Policy],
        actions: ActionRegistry,
        signals: SignalView,
        peers: PeerDirectory,
        clock: Clock,
        global_dry_run: bool = False,
        limits: EngineLimits | None = None,
        host: str | None = None,
        logger: Any = None,
        unmovable: Callable[[], Collection[str]] | None = None,
    ) -> None:
        missing = [p for p in policies if p.action not in actions]
        if missing:
            raise InputError(
                Problem(
                    "policies",
                    f"policies[{p.name}].action",
                    f"no action named {p.action!r} is registered "
                    f"(registered: {', '.join(actions.names())})",
                )
                for p in missing
            )
        lim = limits or EngineLimits()
        self._actions = actions
        self._signals = signals
        self._peers = peers
        self._clock = clock
        self._dry_run = global_dry_run
        self._host = host
        self._log = logger if logger is not None else log
        self._limits = pipeline.GlobalLimits(
            max_concurrent=lim.max_concurrent_migrations,
            max_migrations=lim.max_migrations,
            window=lim.window,
        )
        if unmovable is not None:
            self._limits.unmovable = unmovable
        now = clock.monotonic()
        self._states = [PolicyState(policy=p, status_since=now) for p in policies]
        self._tasks: set[asyncio.Task[ActionResult]] = set()
        self._finished: list[Transition] = []

    @property
    def policies(self) -> list[Policy]:
        return [s.policy for s in self._states]

    async def tick(self) -> list[Transition]:
        """Evaluate every policy once; start the actions that are due."""
        now = self._clock.monotonic()
        wall = self._clock.time()
        out, self._finished = self._finished, []
        # Least recently acted first, so one busy policy cannot keep the shared slots to itself.
        for st in sorted(self._states, key=lambda s: s.last_started):
            action = self._actions.get(st.policy.action)
            ev = pipeline.Evaluation(
                state=st,
                now=now,
                wall=wall,
                signals=self._signals,
                peers=self._peers,
                limits=self._limits,
                needs_target=needs_target(action),
                engine_dry_run=self._dry_run,
                host=self._host,
            )
            try:
                pipeline.run(ev)
            except Exception as exc:
                self._log.exception("policy.error", policy=st.policy.name, error=str(exc))
                continue
            out.extend(ev.transitions)
            if ev.decision is not None:
                self._start(st, ev.decision, ev.needs_target)
            status = st.status(now)
            if status != st.last_status:
                st.last_status = status
                st.status_since = now
        for t in out:
            _log(self._log, t)
        return out

    def _start(self, st: PolicyState, decision: Decision, counts_globally: bool) -> None:
        action = self._actions.get(decision.action)
        task = asyncio.create_task(
            _execute(action, decision), name=f"ferry-policy-{st.policy.name}"
        )
        self._tasks.add(task)
        # Bookkeeping lives in the callback, not the coroutine, so it also runs for a
        # task cancelled before it ever started.
        task.add_done_callback(lambda t: self._finish(t, st, decision, counts_globally))

    def _finish(
        self,
        task: asyncio.Task[ActionResult],
        st: PolicyState,
        decision: Decision,
        counts_globally: bool,
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            result = ActionResult(ok=False, message="cancelled at shutdown")
        else:
            result = task.result()  # _execute never raises
        now = self._clock.monotonic()
        st.in_flight -= 1
        if counts_globally:
            self._limits.in_flight -= 1
        self._limits.busy.difference_update(c.id for c in decision.containers)
        # Cooldown counts from the end of an action, so a long migration is not
        # followed at once by another.
        st.cooldown_until = max(st.cooldown_until, now + st.policy.cooldown)
        st.last_result = result.message
        self._finished.append(
            Transition(
                policy=st.policy.name,
                event=DONE if result.ok else FAILED,
                at=now,
                status=st.status(now),
                reason=result.message,
                containers=tuple(c.name for c in decision.containers),
                targets=tuple(decision.targets),
            )
        )

    def states(self) -> list[PolicyStatus]:
        now = self._clock.monotonic()
        return [
            PolicyStatus(
                name=st.policy.name,
                status=st.status(now),
                active=st.active,
                since=st.status_since,
                actions=st.actions,
                in_flight=st.in_flight,
                dry_run=self._dry_run or st.policy.dry_run,
                summary=st.policy.summary(),
                last_reason=st.last_reason,
                last_result=st.last_result,
            )
            for st in self._states
        ]

    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self) -> None:
        """Wait for every running action to finish."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel running actions and wait for them to unwind."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _execute(action: Action, decision: Decision) -> ActionResult:
    try:
        return await action.execute(decision)
    except Exception as exc:  # reported as a failed action, never lost in a task
        return ActionResult(ok=False, message=f"{type(exc).__name__}: {exc}")


def _log(logger: Any, t: Transition) -> None:
    level = "warning" if t.event == FAILED else "info"
    getattr(logger, level)(
        f"policy.{t.event}",
        policy=t.policy,
        status=t.status,
        reason=t.reason,
        **{k: v for k, v in t.to_dict().items() if k in ("containers", "targets", "skip_reason")},
        dry_run=t.dry_run,
    )
