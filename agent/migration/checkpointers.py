"""How the source freezes a container: Docker's checkpoint API, or dockerd's runc directly.

Both leave the same result: CRIU images in
``<data root>/containers/<id>/checkpoints/<name>/`` and the container exited
(137) in Docker's view. Transfer, `docker start --checkpoint` on the target and
the local rollback therefore do not care which one froze it.

Docker's own path (moby's libcontainerd -> containerd's task Checkpoint -> the
runc shim) asks for nothing but ``Exit``. The shim then runs ``runc checkpoint
--image-path <tmp> --work-path <tmp>`` with none of --tcp-established,
--ext-unix-sk, --shell-job, --file-locks, --empty-ns or --manage-cgroups-mode
(CRIU's default, "soft"), containerd tars the images into its content store, and
dockerd unpacks them into the checkpoints dir: most of the time for large
memory. `RuncCheckpointer` runs the same runc command with the same flags, but
with ``--image-path`` pointing straight at the checkpoints dir. (containerd also
pauses the task around its checkpoint; runc hands CRIU the container's freezer
cgroup, which freezes it for the dump either way.)
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
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]

_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RUNC_LOG_TAIL = 12  # lines of CRIU's dump.log quoted in an error
WORK_PREFIX = "ferry-criu-"  # under <data root>/tmp, which dockerd empties at its start


class Checkpointer(Protocol):
    """Freezes a container into CRIU images under its checkpoints dir and leaves it exited."""

    via: str

    def checkpoint(self, container_id: str, name: str) -> None:
        """Blocking. Raises DockerError (CheckpointError when the dump itself failed)."""
        ...


class _Inspector(Protocol):
    def inspect_container(self, container: str) -> dict[str, Any]: ...


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

    def __init__(self, adapter: DockerAdapter) -> None:
        self.adapter = adapter

    def checkpoint(self, container_id: str, name: str) -> None:
        self.adapter.checkpoint_create(container_id, name, True)


class RuncCheckpointer:
    """`<runc_command> checkpoint --image-path <checkpoints dir>/<name> ...` in dockerd's view.

    On success it waits (up to `stop_timeout`) for Docker to see the container
    exit, so nothing moves on while dockerd still thinks it runs. On failure the
    error carries runc's message and the tail of CRIU's dump.log; when the
    container is still running (CRIU resumes it after a failed dump), the partial
    images are removed so the rollback finds it simply running.
    """

    via = "runc"

    def __init__(
        self,
        adapter: _Inspector,
        data_root: Callable[[], DataRoot],
        command: Sequence[str],
        timeout: float,
        stop_timeout: float = 30.0,
        run: Runner | None = None,
        poll: float = 0.05,
    ) -> None:
        self.adapter = adapter
        self.data_root = data_root
        self.command = list(command)
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.run = run or _run
        self.poll = poll

    def argv(self, root: DataRoot, container_id: str, name: str) -> list[str]:
        # The same flags containerd's runc shim uses for Docker's checkpoint: none.
        return [
            *self.command,
            "checkpoint",
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
        work_daemon = argv[argv.index("--work-path") + 1]
        work = root.local(work_daemon)
        shutil.rmtree(work, ignore_errors=True)
        shown = " ".join(argv)
        started = time.monotonic()
        try:
            proc = self.run(argv, self.timeout)
        except FileNotFoundError:
            self._fail(op, f"`{argv[0]}`: command not found (check docker.runc_command)", None)
        except subprocess.TimeoutExpired:
            # Killed mid-dump, CRIU may leave the container's cgroup frozen: thaw it.
            self._resume(container_id)
            self._fail(
                op,
                f"`{shown}` did not finish in {self.timeout:g}s (migration.checkpoint_timeout)",
                None,
                container_id,
                images,
                work,
                work_daemon,
            )
        except OSError as exc:
            self._fail(op, f"`{shown}` could not run: {exc}", None)
        if proc.returncode != 0:
            self._fail(
                op,
                f"`{shown}` exited {proc.returncode}",
                proc,
                container_id,
                images,
                work,
                work_daemon,
            )
        dumped = time.monotonic() - started
        self._wait_exited(op, container_id)
        shutil.rmtree(work, ignore_errors=True)
        log.info(
            "migration.runc_checkpointed",
            container=container_id,
            checkpoint=name,
            dump_s=round(dumped, 3),
            total_s=round(time.monotonic() - started, 3),
        )

    def _resume(self, container_id: str) -> None:
        try:
            proc = self.run([*self.command, "resume", container_id], 30.0)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("migration.runc_resume_failed", container=container_id, error=str(exc))
            return
        if proc.returncode != 0:  # "not paused" when CRIU had not frozen it yet
            log.info("migration.runc_resume", container=container_id, said=proc.stderr.strip())

    def _wait_exited(self, op: str, container_id: str) -> None:
        deadline = time.monotonic() + self.stop_timeout
        while True:
            state = self.adapter.inspect_container(container_id).get("State") or {}
            if not state.get("Running"):
                return
            if time.monotonic() >= deadline:
                raise CheckpointError(
                    op,
                    f"runc reported the dump done but Docker still shows the container "
                    f"running after {self.stop_timeout:g}s",
                )
            time.sleep(self.poll)

    def _fail(
        self,
        op: str,
        what: str,
        proc: subprocess.CompletedProcess[str] | None,
        container_id: str | None = None,
        images: Path | None = None,
        work: Path | None = None,
        work_daemon: str | None = None,
    ) -> NoReturn:
        parts = [what]
        if proc is not None:
            said = _tail(f"{proc.stderr}\n{proc.stdout}", 3)
            if said:
                parts.append("runc: " + " | ".join(said))
        if work is not None:
            dump_log = work / "dump.log"
            try:
                lines = _tail(dump_log.read_text(errors="replace"), RUNC_LOG_TAIL)
            except OSError:
                lines = []
            if lines:
                parts.append(f"CRIU log {work_daemon}/dump.log ends:\n  " + "\n  ".join(lines))
        if container_id is not None and images is not None and self._still_running(container_id):
            # CRIU resumed it: nothing was lost, and half-written images must not linger.
            shutil.rmtree(images, ignore_errors=True)
            parts.append("the container is still running")
        message = "; ".join(parts)
        log.error("migration.runc_checkpoint_failed", error=message)
        raise CheckpointError(op, message)

    def _still_running(self, container_id: str) -> bool:
        try:
            state = self.adapter.inspect_container(container_id).get("State") or {}
        except DockerError:
            return False
        return bool(state.get("Running"))


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
    if config.migration.checkpoint_via == "runc":
        return RuncCheckpointer(
            adapter,
            data_root,
            config.docker.runc_command,
            timeout=config.migration.checkpoint_timeout,
            run=run,
        )
    return EngineCheckpointer(adapter)
