"""The optional fleet: section: defaults, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import InputError


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(InputError) as info:
        load(tmp_path, text)
    return info.value.lines()


def test_without_a_fleet_section_nothing_is_coordinated(tmp_path: Path) -> None:
    cfg = load(tmp_path, "name: a\n")
    assert cfg.fleet is None  # type: ignore[attr-defined]


def test_fleet_defaults_follow_tls_and_listen(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "name: a\nlisten: 10.0.0.7:7443\nstate_dir: st\nfleet: {endpoints: [10.0.0.1:2379]}\n",
    )
    fleet = cfg.fleet  # type: ignore[attr-defined]
    assert fleet.prefix == "/ferry/"
    assert fleet.lease_ttl == 10.0
    assert fleet.max_draining_hosts == 1
    assert fleet.advertise == "10.0.0.7:7443"
    assert fleet.ca == tmp_path / "st" / "tls" / "ca.pem"
    assert fleet.key == tmp_path / "st" / "tls" / "key.pem"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fleet: {endpoints: [10.0.0.1:2379]}\n", "fleet.advertise: required when listen is"),
        ("fleet: {endpoints: []}\n", "fleet.endpoints"),
        ("fleet: {endpoints: [etcd1]}\n", "fleet.endpoints[0]"),
        ("fleet: {endpoints: [a:1], advertise: b:2, max_draining_hosts: 0}\n", "max_draining"),
        ("fleet: {endpoints: [a:1], advertise: b:2, lease_ttl: 1s}\n", "fleet.lease_ttl"),
        ("fleet: {endpoints: [a:1], advertise: b:2, prefix: ferry}\n", "fleet.prefix"),
        ("fleet: {endpoints: [a:1], advertise: b:2, endpont: x}\n", "fleet.endpont"),
        ("fleet: {endpoints: [a:1, a:1], advertise: b:2}\n", "duplicate endpoint"),
    ],
)
def test_fleet_mistakes_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    lines = problems(tmp_path, "name: a\n" + text)
    assert len(lines) == 1, lines
    assert str(tmp_path / "config.yaml") in lines[0]
    assert expected in lines[0]
