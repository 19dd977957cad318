"""Nonsense in a config, policy or timeline is refused: exit 2, file, key and reason, no traceback.

Each case is a value someone could write by mistake (or an attacker on purpose)
that used to crash a command or slip through as "ok".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.cli import EXIT_BAD_INPUT, main
from agent.service.runtime import run_agent

POLICY = """
policies:
  - name: cpu
    when: {signal: psi.cpu.some.avg10, op: ">", value: 50}
    action: move
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for var in list(os.environ):
        if var.startswith("FERRY__"):
            monkeypatch.delenv(var)
    yield


def ferry(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_refused(result: Result, file: str, key: str, reason: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines, "no message"
    hit = [ln for ln in lines if ln.startswith(file) and key in ln and reason in ln]
    assert hit, f"expected {file}: ...{key}...{reason}... in:\n{result.stderr}"


def write_config(tmp_path: Path, text: str, policy: str = POLICY) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "p.yaml").write_text(policy)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


DEEP_LIST = "a: " + "[" * 5000 + "]" * 5000 + "\n"
DEEP_MAP = "a: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"
LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['x'] * 10)}]\n"
    for i in range(7)
)

CONFIG_CASES = [
    # (id, config text, key expected in the message, reason fragment)
    ("deep-list", DEEP_LIST, "", "nested deeper than"),
    ("deep-map", DEEP_MAP, "", "nested deeper than"),
    ("alias-bomb", LAUGHS, "", "once aliases are expanded"),
    ("alias-cycle", "a: &a [*a]\n", "", "nested deeper than"),
    ("duplicate-key", "name: a\nname: b\n", "", "duplicate key 'name'"),
    ("top-level-list", "- name: a\n", "", "expected a mapping"),
    ("top-level-scalar", "just words\n", "", "expected a mapping"),
    ("nul-char", "name: a\x00\n", "", "is not allowed in YAML"),
    ("policies-dir-tilde", 'policies_dir: "~="\n', "policies_dir", "cannot expand"),
    ("policies-dir-user", "policies_dir: ~nosuchuser-ferry/p\n", "policies_dir", "cannot expand"),
    ("policies-dir-nul", 'policies_dir: "a\\0b"\n', "policies_dir", "NUL"),
    ("state-dir-root", "state_dir: /\n", "state_dir", "system directory"),
    ("state-dir-etc", "state_dir: /etc/\n", "state_dir", "system directory"),
    ("state-dir-usr", "state_dir: /usr\n", "state_dir", "system directory"),
    ("state-dir-proc", "state_dir: /proc\n", "state_dir", "system directory"),
    ("state-dir-sys", "state_dir: /sys\n", "state_dir", "system directory"),
    ("state-dir-dev", "state_dir: /dev\n", "state_dir", "system directory"),
    ("state-dir-in-proc", "state_dir: /proc/1/x\n", "state_dir", "kernel filesystem"),
    ("state-dir-dotdot", "state_dir: /var/lib/ferry/../..\n", "state_dir", "system directory"),
    ("data-root-root", "docker: {data_root: /}\n", "docker.data_root", "system directory"),
    ("max-request-zero", "limits: {max_request_bytes: 0}\n", "limits.max_request_bytes", "1 MiB"),
    ("max-request-neg", "limits: {max_request_bytes: -1}\n", "limits.max_request_bytes", "-1"),
    ("max-request-huge", "limits: {max_request_bytes: 9EiB}\n", "limits.max_request_bytes", "PiB"),
    ("max-image-zero", "migration: {max_image_bytes: 0}\n", "migration.max_image_bytes", "1 MiB"),
    (
        "concurrent-zero",
        "limits: {max_concurrent_migrations: 0}\n",
        "limits.max_concurrent_migrations",
        "between 1 and",
    ),
    (
        "concurrent-huge",
        "limits: {max_concurrent_migrations: " + "9" * 400 + "}\n",
        "limits.max_concurrent_migrations",
        "between 1 and",
    ),
    (
        "concurrent-bool",
        "limits: {max_concurrent_migrations: true}\n",
        "limits.max_concurrent_migrations",
        "not true",
    ),
    ("max-migrations-neg", "limits: {max_migrations: -3}\n", "limits.max_migrations", "between"),
    ("window-zero", "limits: {window: 0s}\n", "limits.window", "more than 0s"),
    ("socket-leading-space", 'control_socket: " /run/f.sock"\n', "control_socket", "whitespace"),
    ("socket-trailing-space", 'control_socket: "/run/f.sock "\n', "control_socket", "whitespace"),
    ("socket-relative", "control_socket: run/f.sock\n", "control_socket", "relative"),
    ("socket-too-long", f"control_socket: /run/{'s' * 120}.sock\n", "control_socket", "at most"),
    ("socket-root", "control_socket: /\n", "control_socket", "not a socket path"),
    (
        "restore-timeout-overflow",
        "migration: {restore_timeout: 100000000000h}\n",
        "migration.restore_timeout",
        "longer than a year",
    ),
    (
        "restore-timeout-2d",
        "migration: {restore_timeout: 2d}\n",
        "migration.restore_timeout",
        "at most 1d",
    ),
    (
        "restore-timeout-int-overflow",
        "migration: {restore_timeout: " + "1" * 400 + "}\n",
        "migration.restore_timeout",
        "finite",
    ),
    (
        "checkpoint-timeout-neg",
        "migration: {checkpoint_timeout: -5s}\n",
        "migration.checkpoint_timeout",
        "invalid duration",
    ),
    (
        "checkpoint-timeout-nan",
        "migration: {checkpoint_timeout: .nan}\n",
        "migration.checkpoint_timeout",
        "finite",
    ),
    ("poll-interval-tiny", "signals: {poll_interval: 1ms}\n", "signals.poll_interval", "at least"),
    ("peer-weight-nan", "peers: [{name: b, address: 'b:1', weight: .nan}]\n", "weight", "finite"),
    ("peer-weight-inf", "peers: [{name: b, address: 'b:1', weight: .inf}]\n", "weight", "finite"),
    ("peer-empty-name", "peers: [{name: '', address: 'b:1'}]\n", "peers[0].name", "pattern"),
    ("peer-name-long", f"peers: [{{name: {'b' * 80}, address: 'b:1'}}]\n", "name", "pattern"),
    ("peer-address-space", "peers: [{name: b, address: 'b c:1'}]\n", "address", "whitespace"),
    ("peer-port-zero", "peers: [{name: b, address: 'b:0'}]\n", "address", "port"),
    ("docker-url-space", "docker: {url: ' unix:///x.sock'}\n", "docker.url", "whitespace"),
    ("docker-url-scheme", "docker: {url: 'ftp://x'}\n", "docker.url", "expected unix"),
    ("criu-empty-word", "docker: {criu_check: ['']}\n", "docker.criu_check[0]", "at least 1"),
    ("wrong-type-section", "limits: 5\n", "limits", "valid dictionary"),
    ("wrong-type-list", "peers: {name: b}\n", "peers", "valid list"),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [pytest.param(t, k, r, id=i) for i, t, k, r in CONFIG_CASES],
)
def test_check_config_refuses(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write_config(tmp_path, text)
    assert_refused(ferry("check-config", str(path)), str(path), key, reason)


def test_binary_garbage_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    path.write_bytes(b"name: a\n\xff\xfe\x00garbage")
    assert_refused(ferry("check-config", str(path)), str(path), "", "not UTF-8")


def test_fifo_config_is_not_read(tmp_path: Path) -> None:
    import os

    path = tmp_path / "config.yaml"
    os.mkfifo(path)  # reading it would block forever
    assert_refused(ferry("check-config", str(path)), str(path), "", "not a regular file")


def test_huge_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "# " + "x" * (2 * 1024 * 1024) + "\n")
    assert_refused(ferry("check-config", str(path)), str(path), "", "larger than")


def test_env_override_nonsense(tmp_path: Path) -> None:
    path = write_config(tmp_path, "name: a\n")
    result = CliRunner().invoke(
        main, ["check-config", str(path)], env={"FERRY__STATE_DIR": "/", "FERRY__A": "[" * 4000}
    )
    assert_refused(result, "$FERRY__STATE_DIR", "state_dir", "system directory")


POLICY_CASES = [
    ("value-nan", 'when: {signal: psi.cpu.some.avg10, op: ">", value: .nan}', "when.", "finite"),
    ("value-inf", 'when: {signal: psi.cpu.some.avg10, op: ">", value: .inf}', "when.", "finite"),
    ("value-neg-inf", 'when: {signal: load.1, op: ">", value: -.inf}', "when.value", "finite"),
    (
        "ratio-as-percent",
        'when: {signal: mem.available_ratio, op: "<", value: 5}',
        "when.value",
        "ratio between 0 and 1",
    ),
    (
        "disk-ratio-negative",
        'when: {signal: disk.docker.free_ratio, op: "<", value: -0.1}',
        "when.value",
        "ratio between 0 and 1",
    ),
    (
        "psi-over-100",
        'when: {signal: psi.memory.full.avg60, op: ">", value: 150}',
        "when.value",
        "percentage between 0 and 100",
    ),
    (
        "bytes-negative",
        'when: {signal: mem.available_bytes, op: "<", value: -1}',
        "when.value",
        "never negative",
    ),
    ("targets-empty", "targets: {peers: []}", "targets.peers", "empty list"),
    ("targets-shorthand-empty", "targets: []", "targets.peers", "empty list"),
    ("targets-twice", "targets: [b, b]", "targets.peers", "listed twice"),
    ("targets-empty-name", "targets: ['']", "targets.peers", "list of peer names"),
    ("for-negative", "for: -5s", "for", "invalid duration"),
    ("for-overflow", "for: 100000000000h", "for", "longer than a year"),
    ("cooldown-nan", "cooldown: .nan", "cooldown", "finite"),
    ("amount-zero", "amount: 0", "amount", "between 1 and"),
    ("amount-huge", "amount: " + "9" * 50, "amount", "between 1 and"),
    ("amount-float", "amount: 2.5", "amount", "number of containers"),
    ("max-concurrent-zero", "max_concurrent: 0", "max_concurrent", "between 1 and"),
    ("rate-limit-zero", "rate_limit: {max: 0, per: 1h}", "rate_limit.max", "between 1 and"),
    ("rate-per-zero", "rate_limit: {max: 1, per: 0s}", "rate_limit.per", "more than 0s"),
    ("select-empty-glob", "select: {name: ''}", "select.name", "at least 1"),
    ("select-empty-label", "select: {has_labels: ['']}", "select.has_labels[0]", "at least 1"),
]


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [pytest.param(e, k, r, id=i) for i, e, k, r in POLICY_CASES],
)
def test_check_policies_refuses(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    lines = [
        "policies:",
        "  - name: cpu",
        "    action: move",
        f"    {extra}",
    ]
    if not extra.startswith("when:"):
        lines.append('    when: {signal: psi.cpu.some.avg10, op: ">", value: 50}')
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert_refused(
        ferry("check-policies", str(tmp_path)), str(path), f"policies[cpu].{key}", reason
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("policies:\n" + "  " + "[" * 3000 + "]" * 3000 + "\n", "nested", id="deep"),
        pytest.param("policies: []\npolicies: []\n", "duplicate key", id="duplicate-key"),
        pytest.param("[1, 2]\n", "expected a mapping", id="not-a-mapping"),
        pytest.param(
            "policies:\n  - name: a\n    when: {event: oom, within: 0s}\n    action: log\n",
            "when.within",
            id="event-window-zero",
        ),
        pytest.param(
            "policies:\n  - name: a\n    when: {event: oom, within: 1m, count_gte: 0}\n"
            "    action: log\n",
            "count_gte",
            id="event-count-zero",
        ),
        pytest.param(
            "policies:\n  - name: a\n    name: b\n    when: {marker: drain}\n    action: log\n",
            "duplicate key 'name'",
            id="duplicate-policy-key",
        ),
    ],
)
def test_policy_file_shapes_refused(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert_refused(ferry("check-policies", str(tmp_path)), str(path), "", reason)


def test_check_config_refuses_policy_nonsense(tmp_path: Path) -> None:
    bad = POLICY.replace("psi.cpu.some.avg10", "mem.available_ratio").replace('">"', '"<"')
    path = write_config(tmp_path, "name: a\n", policy=bad)
    assert_refused(
        ferry("check-config", str(path)),
        str(tmp_path / "policies" / "p.yaml"),
        "policies[cpu].when.value",
        "ratio between 0 and 1",
    )


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param("step: 1ms\nuntil: 30d\nsteps: [{at: 0s}]\n", "", "evaluations", id="ticks"),
        pytest.param("steps: [{at: 0s, signals: {load.1: .nan}}]\n", "load.1", "finite", id="nan"),
        pytest.param("step: 0s\nsteps: [{at: 0s}]\n", "step", "greater than 0", id="step-zero"),
        pytest.param("steps: [{at: 100000000000h}]\n", "at", "longer than a year", id="at"),
        pytest.param("steps: []\nsteps: []\n", "", "duplicate key", id="duplicate-key"),
    ],
)
def test_test_policy_refuses_timeline(tmp_path: Path, text: str, key: str, reason: str) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    timeline = tmp_path / "t.yaml"
    timeline.write_text(text)
    result = ferry("test-policy", str(timeline), "--policies", str(tmp_path / "p.yaml"))
    assert_refused(result, str(timeline), key, reason)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param("state_dir: /\n", "state_dir", "system directory", id="state-dir-root"),
        pytest.param(DEEP_LIST, "", "nested deeper than", id="deep"),
        pytest.param('policies_dir: "~="\n', "policies_dir", "cannot expand", id="tilde"),
        pytest.param(
            "migration: {restore_timeout: 100000000000h}\n",
            "migration.restore_timeout",
            "longer than a year",
            id="timeout",
        ),
    ],
)
def test_run_refuses_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, reason: str
) -> None:
    path = write_config(tmp_path, text)
    assert run_agent(path, environ={}) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(ln.startswith(str(path)) and key in ln and reason in ln for ln in err.splitlines())


def test_messages_are_one_printable_line(tmp_path: Path) -> None:
    # A key holding a newline and control characters must not break the one-line form.
    path = write_config(tmp_path, 'limits: {"evil\\nkey\\u2028\\u0007": 1}\n')
    result = ferry("check-config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.splitlines() == [f"{path}: limits.evil\\nkey\\u2028\\x07: unknown key"]


def test_test_policy_refuses_an_endless_event_count(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    timeline = tmp_path / "t.yaml"
    timeline.write_text("steps: [{at: 0s, events: [{action: oom, count: 1000000000000}]}]\n")
    result = ferry("test-policy", str(timeline), "--policies", str(tmp_path / "p.yaml"))
    assert_refused(result, str(timeline), "steps[0].events[0].count", "between 1 and 100000")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param("markers: {drain: /}\n", "markers.drain", "system directory", id="drain-root"),
        pytest.param(
            "markers: {extra: {kernel: /etc}}\n", "markers.extra.kernel", "system", id="extra-etc"
        ),
        pytest.param(
            "listen: 127.0.0.1:7443\nmetrics: {listen: 127.0.0.1:7443}\n",
            "",
            "pick two ports",
            id="metrics-same-port",
        ),
    ],
)
def test_more_config_nonsense(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write_config(tmp_path, text)
    assert_refused(ferry("check-config", str(path)), str(path), key, reason)
