"""CRIU's own words, extracted from real logs of failed dumps and restores on the testbed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.migration import criu_log

FIXTURES = Path(__file__).parent / "fixtures" / "criu"
# Docker's and runc's own messages for the failures the fixtures come from.
DOCKER_DUMP_ERROR = (
    "Cannot checkpoint container xl: runc did not terminate successfully: exit status 1: "
    "criu failed: type NOTIFY errno 0 path= /var/run/docker/containerd/daemon/"
    "io.containerd.runtime.v2.task/moby/1ad4/criu-dump.log: unknown"
)
DOCKER_RESTORE_ERROR = (
    "OCI runtime restore failed: criu failed: type NOTIFY errno 0\nlog file: "
    "/var/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/e3bf/work/"
    "restore.log: unknown"
)


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "tcp-dump.log",
            "Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using "
            "--tcp-established option.",
        ),
        (
            "locks-dump.log",
            "Error (criu/file-lock.c:110): Some file locks are hold by dumping tasks! "
            "You can try --file-locks to dump them.",
        ),
        ("tcp-restore.log", "Error (criu/sk-inet.c:912): inet: Connected TCP socket in image"),
    ],
)
def test_first_real_error_line_skips_the_harmless_rlimit_one(fixture: str, expected: str) -> None:
    text = (FIXTURES / fixture).read_text()
    assert "Can't setup RLIMIT_NOFILE for self" in text  # logged first, on every run here
    assert criu_log.first_error(text) == expected


def test_only_the_harmless_line_is_still_quoted_and_no_error_is_none() -> None:
    only = "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: x\n"
    assert criu_log.first_error(only) == only.split(") ", 1)[1].strip()
    assert criu_log.first_error("(00.1) Dumping finished successfully\n") is None


def test_log_paths_in_docker_messages() -> None:
    assert criu_log.log_path_in(DOCKER_DUMP_ERROR) == (
        "/var/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/1ad4/criu-dump.log"
    )
    assert criu_log.log_path_in(
        DOCKER_RESTORE_ERROR,
    ).endswith("/moby/e3bf/work/restore.log")
    assert criu_log.log_path_in("no such container") is None


def test_daemon_paths_resolve_inside_its_root_even_through_absolute_symlinks(
    tmp_path: Path,
) -> None:
    root = tmp_path / "proc" / "77" / "root"
    (root / "run" / "docker").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var" / "run")  # as in Debian: would escape to our /run
    log = root / "run" / "docker" / "criu-dump.log"
    log.write_text("x")
    found = criu_log.in_daemon_root(77, "/var/run/docker/criu-dump.log", proc=tmp_path / "proc")
    assert found == log and found.read_text() == "x"


def test_describe_keeps_a_copy_and_names_it(tmp_path: Path) -> None:
    src = tmp_path / "restore.log"
    src.write_text((FIXTURES / "tcp-restore.log").read_text())
    kept = criu_log.keep(src, tmp_path / "state" / "criu-logs", "m1.restore.log")
    assert kept is not None
    src.unlink()  # Docker deletes its own
    assert criu_log.describe(kept) == (
        f"CRIU: Error (criu/sk-inet.c:912): inet: Connected TCP socket in image (log {kept})"
    )
    assert criu_log.keep(src, tmp_path, "gone.log") is None
    assert criu_log.describe(None) is None
