"""The runc checkpoint backend: argv, daemon-side paths, errors, and the engine using it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import FerryConfig
from agent.docker_adapter import CheckpointError
from agent.migration import MigrationFailed
from agent.migration.checkpointers import (
    EngineCheckpointer,
    RuncCheckpointer,
    make_checkpointer,
)
from agent.migration.paths import DataRoot
from tests.helpers import run_async
from tests.unit.test_migration_engine import IMAGE_ID, DirectPeer, Host

CID = "ab" * 32
DAEMON_ROOT = "/var/lib/docker"
PREFIX = [
    "nsenter",
    "-t",
    "42",
    "-m",
    "-p",
    "-r",
    "runc",
    "--root",
    "/run/docker/runtime-runc/moby",
]
DUMP_LOG = "(00.01) Dumping task\n(00.02) Error (criu/sk-unix.c:123): unix: external socket\n"


class States:
    """inspect_container answering from a list of Running values (the last one repeats)."""

    def __init__(self, *running: bool) -> None:
        self.running = list(running)
        self.asked = 0

    def inspect_container(self, ref: str) -> dict[str, Any]:
        self.asked += 1
        value = self.running.pop(0) if len(self.running) > 1 else self.running[0]
        return {"Id": ref, "State": {"Running": value}}


class Runc:
    """A fake runner: records argv, acts like runc on the local view of the daemon's paths."""

    def __init__(
        self,
        root: DataRoot,
        rc: int = 0,
        stderr: str = "",
        dump_log: str | None = None,
        exc: BaseException | None = None,
        on_dump: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        self.rc, self.stderr, self.dump_log, self.exc = rc, stderr, dump_log, exc
        self.on_dump = on_dump
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        if argv[len(PREFIX)] == "resume":
            return subprocess.CompletedProcess(argv, 1, "", "container not paused")
        if self.exc is not None:
            raise self.exc
        images = self.root.local(argv[argv.index("--image-path") + 1])
        work = self.root.local(argv[argv.index("--work-path") + 1])
        images.mkdir(parents=True)
        (images / "pages-1.img").write_bytes(b"p" * 4096)
        (images / "inventory.img").write_bytes(b"inv")
        work.mkdir(parents=True)
        if self.dump_log is not None:
            (work / "dump.log").write_text(self.dump_log)
        if self.on_dump is not None and self.rc == 0:
            self.on_dump()
        return subprocess.CompletedProcess(argv, self.rc, "", self.stderr)


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(DAEMON_ROOT, tmp_path / "docker")


def _runc(root: DataRoot, states: States, run: Runc, **kw: Any) -> RuncCheckpointer:
    return RuncCheckpointer(states, lambda: root, PREFIX, timeout=120, run=run, poll=0, **kw)


def test_argv_uses_dockers_flags_and_the_daemons_paths(root: DataRoot) -> None:
    run = Runc(root, dump_log=DUMP_LOG)
    states = States(True, True, False)  # Docker notices the exit a little later
    _runc(root, states, run).checkpoint(CID, "ferry-x1")

    (argv,) = run.calls
    assert argv == [
        *PREFIX,
        "checkpoint",
        "--image-path",
        f"{DAEMON_ROOT}/containers/{CID}/checkpoints/ferry-x1",
        "--work-path",
        f"{DAEMON_ROOT}/tmp/ferry-criu-ferry-x1",
        CID,
    ]
    # Docker's own path (containerd's runc shim) passes none of these.
    for flag in ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                 "--manage-cgroups-mode", "--leave-running", "--empty-ns"):  # fmt: skip
        assert flag not in argv
    assert (root.checkpoint_dir(CID, "ferry-x1") / "inventory.img").exists()
    assert not (root.local_root / "tmp" / "ferry-criu-ferry-x1").exists(), "work dir kept"
    assert states.asked == 3


def test_failure_reports_runc_and_the_criu_log_and_drops_partial_images(root: DataRoot) -> None:
    run = Runc(root, rc=1, stderr='level=error msg="criu failed: type NOTIFY errno 0"',
               dump_log=DUMP_LOG)  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        _runc(root, States(True), run).checkpoint(CID, "ferry-x2")
    msg = str(err.value)
    assert "exited 1" in msg and "criu failed: type NOTIFY" in msg
    assert f"{DAEMON_ROOT}/tmp/ferry-criu-ferry-x2/dump.log" in msg
    assert "Error (criu/sk-unix.c:123): unix: external socket" in msg
    assert "still running" in msg
    # CRIU resumed it: the half-written images must not look like a checkpoint.
    assert not root.checkpoint_dir(CID, "ferry-x2").exists()


def test_failure_after_the_kill_keeps_the_images_for_the_rollback(root: DataRoot) -> None:
    run = Runc(root, rc=1, stderr="criu failed", dump_log=DUMP_LOG)
    with pytest.raises(CheckpointError):
        _runc(root, States(False), run).checkpoint(CID, "ferry-x3")
    assert (root.checkpoint_dir(CID, "ferry-x3") / "inventory.img").exists()


def test_missing_command_and_timeout(root: DataRoot) -> None:
    with pytest.raises(CheckpointError, match=r"nsenter.*not found.*docker.runc_command"):
        _runc(root, States(True), Runc(root, exc=FileNotFoundError())).checkpoint(CID, "ferry-x4")

    run = Runc(root, exc=subprocess.TimeoutExpired("runc", 120))
    with pytest.raises(CheckpointError, match=r"checkpoint_timeout.*still running"):
        _runc(root, States(True), run).checkpoint(CID, "ferry-x5")
    # A dump killed half-way may leave the cgroup frozen: it is thawed.
    assert run.calls[-1] == [*PREFIX, "resume", CID]


def test_docker_still_running_after_the_dump_is_an_error(root: DataRoot) -> None:
    run = Runc(root)
    with pytest.raises(CheckpointError, match="still shows the container running"):
        _runc(root, States(True), run, stop_timeout=0).checkpoint(CID, "ferry-x6")


def test_refuses_bad_names_and_an_existing_checkpoint(root: DataRoot) -> None:
    c = _runc(root, States(False), Runc(root))
    with pytest.raises(ValueError):
        c.checkpoint("../etc", "ferry-x7")
    with pytest.raises(ValueError):
        c.checkpoint(CID, "../x")
    root.checkpoint_dir(CID, "ferry-x8").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="already exists"):
        c.checkpoint(CID, "ferry-x8")


def test_config_selects_the_checkpointer(tmp_path: Path) -> None:
    def cfg(**migration: Any) -> FerryConfig:
        return FerryConfig.model_validate({"name": "a", "migration": migration})

    assert cfg().migration.checkpoint_via == "engine"
    assert isinstance(make_checkpointer(cfg(), None, lambda: None), EngineCheckpointer)  # type: ignore[arg-type]
    runc = make_checkpointer(
        cfg(checkpoint_via="RUNC", checkpoint_timeout="30s"), None, lambda: None
    )  # type: ignore[arg-type]
    assert isinstance(runc, RuncCheckpointer)
    assert runc.command == ["runc", "--root", "/run/docker/runtime-runc/moby"]
    assert runc.timeout == 30


# ---------------------------------------------------------------- through the engine


@pytest.fixture
def runc_hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")
    yield a, b
    a.journal.close()
    b.journal.close()


def _use_runc(host: Host, cid: str, **kw: Any) -> Runc:
    root = host.service.data_root.get()

    def killed() -> None:  # what CRIU does after a dump without --leave-running
        host.docker.containers[cid]["State"] = {"Status": "exited", "Running": False}

    run = Runc(root, on_dump=killed, **kw)
    host.service.checkpointer = RuncCheckpointer(
        host.docker, host.service.data_root.get, PREFIX, timeout=60, run=run, poll=0
    )
    return run


def test_engine_migrates_with_runc_images(runc_hosts: tuple[Host, Host]) -> None:
    a, b = runc_hosts
    cid = a.docker.add_running("web")
    run = _use_runc(a, cid)
    report = run_async(a.service.migrate("web", "b"))
    assert report.outcome == "succeeded" and report.details["checkpoint_via"] == "runc"
    assert len(run.calls) == 1 and not any(c[0] == "checkpoint" for c in a.docker.calls)
    moved = b.docker._get("web")
    assert moved["State"]["Running"] and moved["restored_from"] == f"ferry-{report.migration_id}"


def test_runc_failure_before_the_kill_rolls_back_to_the_running_container(
    runc_hosts: tuple[Host, Host],
) -> None:
    a, b = runc_hosts
    cid = a.docker.add_running("web", policy="unless-stopped")
    _use_runc(a, cid, rc=1, stderr="criu failed", dump_log=DUMP_LOG)
    with pytest.raises(MigrationFailed, match="external socket") as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.rolled_back
    c = a.docker.containers[cid]
    assert c["State"]["Running"] and "restored_from" not in c
    assert c["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    rec = a.journal.get(err.value.report.migration_id)
    assert rec.outcome == "rolled_back"
    assert "still running" in rec.report["details"]["rollback"]
    assert b.docker.find_container("web") is None


def test_failure_after_a_runc_freeze_restores_from_its_images(
    runc_hosts: tuple[Host, Host],
) -> None:
    a, _ = runc_hosts
    cid = a.docker.add_running("web")
    _use_runc(a, cid)
    a.peers["b"].break_upload = True
    with pytest.raises(MigrationFailed, match="transfer broke") as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.rolled_back
    c = a.docker.containers[cid]
    assert c["State"]["Running"]
    assert c["restored_from"] == f"ferry-{err.value.report.migration_id}-rb1"
