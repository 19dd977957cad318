"""The drain marker file: written whole, read back as the reason, removed once."""

from __future__ import annotations

from pathlib import Path

from agent.service.drain import DrainMarker


def test_set_reason_clear(tmp_path: Path) -> None:
    marker = DrainMarker(tmp_path / "run" / "drain")  # the directory does not exist yet
    assert not marker.active() and marker.reason() is None

    marker.set("kernel 6.9")
    assert marker.active() and marker.reason() == "kernel 6.9"
    assert not (tmp_path / "run" / ".drain.tmp").exists()  # written through a renamed temp file

    marker.set("")
    assert marker.active() and marker.reason() is None  # present without a reason

    assert marker.clear() is True
    assert not marker.active()
    assert marker.clear() is False


def test_a_directory_at_the_path_drains_without_a_reason(tmp_path: Path) -> None:
    (tmp_path / "drain").mkdir()
    marker = DrainMarker(tmp_path / "drain")
    assert marker.active() and marker.reason() is None
