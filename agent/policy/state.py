"""Per-policy state records and the transitions the engine reports."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.policy.models import Policy

Status = Literal["ok", "pending", "firing", "cooling_down"]

# Transition events; each is logged as "policy.<event>".
PENDING = "pending"
FIRING = "firing"
CLEARED = "cleared"
SELECTED = "containers_selected"
TARGET = "target_chosen"
SKIPPED = "skipped"
ACTING = "acting"
DONE = "action_done"
FAILED = "action_failed"


@dataclass(frozen=True)
class Transition:
    policy: str
    event: str
    at: float  # clock.monotonic() when it happened
    status: Status
    reason: str
    containers: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    dry_run: bool = False
    skip_reason: str | None = None  # for "skipped": dry_run, cooldown, rate_cap, ...

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "event": self.event,
            "status": self.status,
            "reason": self.reason,
        }
        if self.containers:
            out["containers"] = list(self.containers)
        if self.targets:
            out["targets"] = list(self.targets)
        if self.skip_reason:
            out["skip_reason"] = self.skip_reason
        if self.dry_run:
            out["dry_run"] = True
        return out


@dataclass
class PolicyState:
    """Everything the pipeline remembers about one policy between ticks."""

    policy: Policy
    active: bool = False  # firing, including cooling down
    pending_since: float | None = None
    status_since: float = 0.0
    clear_since: float | None = None  # when the clear condition started holding
    cooldown_until: float = -math.inf
    action_starts: deque[float] = field(default_factory=deque)
    last_started: float = -math.inf
    in_flight: int = 0
    last_skip: str | None = None  # so a standing skip is logged once, not every tick
    last_status: Status = "ok"
    actions: int = 0
    last_reason: str = ""
    last_result: str | None = None

    def status(self, now: float) -> Status:
        if self.active:
            return "cooling_down" if now < self.cooldown_until else "firing"
        return "pending" if self.pending_since is not None else "ok"


@dataclass
class PolicyStatus:
    """A snapshot for `ferry status` and metrics."""

    name: str
    status: Status
    active: bool  # firing or cooling down: the policy's condition holds (with hysteresis)
    since: float  # clock.monotonic() of the last status change
    actions: int
    in_flight: int
    dry_run: bool
    summary: str
    last_reason: str
    last_result: str | None
