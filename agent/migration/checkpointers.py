"""How the source freezes a container: dockerd's runc directly (default), or Docker's API.

`RuncCheckpointer` (``migration.checkpoint_via: runc``, the default) freezes the
container in place and dumps it with the options live services need:

- ``docker pause`` first, then ``runc checkpoint --leave-running
  --tcp-established --file-locks --image-path <checkpoints dir>/<name>``. CRIU
  restores the freezer state it found, so the container stays paused with every
  process, socket and lock intact while its images travel. A rollback is then
  just ``docker unpause``: nothing is restored, connections and locks are kept,
  the address never changed. After the commit the source copy is killed, and its
  kernel closes the old connections at once, so clients see them end then
  (README "What clients of a moved service see").
- The images go straight where ``docker start --checkpoint`` reads them, instead
  of through containerd's content store (2x faster for 256 MiB in ``make bench``).
- `DUMP_OPTIONS` are recorded in the migration's spec; the target derives its
  restore options from them (`restore_options_for`), because restoring file-lock
  images without ``file-locks`` silently drops the locks.

`EngineCheckpointer` (``checkpoint_via: engine``) is Docker's checkpoint API.
Docker passes CRIU nothing but ``Exit`` (moby's libcontainerd -> containerd's
runc shim), so a container with an established TCP connection or a held file
lock cannot be dumped that way, and the container exits (137) at the dump.

Both quote CRIU's first error line and a copy of its log, kept under
``<state_dir>/criu-logs/`` (the originals live in dockerd's mount namespace and
are deleted soon after).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import structlog

from agent.config import FerryConfig
from agent.docker_adapter import CHECKPOINT_NAME_RE, CheckpointError, DockerAdapter, DockerError
from agent.migration import criu_log
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]

_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WORK_PREFIX = "ferry-criu-"  # under <data root>/tmp, which dockerd empties at its start
# CRIU options of the runc dump, as config-file lines (runc takes them as --flags).
DUMP_OPTIONS: tuple[str, ...] = ("tcp-established", "file-locks")


def in_daemon_namespaces(daemon_pid: int, command: Sequence[str]) -> list[str]:
    """`command` run in dockerd's mount and PID namespaces and with its root."""
    return ["nsenter", "-t", str(daemon_pid), "-m", "-p", "-r", *command]


def restore_options_for(dump_options: Sequence[str]) -> list[str]:
    """The CRIU restore options images dumped with `dump_options` need on another host.

    ``tcp-established`` becomes ``tcp-close``: the container's address changes, so
    the connections cannot be re-bound (CRIU then fails with "Can't bind inet
    socket back: Cannot assign requested address"); listening sockets are
    restored as they were. ``file-locks`` must be repeated, or the locks are
    silently dropped.
    """
    out: list[str] = []
    for opt in dump_options:
        if opt == "tcp-established":
            out.append("tcp-close")
        elif opt == "file-locks":
            out.append("file-locks")
        else:
            raise ValueError(f"no restore option known for CRIU dump option {opt!r}")
    return out


class Checkpointer(Protocol):
    """Freezes a container into CRIU images under its checkpoints dir.

    Afterwards the container is paused (`frozen_in_place`) or exited.
    """

    via: str
    options: tuple[str, ...]  # CRIU dump options used; the target restores with matching ones
    frozen_in_place: bool

    def checkpoint(self, container_id: str, name: str) -> None:
        """Blocking. Raises DockerError (CheckpointError when the dump itself failed)."""
        ...


class _Docker(Protocol):
    def inspect_container(self, container: str) -> dict[str, Any]: ...
    def pause(self, container: str) -> None: ...
    def unpause(self, container: str) -> None: ...
    def daemon_pid(self) -> int | None: ...


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run in its own process group so a timeout kills runc and its CRIU too.

    (nsenter -p forks: killing only the direct child would leave runc dumping.)
    """
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class EngineCheckpointer:
    """Docker's checkpoint API (`POST /containers/{id}/checkpoints` with Exit)."""

    via = "engine"
    options: tuple[str, ...] = ()
    frozen_in_place = False

    def __init__(self, adapter: DockerAdapter, logs_dir: Path | None = None) -> None:
        self.adapter = adapter
        self.logs_dir = logs_dir

    def checkpoint(self, container_id: str, name: str) -> None:
        try:
            self.adapter.checkpoint_create(container_id, name, True)
        except CheckpointError as exc:
            words = self._criu_words(exc.message, name)
            if words is None:
                raise
            raise CheckpointError(exc.operation, f"{words}; Docker: {exc.message}") from exc

    def _criu_words(self, message: str, name: str) -> str | None:
        daemon_log = criu_log.log_path_in(message)
        if daemon_log is None or self.logs_dir is None:
            return None
        pid = self.adapter.daemon_pid()
        local = criu_log.in_daemon_root(pid, daemon_log) if pid else Path(daemon_log)
        kept = criu_log.keep(local, self.logs_dir, f"{name}.dump.log")
        return criu_log.describe(kept)


class RuncCheckpointer:
    """``docker pause``, then `<runc_command> checkpoint --leave-running ...` in dockerd's view.

    On success the container stays paused with its images written. On failure
    it is unpaused (it never stopped), the partial images and runc's work dir
    are removed, and the error carries runc's message and CRIU's first error
    line with the path of a kept copy of dump.log.
    """

    via = "runc"
    options: tuple[str, ...] = DUMP_OPTIONS
    frozen_in_place = True

    def __init__(
        self,
        adapter: _Docker,
        data_root: Callable[[], DataRoot],
        command: Sequence[str],
        timeout: float,
        logs_dir: Path | None = None,
        run: Runner | None = None,
        enter_daemon: bool = False,
    ) -> None:
        self.adapter = adapter
        self.data_root = data_root
        self.command = list(command)
        self.enter_daemon = enter_daemon
        self.timeout = timeout
        self.logs_dir = logs_dir
        self.run = run or _run

    def prefix(self) -> list[str]:
        """The runc argv prefix; in dockerd's namespaces when `enter_daemon`."""
        if not self.enter_daemon:
            return list(self.command)
        pid = self.adapter.daemon_pid()
        if pid is None:
            raise CheckpointError(
                "checkpoint via runc",
                "cannot tell dockerd's process from docker.url to run runc in its "
                "namespaces; set docker.runc_in_daemon_namespaces: false and a "
                "docker.runc_command that runs there",
            )
        return in_daemon_namespaces(pid, self.command)

    def argv(self, root: DataRoot, container_id: str, name: str) -> list[str]:
        return [
            *self.prefix(),
            "checkpoint",
            "--leave-running",
            *(f"--{opt}" for opt in self.options),
            "--image-path",
            root.daemon_checkpoint_dir(container_id, name),
            "--work-path",
            root.daemon_path("tmp", WORK_PREFIX + name),
            container_id,
        ]

    def checkpoint(self, container_id: str, name: str) -> None:
        if not CHECKPOINT_NAME_RE.match(name):
            raise ValueError(f"invalid checkpoint name {name!r}")
        if not _CONTAINER_ID_RE.match(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        op = f"checkpoint {container_id} as {name} via runc"
        root = self.data_root()
        images = root.checkpoint_dir(container_id, name)
        if images.exists():
            raise CheckpointError(op, f"{images} already exists")
        argv = self.argv(root, container_id, name)
        work = root.local(argv[argv.index("--work-path") + 1])
        shutil.rmtree(work, ignore_errors=True)
        shown = " ".join(argv)
        started = time.monotonic()
        try:
            self.adapter.pause(container_id)
        except DockerError as exc:
            raise CheckpointError(op, f"could not pause it before the dump: {exc.message}") from exc
        paused = time.monotonic()
        try:
            proc = self.run(argv, self.timeout)
        except FileNotFoundError:
            self._fail(op, f"`{argv[0]}`: command not found (check docker.runc_command)",
                       None, container_id, images, work, name)  # fmt: skip
        except subprocess.TimeoutExpired:
            self._fail(
                op,
                f"`{shown}` did not finish in {self.timeout:g}s (migration.checkpoint_timeout)",
                None, container_id, images, work, name,
            )  # fmt: skip
        except OSError as exc:
            self._fail(op, f"`{shown}` could not run: {exc}", None, container_id, images, work,
                       name)  # fmt: skip
        if proc.returncode != 0:
            self._fail(op, f"`{shown}` exited {proc.returncode}", proc, container_id, images,
                       work, name)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        log.info(
            "migration.runc_checkpointed",
            container=container_id,
            checkpoint=name,
            options=list(self.options),
            pause_s=round(paused - started, 3),
            dump_s=round(time.monotonic() - started, 3),
        )

    def _fail(
        self,
        op: str,
        what: str,
        proc: subprocess.CompletedProcess[str] | None,
        container_id: str,
        images: Path,
        work: Path,
        name: str,
    ) -> NoReturn:
        parts = [what]
        if proc is not None:
            said = _tail(f"{proc.stderr}\n{proc.stdout}", 3)
            if said:
                parts.append("runc: " + " | ".join(said))
        kept = None
        if self.logs_dir is not None:
            kept = criu_log.keep(work / "dump.log", self.logs_dir, f"{name}.dump.log")
        words = criu_log.describe(kept if kept is not None else work / "dump.log")
        if words:
            parts.insert(0, words)
        # Nothing was lost: the processes never stopped. Half-written images must
        # not look like a checkpoint, and runc's work dir must not pile up.
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        try:
            self.adapter.unpause(container_id)
            parts.append("the container runs on, unchanged")
        except DockerError as exc:
            if self._paused(container_id):
                parts.append(f"AND it stays paused: unpause failed: {exc.message}")
        message = "; ".join(parts)
        log.error("migration.runc_checkpoint_failed", error=message)
        raise CheckpointError(op, message)

    def _paused(self, container_id: str) -> bool:
        try:
            state = self.adapter.inspect_container(container_id).get("State") or {}
        except DockerError:
            return False
        return bool(state.get("Paused"))


def _tail(text: str, n: int) -> list[str]:
    lines = [x.rstrip() for x in text.splitlines() if x.strip()]
    return lines[-n:]


def make_checkpointer(
    config: FerryConfig,
    adapter: DockerAdapter,
    data_root: Callable[[], DataRoot],
    run: Runner | None = None,
) -> Checkpointer:
    """The checkpointer `migration.checkpoint_via` selects."""
    logs_dir = Path(config.state_dir) / criu_log.LOGS_DIR
    if config.migration.checkpoint_via == "runc":
        return RuncCheckpointer(
            adapter,
            data_root,
            config.docker.runc_command,
            timeout=config.migration.checkpoint_timeout,
            logs_dir=logs_dir,
            run=run,
            enter_daemon=config.docker.runc_in_daemon_namespaces,
        )
    return EngineCheckpointer(adapter, logs_dir)
