"""Start-up checks against fakes: each problem names what to change."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.model import PeerHealth
from agent.service import prereqs
from agent.service.prereqs import (
    check_criu,
    check_data_root,
    check_docker,
    check_peers,
    check_runc,
    parse_criu_version,
    run_prereqs,
)
from tests.helpers import run_async


class FakeDocker:
    def __init__(self, experimental: bool = True, root: str = "/", fail: bool = False) -> None:
        self.experimental = experimental
        self.root = root
        self.fail = fail

    def info(self) -> dict[str, Any]:
        if self.fail:
            raise ConnectionError("connection refused")
        return {"ExperimentalBuild": self.experimental, "DockerRootDir": self.root}

    def version(self) -> dict[str, Any]:
        return {"Version": "27.0", "Experimental": self.experimental}


def fake_run(stdout: str = "", rc: int = 0, exc: BaseException | None = None) -> Any:
    calls: list[Sequence[str]] = []

    def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if exc is not None:
            raise exc
        return subprocess.CompletedProcess(list(argv), rc, stdout, "")

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_non_experimental_daemon_names_daemon_json_and_key() -> None:
    problems, _ = check_docker(FakeDocker(experimental=False), "unix:///var/run/docker.sock")
    assert len(problems) == 1
    p = problems[0]
    assert p.fatal
    assert "/etc/docker/daemon.json" in p.fix
    assert '"experimental": true' in p.fix
    assert "restart docker" in p.fix
    assert "daemon.json" in str(p)


def test_experimental_daemon_passes_any_way_docker_reports_it() -> None:
    assert check_docker(FakeDocker(), "u")[0] == []
    assert prereqs.is_experimental(
        {}, {"Components": [{"Name": "Engine", "Details": {"Experimental": "true"}}]}
    )
    assert not prereqs.is_experimental({}, {"Experimental": False})


def test_unreachable_docker() -> None:
    problems, info = check_docker(FakeDocker(fail=True), "unix:///x.sock")
    assert info == {}
    assert "not reachable at unix:///x.sock" in problems[0].message
    assert "docker.url" in problems[0].fix


@pytest.mark.parametrize(
    ("text", "version"),
    [("Version: 4.2\n", (4, 2)), ("Version: 3.17.1\nGitID: v3.17.1", (3, 17, 1)), ("x", None)],
)
def test_parse_criu_version(text: str, version: tuple[int, ...] | None) -> None:
    assert parse_criu_version(text) == version


def test_criu_version_checks() -> None:
    run = fake_run("Version: 4.2\n")
    assert check_criu(["nsenter", "-t", "1", "-m", "criu", "--version"], run=run) == []
    assert run.calls == [["nsenter", "-t", "1", "-m", "criu", "--version"]]

    old = check_criu(run=fake_run("Version: 3.19\n"))
    assert "3.19 is too old (need >= 4.2)" in old[0].message

    missing = check_criu(run=fake_run(exc=FileNotFoundError()))
    assert "command not found" in missing[0].message
    assert "install CRIU >= 4.2" in missing[0].fix

    failed = check_criu(["criu", "check"], run=fake_run("Error: no ptrace\n", rc=1))
    assert "exited 1: Error: no ptrace" in failed[0].message

    # `criu check` passes without printing a version
    assert check_criu(["criu", "check"], run=fake_run("Looks good.\n")) == []

    timeout = check_criu(run=fake_run(exc=subprocess.TimeoutExpired("criu", 1)))
    assert "did not finish" in timeout[0].message


def test_data_root(tmp_path: Path) -> None:
    assert check_data_root({"DockerRootDir": str(tmp_path)}, None) == []
    missing = check_data_root({"DockerRootDir": str(tmp_path / "nope")}, None)
    assert missing[0].fatal and "does not exist" in missing[0].message
    # The agent may see the daemon's root at another path: the configured one wins.
    assert check_data_root({"DockerRootDir": "/var/lib/docker"}, tmp_path) == []
    missing_mapped = check_data_root({"DockerRootDir": str(tmp_path)}, tmp_path / "nope")
    assert "does not exist" in missing_mapped[0].message
    assert check_data_root({}, None) == []


def _write_cert(tmp_path: Path, days: int) -> tuple[Path, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ca.pem").write_bytes(pem)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "key.pem").chmod(0o600)
    return tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls_files_checked_against_this_host(tmp_path: Path) -> None:
    tls = _write_cert(tmp_path, days=30)
    assert prereqs.check_tls(*tls, host="node-a") == []
    wrong = prereqs.check_tls(*tls, host="node-z")
    assert wrong and "node-z" in wrong[0].message


def test_tls_problem_says_how_to_fix(tmp_path: Path) -> None:
    problems = prereqs.check_tls(tmp_path / "ca", tmp_path / "c", tmp_path / "k", host="node-a")
    assert problems and all(p.fatal for p in problems)
    assert "ferry certs" in problems[0].fix and "tls.ca" in problems[0].fix


def test_down_peer_is_a_warning_not_fatal() -> None:
    async def probe() -> list[PeerHealth]:
        return [
            PeerHealth(name="b", reachable=True),
            PeerHealth(name="c", reachable=False, error="certificate verify failed"),
        ]

    problems = run_async(check_peers(probe))
    assert [(p.check, p.fatal) for p in problems] == [("peer:c", False)]
    assert "certificate verify failed" in problems[0].message


def test_run_prereqs_orders_fatal_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prereqs, "_run", fake_run("Version: 4.2\n"))
    tls = _write_cert(tmp_path, days=30)

    async def probe() -> list[PeerHealth]:
        return [PeerHealth(name="b", reachable=False)]

    problems = run_async(
        run_prereqs(
            docker=FakeDocker(experimental=False, root=str(tmp_path)),
            docker_url="u",
            data_root=None,
            criu_command=["criu", "--version"],
            tls_files=tls,
            host="node-a",
            peer_probe=probe,
        )
    )
    assert [(p.check, p.fatal) for p in problems] == [("docker", True), ("peer:b", False)]


def test_runc_command_must_answer_version() -> None:
    cmd = ["nsenter", "-t", "1", "-m", "-p", "runc", "--root", "/run/docker/runtime-runc/moby"]
    ok = fake_run("runc version 1.1.15\ncommit: x\n")
    assert check_runc(cmd, run=ok) == []
    assert ok.calls == [[*cmd, "--version"]]

    (missing,) = check_runc(["runc"], run=fake_run(exc=FileNotFoundError("runc")))
    assert missing.check == "runc" and missing.fatal
    assert "docker.runc_command" in missing.fix and "checkpoint_via: engine" in missing.fix
    (failed,) = check_runc(cmd, run=fake_run("nsenter: reassociate to namespace failed", rc=1))
    assert "exited 1: nsenter: reassociate" in failed.message
    (timeout,) = check_runc(["runc"], run=fake_run(exc=subprocess.TimeoutExpired("runc", 20)))
    assert "could not run" in timeout.message


def test_run_prereqs_checks_runc_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fake_run("Version: 4.2\n")  # no "runc version" in it: runc would fail
    monkeypatch.setattr(prereqs, "_run", run)
    tls = _write_cert(tmp_path, days=30)
    common: dict[str, Any] = {
        "docker": FakeDocker(root=str(tmp_path)),
        "docker_url": "u",
        "data_root": None,
        "criu_command": ["criu", "--version"],
        "tls_files": tls,
        "host": "node-a",
    }
    assert run_async(run_prereqs(**common)) == []
    problems = run_async(run_prereqs(**common, runc_command=["runc"]))
    assert [(p.check, p.fatal) for p in problems] == [("runc", True)]
