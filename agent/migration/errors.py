"""What a migration raises: refused before the freeze, failed after it."""

from __future__ import annotations

from typing import Any


class MigrationError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report: Any = None  # the MigrationReport, once a migration was under way


class MigrationRefused(MigrationError):
    """Refused before the freeze: the container was never touched and is still running.

    `bad_input`: the request itself was wrong (unknown container or peer).
    """

    rolled_back = False

    def __init__(self, reason: str, bad_input: bool = False) -> None:
        super().__init__(reason)
        self.bad_input = bad_input


class MigrationFailed(MigrationError):
    """Failed after the freeze. `rolled_back` says whether it runs on the source again."""

    def __init__(self, reason: str, rolled_back: bool = True) -> None:
        super().__init__(reason)
        self.rolled_back = rolled_back

    def __str__(self) -> str:
        suffix = "rolled back, running on the source" if self.rolled_back else "NOT rolled back"
        return f"{self.reason} ({suffix})"
