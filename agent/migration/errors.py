"""What a migration raises: refused before the freeze, failed after it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.migration.report import MigrationReport


class MigrationError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report: MigrationReport | None = None  # once a migration was under way


class MigrationRefused(MigrationError):
    """Refused before the freeze: the container was never touched and is still running.

    `bad_input`: the request itself was wrong (unknown container or peer).
    """

    rolled_back = False

    def __init__(self, reason: str, bad_input: bool = False) -> None:
        super().__init__(reason)
        self.bad_input = bad_input
        # The eligibility check's result when it refused (agent.migration.eligibility).
        self.eligibility: Any = None


class MigrationFailed(MigrationError):
    """Failed after the freeze. `rolled_back` says whether it runs on the source again.

    `in_doubt`: the source decided to commit but cannot learn whether the target
    runs the container; nothing runs here and every byte of state is kept.
    """

    def __init__(
        self,
        reason: str,
        rolled_back: bool = True,
        in_doubt: bool = False,
        state_lost: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.rolled_back = rolled_back and not in_doubt and not state_lost
        self.in_doubt = in_doubt
        # The sentence saying the container's state is lost (never "rolled back" then).
        self.state_lost = state_lost

    def __str__(self) -> str:
        if self.state_lost:
            suffix = self.state_lost
        elif self.in_doubt:
            suffix = "IN DOUBT: running on neither side until resolved"
        elif self.rolled_back:
            suffix = "rolled back, running on the source"
        else:
            suffix = "NOT rolled back"
        return f"{self.reason} ({suffix})"
