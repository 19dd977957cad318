"""Hosts learnt from etcd are remembered on disk and restored without etcd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.fleet.runtime import load_known, restore_known, save_known


def test_restored_clients_skip_static_and_existing_peers(tmp_path: Path) -> None:
    save_known(tmp_path, {"h2": "10.0.0.2:7443", "h3": "10.0.0.3:7443", "h4": "10.0.0.4:7443"})
    assert load_known(tmp_path)["h4"] == "10.0.0.4:7443"
    engine: dict[str, Any] = {"h3": "configured"}
    clients: dict[str, Any] = {}
    restored = restore_known(
        tmp_path, frozenset({"h2"}), clients, engine, lambda n, a: f"client {n} {a}"
    )
    assert restored == ["h4"]
    assert engine == {"h3": "configured", "h4": "client h4 10.0.0.4:7443"}
    assert clients == {"h4": "client h4 10.0.0.4:7443"}


def test_a_missing_or_broken_file_restores_nothing(tmp_path: Path) -> None:
    assert load_known(tmp_path) == {}
    (tmp_path / "fleet-peers.json").write_text("[not, a, map")
    assert load_known(tmp_path) == {}
    assert restore_known(tmp_path, frozenset(), {}, {}, lambda n, a: 1) == []
