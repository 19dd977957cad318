"""Replaying a timeline of signals, events and inventory through the engine (``ferry test-policy``).

A timeline file::

    step: 1s                 # evaluation interval (default 1s)
    until: 10m               # last evaluation (default: last step + 1m)
    limits: {max_concurrent_migrations: 1, max_migrations: 10, window: 1h}
    containers: [{name: web, image: nginx, labels: {ferry.migrate: "true"}, memory: 200MiB}]
    peers: [{name: node-b, cpu_pressure: 10}]
    steps:
      - at: 0s
        signals: {psi.cpu.some.avg10: 80}          # null removes a signal
      - at: 5s
        events: [{action: oom, container: web, count: 3}]
        containers: [...]                          # replaces the inventory
        peers: [...]                               # replaces the peer list
    expect:                                        # like promtool's rule tests
      - {policy: cpu, event: firing, at: 2m}       # a transition (at optional)
      - {policy: cpu, event: skipped, reason: dry_run, containers: [web], targets: [node-b]}
      - {policy: cpu, state: cooling_down, at: 3m} # the state right after that tick
      - {policy: drain, event: firing, count: 0}   # never

The engine runs on a manual clock in dry-run: no action is ever executed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from agent.durations import Duration, format_duration
from agent.errors import InputError, problems_from_validation
from agent.input_bounds import DAY, count_in, duration_in
from agent.model import ContainerInfo, DockerEvent, PeerHealth
from agent.policy.actions import ActionRegistry, DryRunAction, LogAction
from agent.policy.engine import EngineLimits, PolicyEngine
from agent.policy.models import Policy
from agent.policy.sim import ManualClock, MemorySignals, StaticPeers
from agent.policy.state import Status, Transition
from agent.yaml_input import read_yaml

# Ticks a replay may take: each is a full engine evaluation, so 1ms steps over a
# month would run for hours instead of failing fast.
MAX_EVALUATIONS = 200_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContainerSpec(_Model):
    name: str
    id: str | None = None
    image: str = ""
    labels: dict[str, str] = {}
    state: str = "running"
    memory: ByteSize = ByteSize(0)

    def info(self) -> ContainerInfo:
        return ContainerInfo(
            id=self.id or self.name,
            name=self.name,
            image=self.image,
            image_id="",
            labels=dict(self.labels),
            state=self.state,
            memory_bytes=int(self.memory),
        )


class PeerSpec(_Model):
    name: str
    reachable: bool = True
    draining: bool = False
    overloaded: bool = False
    load1: float = 0.0
    cpu_pressure: float = 0.0
    mem_available_bytes: ByteSize = ByteSize(0)
    running_containers: int = 0
    weight: float = 1.0

    def health(self) -> PeerHealth:
        return PeerHealth(
            name=self.name,
            reachable=self.reachable,
            draining=self.draining,
            overloaded=self.overloaded,
            load1=self.load1,
            cpu_pressure=self.cpu_pressure,
            mem_available_bytes=int(self.mem_available_bytes),
            running_containers=self.running_containers,
            weight=self.weight,
        )


class EventSpec(_Model):
    action: str
    container: str = ""
    count: Annotated[int, count_in(1, 100_000)] = 1  # one event each: bounded
    attributes: dict[str, str] = {}


class StepSpec(_Model):
    at: Duration
    signals: dict[str, float | None] = {}
    events: list[EventSpec] = []
    containers: list[ContainerSpec] | None = None
    peers: list[PeerSpec] | None = None


class LimitsSpec(_Model):
    max_concurrent_migrations: Annotated[int, count_in(1, 64)] = 1
    max_migrations: Annotated[int, count_in(1, 100_000)] = 10
    window: Annotated[Duration, duration_in(0, 366 * DAY, lo_open=True)] = 3600.0


class Expectation(_Model):
    policy: str
    event: str | None = None
    state: Status | None = None
    at: Duration | None = None
    reason: str | None = None  # skip reason, for event: skipped
    containers: list[str] | None = None
    targets: list[str] | None = None
    count: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> Expectation:
        if (self.event is None) == (self.state is None):
            raise ValueError("give exactly one of `event` or `state`")
        if self.state is not None and self.at is None:
            raise ValueError("a `state` expectation needs `at`")
        return self

    def describe(self) -> str:
        parts = [f"policy {self.policy}"]
        parts.append(f"event {self.event}" if self.event else f"state {self.state}")
        if self.at is not None:
            parts.append(f"at {format_duration(self.at)}")
        for key in ("reason", "containers", "targets", "count"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key} {value}")
        return ", ".join(parts)


class Timeline(_Model):
    step: Duration = Field(default=1.0, gt=0)
    until: Duration | None = None
    limits: LimitsSpec = LimitsSpec()
    containers: list[ContainerSpec] = []
    peers: list[PeerSpec] = []
    steps: list[StepSpec] = Field(min_length=1)
    expect: list[Expectation] = []

    def end(self) -> float:
        return self.until if self.until is not None else max(s.at for s in self.steps) + 60.0

    @model_validator(mode="after")
    def _bounded(self) -> Timeline:
        ticks = self.end() / self.step
        if ticks > MAX_EVALUATIONS:
            raise ValueError(
                f"{format_duration(self.end())} in steps of {format_duration(self.step)} is "
                f"{ticks:.0f} evaluations; at most {MAX_EVALUATIONS}: use a longer step"
            )
        return self


def load_timeline(path: str | Path) -> Timeline:
    shown = str(path)
    # JSON is YAML, so .json timelines load too; recorded ones may be large.
    raw = read_yaml(Path(path), shown, max_bytes=32 * 1024 * 1024, max_nodes=5_000_000)
    if not isinstance(raw, dict):
        raise InputError.single(shown, "", "expected a mapping with `steps:`")
    try:
        return Timeline.model_validate(raw)
    except ValidationError as exc:
        raise InputError(problems_from_validation(shown, exc)) from None


@dataclass
class TimelineResult:
    transitions: list[Transition] = field(default_factory=list)  # `at` = seconds since start
    states: dict[float, dict[str, Status]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _registry(policies: Sequence[Policy], needs_target: Mapping[str, bool]) -> ActionRegistry:
    registry = ActionRegistry([LogAction()])
    for name in sorted({p.action for p in policies} - {"log"}):
        registry.register(DryRunAction(name, needs_target.get(name, True)))
    return registry


class QuietLogger:
    """Drops every log call; test-policy prints the transitions itself."""

    def _drop(self, *args: Any, **kwargs: Any) -> None:
        return None

    debug = info = warning = error = exception = _drop


async def run_timeline(
    timeline: Timeline,
    policies: Sequence[Policy],
    host: str = "this-host",
    logger: Any = None,
    needs_target: Mapping[str, bool] | None = None,
) -> TimelineResult:
    clock = ManualClock()
    signals = MemorySignals()
    peers = StaticPeers()
    signals.inventory = [c.info() for c in timeline.containers]
    peers.current = [p.health() for p in timeline.peers]
    lim = timeline.limits
    engine = PolicyEngine(
        list(policies),
        _registry(policies, needs_target or {}),
        signals,
        peers,
        clock,
        global_dry_run=True,
        limits=EngineLimits(lim.max_concurrent_migrations, lim.max_migrations, lim.window),
        host=host,
        logger=logger if logger is not None else QuietLogger(),
    )
    result = TimelineResult()
    steps = sorted(timeline.steps, key=lambda s: s.at)
    end = timeline.end()
    n = 0
    try:
        while True:
            # Multiply rather than accumulate so 0.1s steps do not drift.
            now = round(n * timeline.step, 6)
            if now > end:
                break
            clock.set(now)
            while steps and steps[0].at <= now:
                _apply(steps.pop(0), signals, peers, clock.time())
            result.transitions.extend(await engine.tick())
            result.states[now] = {s.name: s.status for s in engine.states()}
            n += 1
    finally:
        await engine.aclose()
    result.failures = check(timeline.expect, result)
    return result


def _apply(step: StepSpec, signals: MemorySignals, peers: StaticPeers, wall: float) -> None:
    for name, value in step.signals.items():
        signals.set(name, value)
    if step.containers is not None:
        signals.inventory = [c.info() for c in step.containers]
    if step.peers is not None:
        peers.current = [p.health() for p in step.peers]
    by_name = {c.name: c.id for c in signals.inventory}
    for ev in step.events:
        for _ in range(ev.count):
            signals.add_event(
                DockerEvent(
                    action=ev.action,
                    container_id=by_name.get(ev.container, ev.container),
                    name=ev.container,
                    ts=wall,
                    attributes=dict(ev.attributes),
                )
            )


def _matches(exp: Expectation, t: Transition) -> bool:
    if t.policy != exp.policy or t.event != exp.event:
        return False
    if exp.at is not None and abs(t.at - exp.at) > 1e-6:
        return False
    if exp.reason is not None and t.skip_reason != exp.reason:
        return False
    if exp.containers is not None and list(t.containers) != exp.containers:
        return False
    return exp.targets is None or list(t.targets) == exp.targets


def check(expectations: Sequence[Expectation], result: TimelineResult) -> list[str]:
    """One message per expectation not met."""
    failures = []
    for i, exp in enumerate(expectations):
        label = f"expect[{i}] ({exp.describe()})"
        if exp.state is not None:
            assert exp.at is not None  # enforced by Expectation._shape
            times = [t for t in result.states if t <= exp.at + 1e-6]
            if not times:
                failures.append(f"{label}: the timeline never reached that time")
                continue
            got = result.states[max(times)].get(exp.policy)
            if got is None:
                failures.append(f"{label}: no policy named {exp.policy!r} was loaded")
            elif got != exp.state:
                failures.append(f"{label}: state was {got}")
            continue
        found = [t for t in result.transitions if _matches(exp, t)]
        if exp.count is not None and len(found) != exp.count:
            when = ", ".join(format_duration(t.at) for t in found)
            failures.append(
                f"{label}: happened {len(found)} time(s){f' (at {when})' if when else ''}"
            )
        elif exp.count is None and not found:
            failures.append(f"{label}: did not happen{_nearest(exp, result)}")
    return failures


def _nearest(exp: Expectation, result: TimelineResult) -> str:
    same = [t for t in result.transitions if t.policy == exp.policy and t.event == exp.event]
    if not same:
        return ""
    shown = "; ".join(describe_transition(t) for t in same[:3])
    return f" (saw {exp.event} at: {shown})"


def describe_transition(t: Transition) -> str:
    """One human line: time, policy, event, what and where, why."""
    moves = ""
    if t.containers and t.targets:
        moves = " " + ", ".join(f"{c}->{p}" for c, p in zip(t.containers, t.targets, strict=False))
    elif t.containers:
        moves = " " + ", ".join(t.containers)
    why = f" [{t.skip_reason}]" if t.skip_reason else ""
    return f"{format_duration(t.at):>8}  {t.policy}  {t.event}{why}{moves}: {t.reason}"
