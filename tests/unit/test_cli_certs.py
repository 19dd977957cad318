"""`ferry certs` commands: files, modes, overwrite refusal and exit codes."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner

from agent.cli import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, main


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_init_issue_check(tmp_path: Path) -> None:
    d = str(tmp_path / "pki")
    code, out = _run("certs", "init", "--dir", d)
    assert code == 0, out
    code, out = _run("certs", "issue", "node1", "--dir", d, "--ip", "10.0.0.1", "--dns", "n1")
    assert code == 0, out
    key = tmp_path / "pki" / "node1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    code, out = _run(
        "certs", "check", "--ca", f"{d}/ca.crt", "--cert", f"{d}/node1.crt",
        "--key", str(key), "--name", "node1",
    )  # fmt: skip
    assert (code, out.strip()) == (0, "TLS files OK")


def test_refuses_overwrite_with_clear_message(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert _run("certs", "init", "--dir", d)[0] == 0
    before = (tmp_path / "ca.key").read_bytes()
    code, out = _run("certs", "init", "--dir", d)
    assert code == EXIT_BAD_INPUT
    assert "already exists" in out and "--force" in out
    assert (tmp_path / "ca.key").read_bytes() == before
    assert _run("certs", "init", "--dir", d, "--force")[0] == 0
    assert (tmp_path / "ca.key").read_bytes() != before

    assert _run("certs", "issue", "h", "--dir", d)[0] == 0
    code, out = _run("certs", "issue", "h", "--dir", d)
    assert code == EXIT_BAD_INPUT and "--force" in out


def test_issue_errors(tmp_path: Path) -> None:
    code, out = _run("certs", "issue", "h", "--dir", str(tmp_path))
    assert code == EXIT_UNAVAILABLE and "ferry certs init" in out
    _run("certs", "init", "--dir", str(tmp_path))
    code, out = _run("certs", "issue", "h", "--dir", str(tmp_path), "--ip", "nope")
    assert code == EXIT_BAD_INPUT and "invalid --ip" in out


def test_check_reports_problems(tmp_path: Path) -> None:
    code, out = _run(
        "certs", "check", "--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / "c"),
        "--key", str(tmp_path / "k"),
    )  # fmt: skip
    assert code == EXIT_UNAVAILABLE
    assert "does not exist" in out


def test_install_copies_to_agent_default_names(tmp_path: Path) -> None:
    d, dest = str(tmp_path / "pki"), tmp_path / "state" / "tls"
    code, out = _run("certs", "install", "n1", "--dir", d, "--to", str(dest))
    assert code == EXIT_UNAVAILABLE and "ferry certs init/issue" in out
    _run("certs", "init", "--dir", d)
    _run("certs", "issue", "n1", "--dir", d)
    code, out = _run("certs", "install", "n1", "--dir", d, "--to", str(dest))
    assert code == 0, out
    assert (dest / "cert.pem").read_bytes() == (tmp_path / "pki" / "n1.crt").read_bytes()
    assert (dest / "ca.pem").read_bytes() == (tmp_path / "pki" / "ca.crt").read_bytes()
    assert stat.S_IMODE((dest / "key.pem").stat().st_mode) == 0o600
    code, out = _run("certs", "install", "n1", "--dir", d, "--to", str(dest))
    assert code == EXIT_BAD_INPUT and "--force" in out
    assert _run("certs", "install", "n1", "--dir", d, "--to", str(dest), "--force")[0] == 0
    code, out = _run(
        "certs", "check", "--ca", str(dest / "ca.pem"), "--cert", str(dest / "cert.pem"),
        "--key", str(dest / "key.pem"), "--name", "n1",
    )  # fmt: skip
    assert code == 0, out
