"""The config/policy commands through click, as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.cli import EXIT_BAD_INPUT, EXIT_FAILED, main

ROOT = Path(__file__).resolve().parents[2]

GOOD_POLICY = """
policies:
  - name: cpu
    when: {signal: psi.cpu.some.avg10, op: ">", value: 50}
    for: 1m
    action: move
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for var in list(os.environ):
        if var.startswith("FERRY__"):
            monkeypatch.delenv(var)
    yield


def ferry(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def setup_host(tmp_path: Path, config: str, policy: str = GOOD_POLICY) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policy)
    path = tmp_path / "config.yaml"
    path.write_text(config)
    return path


def assert_bad_input(result: Result, *expected: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output
    for line in expected:
        assert line in result.stderr.splitlines() or any(
            ln.startswith(line) for ln in result.stderr.splitlines()
        ), result.stderr


def test_example_config_checks_out() -> None:
    result = ferry("check-config", str(ROOT / "config.example.yaml"))
    assert result.exit_code == 0, result.output
    assert "host:     node-a" in result.stdout
    assert "node-b" in result.stdout
    assert "maintenance-drain" in result.stdout and "evacuate all" in result.stdout
    assert result.stderr == ""


def test_example_policies_check_out() -> None:
    result = ferry("check-policies", str(ROOT / "policies"))
    assert result.exit_code == 0, result.output
    assert "ok: 4 policies" in result.stdout


def test_unknown_key_in_config(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\nlimits: {max_migration: 3}\n")
    assert_bad_input(ferry("check-config", str(path)), f"{path}: limits.max_migration: unknown key")


def test_wrong_type_in_config(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\nmigration: {copy_named_volumes: sometimes}\n")
    assert_bad_input(
        ferry("check-config", str(path)),
        f"{path}: migration.copy_named_volumes: input should be a valid boolean",
    )


def test_peer_without_address(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\npeers:\n  - name: b\n    address: b:7443\n  - name: c\n")
    result = ferry("check-config", str(path))
    assert_bad_input(result, f"{path}: peers[1].address: field required")
    assert len(result.stderr.splitlines()) == 1


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\n  peers: [\n")
    assert_bad_input(ferry("check-config", str(path)), f"{path}:2: YAML syntax error")


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\n")
    result = ferry("check-config", str(path), env={"FERRY__LIMITS__MAX_MIGRATIONS": "many"})
    assert_bad_input(result, "$FERRY__LIMITS__MAX_MIGRATIONS: limits.max_migrations: ")


def test_policy_problems_via_check_config(tmp_path: Path) -> None:
    bad = GOOD_POLICY.replace("psi.cpu.some.avg10", "cpu.pressure").replace("for: 1m", "for: 1x")
    path = setup_host(tmp_path, "name: a\n", bad)
    policy_file = tmp_path / "policies" / "p.yaml"
    assert_bad_input(
        ferry("check-config", str(path)),
        f"{policy_file}: policies[cpu].when.signal: unknown signal 'cpu.pressure'",
        f"{policy_file}: policies[cpu].for: invalid duration '1x'",
    )


def test_check_config_knows_markers_and_peers(tmp_path: Path) -> None:
    policy = """
policies:
  - name: up
    when: {marker: upgrade}
    action: evacuate
    targets: [b, z]
"""
    path = setup_host(tmp_path, "name: a\npeers: [{name: b, address: 'b:1'}]\n", policy)
    policy_file = tmp_path / "policies" / "p.yaml"
    assert_bad_input(
        ferry("check-config", str(path)),
        f"{policy_file}: policies[up].when.marker: unknown marker 'upgrade'",
        f"{policy_file}: policies[up].targets.peers: unknown peer(s) z",
    )
    path.write_text(
        "name: a\npeers: [{name: b, address: 'b:1'}, {name: z, address: 'z:1'}]\n"
        "markers: {extra: {upgrade: /run/up}}\n"
    )
    assert ferry("check-config", str(path)).exit_code == 0


def test_missing_policies_dir(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: a\npolicies_dir: nowhere\n")
    assert_bad_input(
        ferry("check-config", str(path)),
        f"{path}: policies_dir: {tmp_path / 'nowhere'} is not a directory",
    )


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("psi.cpu.some.avg10", "psi.cpu.some.avg01"), "policies[cpu].when.signal: unknown signal"),
        (("for: 1m", "for: 1m30"), "policies[cpu].for: invalid duration '1m30'"),
        (("action: move", "action: teleport"), "policies[cpu].action: unknown action 'teleport'"),
        (("for: 1m", "hold: 1m"), "policies[cpu].hold: unknown key"),
    ],
)
def test_bad_policies(tmp_path: Path, replace: tuple[str, str], expected: str) -> None:
    (tmp_path / "p.yaml").write_text(GOOD_POLICY.replace(*replace))
    assert_bad_input(ferry("check-policies", str(tmp_path)), f"{tmp_path / 'p.yaml'}: {expected}")


def test_empty_or_missing_policy_dir(tmp_path: Path) -> None:
    assert_bad_input(ferry("check-policies", str(tmp_path)), f"{tmp_path}: no policy files")
    assert_bad_input(
        ferry("check-policies", str(tmp_path / "x")), f"{tmp_path / 'x'}: no such file"
    )


def test_test_policy_example_timeline_passes() -> None:
    result = ferry(
        "test-policy",
        str(ROOT / "policies/tests/cpu-pressure.timeline.yaml"),
        "--policies",
        str(ROOT / "policies"),
    )
    assert result.exit_code == 0, result.output
    assert "2m41s  cpu-pressure  skipped [dry_run] batch->node-c" in result.stdout
    assert "expectations: 8/8 held" in result.stdout


def test_test_policy_unmet_expectation_exits_1(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD_POLICY)
    (tmp_path / "tests").mkdir()
    tl = tmp_path / "tests" / "t.yaml"
    tl.write_text(
        "steps: [{at: 0s, signals: {psi.cpu.some.avg10: 90}}]\n"
        "until: 2m\n"
        "expect:\n"
        "  - {policy: cpu, event: firing, at: 30s}\n"
        "  - {policy: cpu, event: firing, at: 1m}\n"
    )
    result = ferry("test-policy", str(tl), "--policies", str(tmp_path))
    assert result.exit_code == EXIT_FAILED, result.output
    assert "expectations: 1/2 held" in result.stdout
    assert (
        f"FAILED {tl}: expect[0] (policy cpu, event firing, at 30s): did not happen"
        in result.stderr
    )
    json_result = ferry(
        "test-policy", str(tl), "--policies", str(tmp_path), "--json", "--policy", "cpu"
    )
    assert '"event": "firing"' in json_result.stdout


def test_test_policy_bad_input(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD_POLICY)
    tl = tmp_path / "t.timeline"
    tl.write_text("steps: [{at: later}]\n")
    assert_bad_input(
        ferry("test-policy", str(tl), "--policies", str(tmp_path)),
        f"{tl}: steps[0].at: invalid duration",
    )
    tl.write_text("steps: [{at: 0}]\n")
    assert_bad_input(
        ferry("test-policy", str(tl), "--policies", str(tmp_path), "--policy", "nope"),
        "--policy: no such policy: nope",
    )


@pytest.mark.parametrize("command", ["check-config", "check-policies", "test-policy"])
def test_help_lists_exit_codes(command: str) -> None:
    result = ferry(command, "--help")
    assert result.exit_code == 0
    assert "Exit codes:" in result.stdout and "2  bad input" in result.stdout


def test_real_process_bad_input_has_no_traceback(tmp_path: Path) -> None:
    path = setup_host(tmp_path, "name: a\nbogus: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip() == f"{path}: bogus: unknown key"
    assert proc.stdout == ""
