"""The policy pipeline, a chain of small steps in the style of structlog's processors.

Each tick, for each policy, an `Evaluation` passes through::

    evaluate -> hold -> hysteresis -> gates -> choose -> place -> dry_run_gate -> commit

A step returns the evaluation to continue or None to stop, like a structlog
processor raising DropEvent. Every step reads and updates only the policy's
`PolicyState` and the shared `GlobalLimits`, so each is testable alone.

Semantics:

- ``hold``: ``when`` must be true for ``for`` before the policy fires
  (pending meanwhile; any tick where it is not true resets the hold).
- ``hysteresis``: a firing policy clears only when ``clear_when`` is true
  (or, without ``clear_when``, when ``when`` is false) and has stayed so for
  ``keep_firing_for``. An unknown value (missing signal) never clears.
- while firing, the policy acts whenever cooldown, its ``rate_limit``, its
  ``max_concurrent`` and the global caps allow; not during the
  ``keep_firing_for`` grace, when the clear condition already holds.
- dry-run decisions count towards the policy's own cooldown and rate limit
  (so a dry run shows what a live run would do), and towards the global caps
  only when the whole engine is in dry-run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from agent.durations import format_duration
from agent.model import ContainerInfo, Decision, PeerDirectory, SignalView
from agent.policy import selectors
from agent.policy.conditions import EvalContext
from agent.policy.placement import place
from agent.policy.state import (
    ACTING,
    CLEARED,
    FIRING,
    PENDING,
    SELECTED,
    SKIPPED,
    TARGET,
    PolicyState,
    Transition,
)


@dataclass
class GlobalLimits:
    """Caps shared by all policies, counting only actions that migrate containers."""

    max_concurrent: int = 1  # migrating actions in flight at once
    max_migrations: int = 10  # containers started per window
    window: float = 3600.0
    in_flight: int = 0
    starts: deque[tuple[float, int]] = field(default_factory=deque)
    busy: set[str] = field(default_factory=set)  # container ids an action is working on
    # Container ids known not to move until something changes (agent.service.movability).
    unmovable: Callable[[], Collection[str]] = lambda: ()

    def budget(self, now: float) -> int:
        while self.starts and self.starts[0][0] <= now - self.window:
            self.starts.popleft()
        return self.max_migrations - sum(n for _, n in self.starts)

    def record(self, now: float, count: int) -> None:
        self.starts.append((now, count))


@dataclass
class Evaluation:
    state: PolicyState
    now: float  # monotonic
    wall: float
    signals: SignalView
    peers: PeerDirectory
    limits: GlobalLimits
    needs_target: bool = True
    engine_dry_run: bool = False
    host: str | None = None
    when: bool | None = None
    clear: bool | None = None
    budget: int | None = None
    containers: list[ContainerInfo] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    unplaced_why: dict[str, str] = field(default_factory=dict)
    decision: Decision | None = None
    transitions: list[Transition] = field(default_factory=list)
    staged: list[Transition] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.engine_dry_run or self.state.policy.dry_run

    def transition(
        self,
        event: str,
        reason: str,
        skip_reason: str | None = None,
        containers: Collection[str] = (),
        targets: Collection[str] = (),
    ) -> Transition:
        self.state.last_reason = reason
        return Transition(
            policy=self.state.policy.name,
            event=event,
            at=self.now,
            status=self.state.status(self.now),
            reason=reason,
            containers=tuple(containers),
            targets=tuple(targets),
            dry_run=self.dry_run,
            skip_reason=skip_reason,
        )

    def emit(
        self,
        event: str,
        reason: str,
        skip_reason: str | None = None,
        containers: Collection[str] = (),
        targets: Collection[str] = (),
    ) -> None:
        self.transitions.append(self.transition(event, reason, skip_reason, containers, targets))

    def stage(
        self,
        event: str,
        reason: str,
        containers: Collection[str] = (),
        targets: Collection[str] = (),
    ) -> None:
        """Held back until the pipeline acts or reports a new skip, so a standing
        condition does not log the same selection every tick."""
        self.staged.append(self.transition(event, reason, None, containers, targets))

    def flush(self) -> None:
        self.transitions.extend(self.staged)
        self.staged.clear()

    def skip(self, why: str, reason: str) -> None:
        if self.state.last_skip != why:
            self.state.last_skip = why
            self.flush()
            self.emit(
                SKIPPED, reason, skip_reason=why, containers=[c.name for c in self.containers]
            )
        self.staged.clear()


Step = Callable[[Evaluation], "Evaluation | None"]


def evaluate(ev: Evaluation) -> Evaluation | None:
    policy = ev.state.policy
    ctx = EvalContext(ev.signals, ev.wall)
    ev.when = policy.when.evaluate(ctx)
    ev.clear = policy.clear_when.evaluate(ctx) if policy.clear_when is not None else None
    return ev


def hold(ev: Evaluation) -> Evaluation | None:
    st = ev.state
    policy = st.policy
    if st.active:
        return ev
    if ev.when is not True:
        if st.pending_since is not None:
            st.pending_since = None
            ev.emit(CLEARED, f"{policy.when.describe()} stopped holding before `for` elapsed")
        return None
    if st.pending_since is None:
        st.pending_since = ev.now
        if policy.for_ > 0:
            ev.emit(
                PENDING,
                f"{policy.when.describe()}; fires if it holds for {format_duration(policy.for_)}",
            )
    if ev.now - st.pending_since < policy.for_:
        return None
    st.pending_since = None
    st.active = True
    st.clear_since = None
    st.last_skip = None
    held = f" for {format_duration(policy.for_)}" if policy.for_ else ""
    ev.emit(FIRING, f"{policy.when.describe()}{held}")
    return ev


def hysteresis(ev: Evaluation) -> Evaluation | None:
    st = ev.state
    policy = st.policy
    if policy.clear_when is not None:
        clear = ev.clear is True and ev.when is not True
        cause = f"{policy.clear_when.describe()}"
    else:
        clear = ev.when is False
        cause = f"no longer {policy.when.describe()}"
    if not clear:
        st.clear_since = None
        return ev
    if st.clear_since is None:
        st.clear_since = ev.now
    if ev.now - st.clear_since >= policy.keep_firing_for:
        st.active = False
        st.clear_since = None
        st.last_skip = None
        kept = f" for {format_duration(policy.keep_firing_for)}" if policy.keep_firing_for else ""
        ev.emit(CLEARED, f"{cause}{kept}")
    return None  # clear condition holds: no new actions, even inside keep_firing_for


def gates(ev: Evaluation) -> Evaluation | None:
    st = ev.state
    policy = st.policy
    if ev.now < st.cooldown_until:
        left = format_duration(round(st.cooldown_until - ev.now, 3))
        ev.skip("cooldown", f"cooldown {format_duration(policy.cooldown)}, {left} left")
        return None
    if policy.rate_limit is not None:
        cap = policy.rate_limit
        while st.action_starts and st.action_starts[0] <= ev.now - cap.per:
            st.action_starts.popleft()
        if len(st.action_starts) >= cap.max:
            ev.skip("rate_cap", f"policy rate limit {cap.max} per {format_duration(cap.per)}")
            return None
    if st.in_flight >= policy.max_concurrent:
        ev.skip("concurrency", f"{st.in_flight} action(s) of this policy still running")
        return None
    if ev.needs_target:
        lim = ev.limits
        if lim.in_flight >= lim.max_concurrent:
            ev.skip("concurrency", f"global cap: {lim.in_flight} migrating action(s) running")
            return None
        ev.budget = lim.budget(ev.now)
        if ev.budget <= 0:
            ev.skip(
                "rate_cap",
                f"global cap {lim.max_migrations} migrations per {format_duration(lim.window)}",
            )
            return None
    return ev


def choose(ev: Evaluation) -> Evaluation | None:
    policy = ev.state.policy
    inventory = ev.signals.containers()
    unmovable = set(ev.limits.unmovable()) if ev.needs_target else set()
    ev.containers = selectors.pick(policy, inventory, ev.limits.busy | unmovable, ev.budget)
    if not ev.containers:
        opt = " opted-in" if policy.select.require_opt_in else ""
        held = sum(1 for c in inventory if c.id in unmovable)
        also = f" ({held} cannot move: see `ferry status`)" if held else ""
        ev.skip("no_containers", f"no running{opt} container matches the selector{also}")
        return None
    names = [c.name for c in ev.containers]
    capped = ""
    cap = ev.budget
    if cap is not None and len(names) == cap and (policy.count is None or cap < policy.count):
        capped = f" (global cap allows {cap} now)"
    ev.stage(SELECTED, f"{len(names)} container(s), order {policy.order}{capped}", containers=names)
    return ev


def place_step(ev: Evaluation) -> Evaluation | None:
    policy = ev.state.policy
    if not ev.needs_target:
        return ev
    result = place(
        policy.targets.placement,
        ev.containers,
        ev.peers.peers(),
        policy.targets.peers,
        ev.host,
    )
    if not result.assigned:
        why = ", ".join(f"{p}: {r}" for p, r in sorted(result.rejected.items()))
        detail = f" ({why})" if why else " (no peers known)"
        ev.skip("no_target", f"no eligible peer for {len(ev.containers)} container(s){detail}")
        return None
    ev.containers = [c for c, _ in result.assigned]
    ev.targets = [peer for _, peer in result.assigned]
    ev.unplaced = [c.name for c in result.unplaced]
    ev.unplaced_why = dict(result.why)
    extra = f"; no room for {', '.join(ev.unplaced)}" if ev.unplaced else ""
    ev.stage(
        TARGET,
        f"placement {policy.targets.placement}{extra}",
        containers=[c.name for c in ev.containers],
        targets=ev.targets,
    )
    return ev


def _record(ev: Evaluation, simulated: bool) -> None:
    st = ev.state
    st.cooldown_until = ev.now + st.policy.cooldown
    st.action_starts.append(ev.now)
    st.last_started = ev.now
    st.actions += 1
    st.last_skip = None
    if ev.needs_target and (not simulated or ev.engine_dry_run):
        ev.limits.record(ev.now, len(ev.containers))


def _decision(ev: Evaluation) -> Decision:
    policy = ev.state.policy
    return Decision(
        policy=policy.name,
        action=policy.action,
        containers=list(ev.containers),
        targets=list(ev.targets),
        reason=policy.summary(),
        dry_run=ev.dry_run,
        details={"unplaced": ev.unplaced, "unplaced_why": ev.unplaced_why} if ev.unplaced else {},
    )


def dry_run_gate(ev: Evaluation) -> Evaluation | None:
    if not ev.dry_run:
        return ev
    _record(ev, simulated=True)
    ev.flush()
    policy = ev.state.policy
    ev.emit(
        SKIPPED,
        f"dry run: would {policy.action} {len(ev.containers)} container(s)",
        skip_reason="dry_run",
        containers=[c.name for c in ev.containers],
        targets=ev.targets,
    )
    ev.state.last_skip = None  # every would-be action is reported, like a real one
    return None


def commit(ev: Evaluation) -> Evaluation | None:
    """Claim the containers and slots; the engine starts the action from `ev.decision`."""
    _record(ev, simulated=False)
    st = ev.state
    st.in_flight += 1
    if ev.needs_target:
        ev.limits.in_flight += 1
    ev.limits.busy.update(c.id for c in ev.containers)
    ev.decision = _decision(ev)
    ev.flush()
    ev.emit(
        ACTING,
        f"{st.policy.action} {len(ev.containers)} container(s)",
        containers=[c.name for c in ev.containers],
        targets=ev.targets,
    )
    return ev


PIPELINE: tuple[Step, ...] = (
    evaluate,
    hold,
    hysteresis,
    gates,
    choose,
    place_step,
    dry_run_gate,
    commit,
)


def run(ev: Evaluation, steps: tuple[Step, ...] = PIPELINE) -> Evaluation:
    current: Evaluation | None = ev
    for step in steps:
        current = step(ev)
        if current is None:
            break
    return ev
