"""The runc checkpoint backend: argv, daemon-side paths, errors, and the engine using it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import FerryConfig
from agent.docker_adapter import CheckpointError, DockerError
from agent.migration import MigrationFailed
from agent.migration.checkpointers import (
    EngineCheckpointer,
    RuncCheckpointer,
    make_checkpointer,
    restore_options_for,
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
# From a real failed dump on the testbed (a counter with one connected client).
REAL_TCP_DUMP_LOG = (Path(__file__).parent / "fixtures" / "criu" / "tcp-dump.log").read_text()


class States:
    """Just the Docker calls the runc checkpointer makes: inspect, pause, unpause."""

    def __init__(self, unpause_fails: bool = False) -> None:
        self.state: dict[str, Any] = {"Running": True, "Paused": False}
        self.calls: list[str] = []
        self.unpause_fails = unpause_fails

    def inspect_container(self, ref: str) -> dict[str, Any]:
        return {"Id": ref, "State": dict(self.state)}

    def pause(self, ref: str) -> None:
        self.calls.append("pause")
        self.state["Paused"] = True

    def unpause(self, ref: str) -> None:
        self.calls.append("unpause")
        if self.unpause_fails:
            raise DockerError("unpause", "containerd says no")
        self.state["Paused"] = False

    def daemon_pid(self) -> int | None:
        return None


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
    return RuncCheckpointer(states, lambda: root, PREFIX, timeout=120, run=run, **kw)


def test_pauses_then_dumps_in_place_with_connections_and_locks(root: DataRoot) -> None:
    run = Runc(root, dump_log=DUMP_LOG)
    states = States()
    _runc(root, states, run).checkpoint(CID, "ferry-x1")

    (argv,) = run.calls
    assert argv == [
        *PREFIX,
        "checkpoint",
        "--leave-running",
        "--tcp-established",
        "--file-locks",
        "--image-path",
        f"{DAEMON_ROOT}/containers/{CID}/checkpoints/ferry-x1",
        "--work-path",
        f"{DAEMON_ROOT}/tmp/ferry-criu-ferry-x1",
        CID,
    ]
    # Frozen before the dump, and left frozen: the rollback only has to unpause.
    assert states.calls == ["pause"] and states.state["Paused"]
    assert (root.checkpoint_dir(CID, "ferry-x1") / "inventory.img").exists()
    assert not (root.local_root / "tmp" / "ferry-criu-ferry-x1").exists(), "work dir kept"


def test_failure_quotes_criu_keeps_its_log_and_resumes_the_container(
    root: DataRoot, tmp_path: Path
) -> None:
    run = Runc(root, rc=1, stderr='level=error msg="criu failed: type NOTIFY errno 0"',
               dump_log=REAL_TCP_DUMP_LOG)  # fmt: skip
    states = States()
    logs = tmp_path / "state" / "criu-logs"
    with pytest.raises(CheckpointError) as err:
        _runc(root, states, run, logs_dir=logs).checkpoint(CID, "ferry-x2")
    msg = str(err.value)
    assert msg.startswith(
        f"checkpoint {CID} as ferry-x2 via runc: CRIU: Error (criu/sk-inet.c:200): inet: "
        "Connected TCP socket, consider using --tcp-established option."
    ), msg
    kept = logs / "ferry-x2.dump.log"
    assert f"(log {kept})" in msg and kept.read_text() == REAL_TCP_DUMP_LOG
    assert "exited 1" in msg and "criu failed: type NOTIFY" in msg
    assert "runs on, unchanged" in msg
    assert states.calls == ["pause", "unpause"] and not states.state["Paused"]
    # Half-written images must not look like a checkpoint; runc's work dir goes too.
    assert not root.checkpoint_dir(CID, "ferry-x2").exists()
    assert not (root.local_root / "tmp" / "ferry-criu-ferry-x2").exists()


def test_failure_says_when_the_container_stays_paused(root: DataRoot) -> None:
    run = Runc(root, rc=1, stderr="criu failed", dump_log=DUMP_LOG)
    with pytest.raises(CheckpointError, match="stays paused: unpause failed: containerd says no"):
        _runc(root, States(unpause_fails=True), run).checkpoint(CID, "ferry-x3")


def test_missing_command_and_timeout(root: DataRoot) -> None:
    states = States()
    with pytest.raises(CheckpointError, match=r"nsenter.*not found.*docker.runc_command"):
        _runc(root, states, Runc(root, exc=FileNotFoundError())).checkpoint(CID, "ferry-x4")
    assert states.calls == ["pause", "unpause"]

    run = Runc(root, exc=subprocess.TimeoutExpired("runc", 120))
    states = States()
    with pytest.raises(CheckpointError, match=r"checkpoint_timeout.*runs on"):
        _runc(root, states, run).checkpoint(CID, "ferry-x5")
    assert states.calls == ["pause", "unpause"]


def test_refuses_bad_names_and_an_existing_checkpoint(root: DataRoot) -> None:
    states = States()
    c = _runc(root, states, Runc(root))
    with pytest.raises(ValueError):
        c.checkpoint("../etc", "ferry-x7")
    with pytest.raises(ValueError):
        c.checkpoint(CID, "../x")
    root.checkpoint_dir(CID, "ferry-x8").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="already exists"):
        c.checkpoint(CID, "ferry-x8")
    assert states.calls == [], "paused although nothing could be dumped"


def test_restore_options_follow_the_dump_options() -> None:
    assert restore_options_for(["tcp-established", "file-locks"]) == ["tcp-close", "file-locks"]
    assert restore_options_for([]) == []
    with pytest.raises(ValueError, match="ext-unix-sk"):
        restore_options_for(["ext-unix-sk"])


def test_config_selects_the_checkpointer(tmp_path: Path) -> None:
    def cfg(**migration: Any) -> FerryConfig:
        return FerryConfig.model_validate({"name": "a", "migration": migration})

    assert cfg().migration.checkpoint_via == "runc"
    engine = make_checkpointer(cfg(checkpoint_via="engine"), None, lambda: None)  # type: ignore[arg-type]
    assert isinstance(engine, EngineCheckpointer) and engine.options == ()
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
    run = Runc(root, **kw)
    host.service.checkpointer = RuncCheckpointer(
        host.docker, host.service.data_root.get, PREFIX, timeout=60, run=run
    )
    return run


def test_engine_migrates_with_runc_images(runc_hosts: tuple[Host, Host]) -> None:
    a, b = runc_hosts
    cid = a.docker.add_running("web")
    run = _use_runc(a, cid)
    seen: list[str] = []
    restore = b.docker.start

    def start(ref: str, checkpoint: str | None = None) -> None:
        # What runc would read at the restore: the container's CRIU config file.
        conf = b.docker._get(ref)["HostConfig"]["Annotations"]["org.criu.config"]
        seen.extend(b.service.data_root.get().local(conf).read_text().splitlines())
        restore(ref, checkpoint)

    b.docker.start = start  # type: ignore[method-assign]
    report = run_async(a.service.migrate("web", "b"))
    assert report.outcome == "succeeded" and report.details["checkpoint_via"] == "runc"
    assert len(run.calls) == 1 and not any(c[0] == "checkpoint" for c in a.docker.calls)
    assert ("pause", cid) in a.docker.calls
    moved = b.docker._get("web")
    assert moved["State"]["Running"] and moved["restored_from"] == f"ferry-{report.migration_id}"
    # The target restores with the options the dump needs.
    assert "tcp-close" in seen and "file-locks" in seen, seen
    assert a.docker.find_container(cid) is None, "the frozen source copy was not removed"


def test_runc_failure_rolls_back_to_the_running_container(
    runc_hosts: tuple[Host, Host],
) -> None:
    a, b = runc_hosts
    cid = a.docker.add_running("web", policy="unless-stopped")
    _use_runc(a, cid, rc=1, stderr="criu failed", dump_log=DUMP_LOG)
    with pytest.raises(MigrationFailed, match="external socket") as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.rolled_back
    c = a.docker.containers[cid]
    assert c["State"]["Running"] and not c["State"]["Paused"] and "restored_from" not in c
    assert c["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    rec = a.journal.get(err.value.report.migration_id)
    assert rec.outcome == "rolled_back"
    assert "still running" in rec.report["details"]["rollback"]
    assert b.docker.find_container("web") is None


def test_failure_after_a_runc_freeze_unpauses_in_place(
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
    assert c["State"]["Running"] and not c["State"]["Paused"]
    assert "restored_from" not in c, "restored although it never stopped"
    assert ("unpause", cid) in a.docker.calls
    rec = a.journal.get(err.value.report.migration_id)
    assert "resumed in place" in rec.report["details"]["rollback"]
    mid = err.value.report.migration_id
    assert not a.service.data_root.get().checkpoint_dir(cid, f"ferry-{mid}").exists()


def test_a_kept_source_copy_is_killed_not_left_frozen(runc_hosts: tuple[Host, Host]) -> None:
    a, _ = runc_hosts
    a.service.config = a.service.config.model_copy(
        update={"migration": a.config.migration.model_copy(update={"keep_source_copy_for": 60.0})}
    )
    cid = a.docker.add_running("web")
    _use_runc(a, cid)

    async def scenario() -> Any:
        report = await a.service.migrate("web", "b")
        await a.service.close()  # cancels the pending removal: nothing outlives the service
        return report

    report = run_async(scenario())
    assert report.outcome == "succeeded", report.reason
    # Frozen, it would hold its clients' connections open until their timeouts.
    kept = a.docker.containers[cid]
    assert ("kill", cid) in a.docker.calls and not kept["State"]["Running"]
    assert kept["Name"] == f"/web-ferry-{report.migration_id}"


def test_a_failed_restore_quotes_criu_from_the_targets_kept_log(
    runc_hosts: tuple[Host, Host],
) -> None:
    from agent.migration import criu_config

    a, b = runc_hosts
    cid = a.docker.add_running("web")
    _use_runc(a, cid)
    restore = b.docker.start
    real_log = (Path(__file__).parent / "fixtures" / "criu" / "tcp-restore.log").read_text()
    mids: list[str] = []

    def start(ref: str, checkpoint: str | None = None) -> None:
        if checkpoint is not None:
            # What CRIU writes through the log-file line of the copy's config.
            mid = checkpoint.removeprefix("ferry-")
            mids.append(mid)
            conf = criu_config.for_migration(b.service.data_root.get(), mid)
            conf.local_log.write_text(real_log)
            b.docker.fail_restore = "criu failed: type NOTIFY errno 0"
        restore(ref, checkpoint)

    b.docker.start = start  # type: ignore[method-assign]
    with pytest.raises(MigrationFailed) as err:
        run_async(a.service.migrate("web", "b"))
    kept = Path(b.config.state_dir) / "criu-logs" / f"ferry-{mids[0]}.restore.log"
    assert (
        "CRIU: Error (criu/sk-inet.c:912): inet: Connected TCP socket in image "
        f"(log {kept})" in str(err.value)
    ), str(err.value)
    assert kept.read_text() == real_log
    # Rolled back by unpausing: the source copy runs on.
    assert a.docker.containers[cid]["State"]["Running"]
    assert not a.docker.containers[cid]["State"]["Paused"]


def test_runc_runs_in_dockerds_namespaces_found_through_its_socket(root: DataRoot) -> None:
    class Found(States):
        def daemon_pid(self) -> int | None:
            return 4242

    run = Runc(root)
    plain = ["runc", "--root", "/run/docker/runtime-runc/moby"]
    RuncCheckpointer(
        Found(), lambda: root, plain, timeout=5, run=run, enter_daemon=True
    ).checkpoint(CID, "ferry-x9")
    assert run.calls[0][:9] == ["nsenter", "-t", "4242", "-m", "-p", "-r", *plain]
    # No PID behind docker.url (a TCP daemon): refused before anything is paused.
    states = States()
    lost = RuncCheckpointer(states, lambda: root, plain, timeout=5, run=run, enter_daemon=True)
    with pytest.raises(CheckpointError, match="runc_in_daemon_namespaces: false"):
        lost.checkpoint(CID, "ferry-x10")
    assert states.calls == []
