"""Durable journal of migrations, so a restarted agent knows what it was in the middle of.

SQLite in the state dir, WAL with synchronous=FULL: a phase recorded before it
starts survives a crash or power loss right after.

Every method blocks until its commit is on disk. The migration engine calls
them through `agent.bridges.to_thread_to_the_end`, so the event loop keeps
serving while SQLite fsyncs, and the engine still acts only on what is durable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_FILE = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    container_id TEXT NOT NULL,
    container_name TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('source', 'target')),
    phase TEXT NOT NULL,
    started REAL NOT NULL,
    updated REAL NOT NULL,
    outcome TEXT,
    reason TEXT,
    report TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS migrations_started ON migrations (started);
CREATE INDEX IF NOT EXISTS migrations_unfinished ON migrations (outcome) WHERE outcome IS NULL;
"""


class JournalError(Exception):
    pass


@dataclass
class MigrationRecord:
    id: str
    container_id: str
    container_name: str
    source: str
    target: str
    role: str  # "source" | "target"
    phase: str
    started: float
    updated: float
    outcome: str | None = None  # None while running; e.g. "succeeded", "rolled_back", "failed"
    reason: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.outcome is not None


_COLUMNS = (
    "id, container_id, container_name, source, target, role, phase, "
    "started, updated, outcome, reason, report"
)


def _record(row: tuple[Any, ...]) -> MigrationRecord:
    values = dict(zip(_COLUMNS.split(", "), row, strict=True))
    values["report"] = json.loads(values["report"] or "{}")
    return MigrationRecord(**values)


class Journal:
    """Thread-safe: one connection, serialised by a lock (writes are small and rare)."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / JOURNAL_FILE
        self._clock = clock
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def begin(
        self,
        migration_id: str,
        *,
        container_id: str,
        container_name: str,
        source: str,
        target: str,
        role: str,
        phase: str = "start",
        report: dict[str, Any] | None = None,
    ) -> MigrationRecord:
        if role not in ("source", "target"):
            raise JournalError(f"role must be source or target, not {role!r}")
        now = self._clock()
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO migrations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,NULL,NULL,?)",
                    (
                        migration_id,
                        container_id,
                        container_name,
                        source,
                        target,
                        role,
                        phase,
                        now,
                        now,
                        json.dumps(report or {}),
                    ),
                )
        except sqlite3.IntegrityError:
            raise JournalError(f"migration {migration_id} is already in the journal") from None
        return self.get(migration_id)

    def set_phase(
        self, migration_id: str, phase: str, report: dict[str, Any] | None = None
    ) -> None:
        """Record the phase about to start (call before starting it).

        With `report`, the report so far is replaced in the same commit: one
        fsync per phase, which matters inside the freeze window.
        """
        with self._tx() as db:
            cur = db.execute(
                "UPDATE migrations SET phase = ?, updated = ?, report = COALESCE(?, report) "
                "WHERE id = ? AND outcome IS NULL",
                (
                    phase,
                    self._clock(),
                    None if report is None else json.dumps(report),
                    migration_id,
                ),
            )
            if cur.rowcount != 1:
                raise JournalError(f"no unfinished migration {migration_id}")

    def decide(self, reports: dict[str, dict[str, Any]], phase: str) -> None:
        """Record one decision for several migrations at once: all of them or none.

        `reports` maps each migration id to its full report (with the decision).
        """
        now = self._clock()
        with self._tx() as db:
            for migration_id, report in reports.items():
                cur = db.execute(
                    "UPDATE migrations SET report = ?, phase = ?, updated = ? "
                    "WHERE id = ? AND outcome IS NULL",
                    (json.dumps(report), phase, now, migration_id),
                )
                if cur.rowcount != 1:
                    raise JournalError(f"no unfinished migration {migration_id}")

    def update_report(self, migration_id: str, report: dict[str, Any]) -> None:
        """Replace the report of a running migration (e.g. timings so far)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE migrations SET report = ?, updated = ? WHERE id = ?",
                (json.dumps(report), self._clock(), migration_id),
            )
            if cur.rowcount != 1:
                raise JournalError(f"no migration {migration_id}")

    def finish(
        self,
        migration_id: str,
        outcome: str,
        reason: str | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            params: tuple[Any, ...]
            if report is None:
                sql = "UPDATE migrations SET outcome = ?, reason = ?, updated = ? WHERE id = ?"
                params = (outcome, reason, self._clock(), migration_id)
            else:
                sql = (
                    "UPDATE migrations SET outcome = ?, reason = ?, report = ?, updated = ? "
                    "WHERE id = ?"
                )
                params = (outcome, reason, json.dumps(report), self._clock(), migration_id)
            cur = db.execute(sql, params)
            if cur.rowcount != 1:
                raise JournalError(f"no migration {migration_id}")

    def get(self, migration_id: str) -> MigrationRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM migrations WHERE id = ?", (migration_id,)
            ).fetchone()
        if row is None:
            raise JournalError(f"no migration {migration_id}")
        return _record(row)

    def unfinished(self) -> list[MigrationRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM migrations WHERE outcome IS NULL ORDER BY started, id"
            ).fetchall()
        return [_record(r) for r in rows]

    def in_doubt(self) -> list[MigrationRecord]:
        """Migrations the source committed but cannot confirm: nothing runs, state kept."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM migrations WHERE outcome = 'in_doubt' ORDER BY started, id"
            ).fetchall()
        return [_record(r) for r in rows]

    def history(self, limit: int = 50) -> list[MigrationRecord]:
        """Most recent first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM migrations ORDER BY started DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_record(r) for r in rows]
