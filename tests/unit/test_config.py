from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.config import FerryConfig, load_config
from agent.errors import InputError, Problem, format_loc


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(InputError) as info:
        load_config(path, environ=env or {})
    return info.value.lines()


def test_empty_file_gives_defaults_hanging_off_state_dir(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), environ={})
    assert cfg.name == socket.gethostname()
    assert cfg.listen == "0.0.0.0:7443"
    assert cfg.docker.url == "unix:///var/run/docker.sock"
    assert cfg.docker.data_root is None
    assert cfg.state_dir == Path("/var/lib/ferry")
    assert cfg.markers.drain == Path("/var/lib/ferry/drain")
    assert cfg.tls.ca == Path("/var/lib/ferry/tls/ca.pem")
    assert cfg.control_socket == Path("/run/ferry/ferry.sock")
    assert cfg.metrics.listen is None
    assert cfg.dry_run is False
    assert cfg.migration.keep_source_copy_for == 0.0
    # The default policies_dir sits next to the config file.
    assert cfg.policies_dir == tmp_path / "policies"


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = load_config(
        write(
            sub,
            "state_dir: state\npolicies_dir: ../pol\nmarkers: {extra: {upgrade: marks/up}}\n"
            "tls: {ca: /abs/ca.pem}\n",
        ),
        environ={},
    )
    assert cfg.state_dir == sub / "state"
    assert cfg.policies_dir == tmp_path / "pol"
    assert cfg.markers.drain == sub / "state" / "drain"
    assert cfg.marker_paths() == {"drain": sub / "state" / "drain", "upgrade": sub / "marks/up"}
    assert cfg.tls.ca == Path("/abs/ca.pem")
    assert cfg.tls.key == sub / "state" / "tls" / "key.pem"


def test_full_sections_parse(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
name: node-a
peers:
  - {name: node-b, address: "10.0.0.2:7443", weight: 2, tags: [r1]}
  - {name: node-c, address: "[fd00::3]:7443"}
limits: {max_concurrent_migrations: 2, max_migrations: 5, window: 30m, max_request_bytes: 1GiB}
migration: {restore_timeout: 1m30s, max_image_bytes: 512MiB, keep_source_copy_for: 10m}
logging: {level: DEBUG, format: json}
signals:
  poll_interval: 500ms
  commands: [{name: raid, command: [/bin/true], interval: 1m, timeout: 5s}]
metrics: {listen: "127.0.0.1:9477"}
""",
        ),
        environ={},
    )
    assert [p.name for p in cfg.peers] == ["node-b", "node-c"]
    assert cfg.peers[0].weight == 2.0
    assert cfg.limits.window == 1800.0
    assert cfg.limits.max_request_bytes == 1024**3
    assert cfg.migration.restore_timeout == 90.0
    assert cfg.migration.max_image_bytes == 512 * 1024**2
    assert cfg.logging.level == "debug"
    assert cfg.signals.poll_interval == 0.5
    assert cfg.signals.commands[0].command == ["/bin/true"]


def test_unknown_key_wrong_type_and_peer_without_address_each_name_the_key(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
name: node-a
peers:
  - {name: node-b, address: "10.0.0.2:7443"}
  - {name: node-c}
limits:
  max_concurrent_migrations: two
  bogus: 1
migration: {restore_timeout: 5x}
""",
    )
    lines = problems(path)
    assert f"{path}: peers[1].address: field required" in lines
    assert f"{path}: limits.bogus: unknown key" in lines
    assert any(
        line.startswith(
            f"{path}: limits.max_concurrent_migrations: input should be a valid integer"
        )
        for line in lines
    )
    assert any(
        line.startswith(f"{path}: migration.restore_timeout: invalid duration") for line in lines
    )
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("listen: '7443'", "listen", "expected host:port"),
        ("listen: 7443", "listen", "valid string"),
        ("listen: 'host:99999'", "listen", "port must be 1-65535"),
        ("peers: [{name: b, address: 'fd00::1:7443'}]", "peers[0].address", "IPv6"),
        ("peers: [{name: b, address: 'h:1'}, {name: b, address: 'h:2'}]", "peers", "duplicate"),
        ("name: a\npeers: [{name: a, address: 'h:1'}]", "", "own name"),
        ("logging: {level: loud}", "logging.level", "input should be"),
        ("markers: {extra: {drain: /x}}", "markers.extra", "markers.drain"),
        (
            "signals: {commands: [{name: x, command: []}]}",
            "signals.commands[0].command",
            "at least 1",
        ),
        (
            "signals: {commands: [{name: x, command: [a], interval: 5s, timeout: 10s}]}",
            "signals.commands[0]",
            "timeout must not exceed interval",
        ),
        ("dry_run: maybe", "dry_run", "valid boolean"),
    ],
)
def test_invalid_values(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    lines = problems(path)
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert any(line.startswith(prefix) and reason in line for line in lines), lines


def test_yaml_syntax_error_gives_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\npeers:\n  - name: b\n   address: x\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:4: YAML syntax error")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert problems(path) == [f"{path}: expected a mapping of keys at the top level"]


def test_missing_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_env_overrides_parse_yaml_scalars_and_nest(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\npeers: [{name: b, address: 'h:1'}]\n")
    cfg = load_config(
        path,
        environ={
            "FERRY__NAME": "node-z",
            "FERRY__DRY_RUN": "true",
            "FERRY__LIMITS__MAX_CONCURRENT_MIGRATIONS": "3",
            "FERRY__MIGRATION__RESTORE_TIMEOUT": "5m",
            "FERRY__PEERS__0__ADDRESS": "10.0.0.9:7443",
            "FERRY__PEERS__1__NAME": "c",
            "FERRY__PEERS__1__ADDRESS": "10.0.0.10:7443",
            "FERRY__MARKERS__EXTRA__UPGRADE": "up",
            "FERRY__METRICS__LISTEN": "null",
            "UNRELATED": "x",
        },
    )
    assert cfg.name == "node-z"
    assert cfg.dry_run is True
    assert cfg.limits.max_concurrent_migrations == 3
    assert cfg.migration.restore_timeout == 300.0
    assert [(p.name, p.address) for p in cfg.peers] == [
        ("b", "10.0.0.9:7443"),
        ("c", "10.0.0.10:7443"),
    ]
    assert cfg.markers.extra == {"upgrade": tmp_path / "up"}


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\n")
    lines = problems(
        path,
        {
            "FERRY__LIMITS__MAX_MIGRATIONS": "lots",
            "FERRY__LIMITS__NOPE": "1",
            "FERRY__PEERS__0__NAME": "b",
            "FERRY__PEERS__5__NAME": "c",
        },
    )
    assert lines[0].startswith("$FERRY__PEERS__5__NAME: list index '5' out of range")
    lines = problems(
        path,
        {
            "FERRY__LIMITS__MAX_MIGRATIONS": "lots",
            "FERRY__LIMITS__NOPE": "1",
            "FERRY__PEERS__0__NAME": "b",
        },
    )
    assert any(
        line.startswith("$FERRY__LIMITS__MAX_MIGRATIONS: limits.max_migrations: input should be")
        for line in lines
    )
    assert "$FERRY__LIMITS__NOPE: limits.nope: unknown key" in lines
    # The peer item was created by the variable, so its missing address is blamed on it.
    assert "$FERRY__PEERS__0__NAME: peers[0].address: field required" in lines


def test_env_cannot_descend_into_a_scalar(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\n")
    (line,) = problems(path, {"FERRY__NAME__X": "1"})
    assert line == "$FERRY__NAME__X: name is not a section"


def test_problem_formatting() -> None:
    assert str(Problem("config.yaml", "peers[1].address", "field required")) == (
        "config.yaml: peers[1].address: field required"
    )
    assert (
        str(Problem("c.yaml", "", "YAML syntax error: x", line=3))
        == "c.yaml:3: YAML syntax error: x"
    )
    assert format_loc(("policies", 0, "when", "~all", "all", 2, "~signal", "op")) == (
        "policies[0].when.all[2].op"
    )
    err = InputError([Problem("a", "b", "c"), Problem("d", "", "e")])
    assert str(err) == "a: b: c\nd: e"


def test_config_is_immutable() -> None:
    cfg = FerryConfig(name="a")
    with pytest.raises(Exception, match="frozen"):
        cfg.name = "b"  # type: ignore[misc]
