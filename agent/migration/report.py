"""Per-migration report and progress events.

The report is recorded in the journal for every migration, whoever started
it, and is what `ferry migrate` prints at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.model import Clock

# Phases of a migration on the source, in order; the journal records each one
# before it starts. "rollback" replaces the later ones when something fails.
PREPARE = "prepare"
PRESTAGE = "prestage"
FREEZE = "freeze"
TRANSFER = "transfer"
RESTORE = "restore"
POSTCOPY = "postcopy"  # post-copy: running on the target, pages still coming
COMMIT = "commit"
FINISH = "finish"
ROLLBACK = "rollback"
SOURCE_PHASES = (PREPARE, PRESTAGE, FREEZE, TRANSFER, RESTORE, COMMIT, FINISH)
FROZEN_PHASES = frozenset({FREEZE, TRANSFER, RESTORE, POSTCOPY, COMMIT, FINISH, ROLLBACK})

# The source's decision, journalled before it acts on it or tells the target.
DECISION_COMMIT = "commit"
DECISION_ROLLBACK = "rollback"
DECISION_POSTCOPY = "postcopy"  # the target runs provisionally; the paused source decides
IN_DOUBT = "in_doubt"  # journal outcome: committed, but the target's copy is unconfirmed


@dataclass
class ProgressEvent:
    migration_id: str
    phase: str
    message: str = ""
    bytes_done: int = 0
    bytes_total: int | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class MigrationReport:
    migration_id: str
    container: str
    source: str
    target: str
    outcome: str = "running"  # succeeded | refused | rolled_back | failed | in_doubt
    reason: str | None = None
    downtime_s: float | None = None  # freeze start -> running on the target
    total_s: float = 0.0
    bytes_state: int = 0  # compressed checkpoint + writable layer (+ volumes) sent
    bytes_state_raw: int = 0
    bytes_image: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    target_container_id: str | None = None
    image_shipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    # Set when the container ended up without its state anywhere (restarted from scratch,
    # or left stopped because its checkpoint could not be restored): the one sentence to say.
    state_lost: str | None = None

    @property
    def bytes_moved(self) -> int:
        return self.bytes_state + self.bytes_image

    @property
    def rolled_back(self) -> bool:
        return self.outcome == "rolled_back"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bytes_moved"] = self.bytes_moved
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class PhaseTimer:
    """Times phases with the injected clock and feeds the report."""

    def __init__(self, report: MigrationReport, clock: Clock) -> None:
        self.report = report
        self.clock = clock
        self.started = clock.monotonic()

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.started

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.clock.monotonic()
        try:
            yield
        finally:
            self.report.phases[name] = round(
                self.report.phases.get(name, 0.0) + self.clock.monotonic() - t0, 4
            )

    def finish(self) -> None:
        self.report.total_s = round(self.elapsed(), 4)
