"""Migration journal: durable across reopen, unfinished rows, concurrent writers."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from agent.journal import JOURNAL_FILE, Journal, JournalError
from tests.helpers import FakeClock


def _begin(j: Journal, mid: str, role: str = "source") -> None:
    j.begin(
        mid,
        container_id=f"c-{mid}",
        container_name=f"web-{mid}",
        source="h1",
        target="h2",
        role=role,
    )


def test_survives_reopen_and_lists_unfinished(tmp_path: Path) -> None:
    clock = FakeClock(start=0.0, epoch=1000.0).ticking()
    with Journal(tmp_path, clock=clock) as j:
        _begin(j, "m1")
        _begin(j, "m2", role="target")
        _begin(j, "m3")
        j.set_phase("m1", "checkpoint")
        j.set_phase("m2", "restore")
        report = {"phases": {"checkpoint": {"seconds": 1.5, "bytes": 1024}}, "downtime_s": 2.0}
        j.finish("m1", "succeeded", None, report)
        j.finish("m3", "rolled_back", "target refused: disk full")

    with Journal(tmp_path, clock=clock) as j:
        unfinished = j.unfinished()
        assert [(r.id, r.role, r.phase, r.finished) for r in unfinished] == [
            ("m2", "target", "restore", False)
        ]
        history = j.history(limit=10)
        assert [r.id for r in history] == ["m3", "m2", "m1"]
        m1 = j.get("m1")
        assert (m1.outcome, m1.phase, m1.report) == ("succeeded", "checkpoint", report)
        assert m1.started == 1001.0 and m1.updated > m1.started
        m3 = j.get("m3")
        assert (m3.outcome, m3.reason) == ("rolled_back", "target refused: disk full")
        assert j.history(limit=1)[0].id == "m3"


def test_durability_settings(tmp_path: Path) -> None:
    with Journal(tmp_path):
        pass
    db = sqlite3.connect(tmp_path / JOURNAL_FILE)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    j = Journal(tmp_path)
    try:
        # synchronous is per connection: check the journal's own (2 = FULL).
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        j.close()


def test_a_phase_and_its_report_are_one_commit(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        _begin(j, "m1")
        before = j._db.total_changes
        j.set_phase("m1", "transfer", {"staged": True})
        assert j._db.total_changes - before == 1  # one UPDATE, one transaction
        rec = j.get("m1")
        assert (rec.phase, rec.report) == ("transfer", {"staged": True})
        j.set_phase("m1", "restore")  # without a report: the last one stays
        assert j.get("m1").report == {"staged": True}


def test_misuse_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        _begin(j, "m1")
        with pytest.raises(JournalError, match="already in the journal"):
            _begin(j, "m1")
        with pytest.raises(JournalError, match="role"):
            _begin(j, "m2", role="bystander")
        j.finish("m1", "failed", "boom")
        with pytest.raises(JournalError, match="no unfinished migration m1"):
            j.set_phase("m1", "restore")
        with pytest.raises(JournalError):
            j.finish("nope", "failed")
        with pytest.raises(JournalError):
            j.get("nope")


def test_concurrent_writers(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with Journal(tmp_path) as j:

        def worker(n: int) -> None:
            try:
                for i in range(20):
                    mid = f"m{n}-{i}"
                    _begin(j, mid)
                    j.set_phase(mid, "transfer")
                    if i % 2:
                        j.finish(mid, "succeeded")
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,), name=f"w{n}") for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(j.history(limit=1000)) == 80
        assert len(j.unfinished()) == 40
