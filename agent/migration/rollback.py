"""Bring a frozen container back to life on the source, from its own checkpoint.

A container frozen in place (the runc checkpointer: paused, dumped with
``--leave-running``) is simply unpaused: the same processes carry on with their
connections, file locks and address; the images are then dropped.

Otherwise (Docker's checkpoint API exited it) it is restored from its images.
Docker refuses to restore a container from the checkpoint name it was just
dumped under (moby#42900: "already exists" in containerd), so the images are
moved to a fresh name first. Those images never hold connections or locks
(Docker's dump refuses them), so no CRIU options are needed for this restore.

Ferry never starts a container fresh on its own: memory state thrown away is
worse than a container an operator has to look at. When the images cannot be
restored, the container stays stopped, the images stay on disk, and the error
says where (`StateNotRestored`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.migration import held
from agent.migration.ctrd import CtrdSweeper
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)

# Errors that mean "try the same images again", not "the images are bad"
# (a leftover blob in containerd; a restore that raced the dump's writer).
_TRANSIENT = ("already exists", "write too long")


class StateNotRestored(DockerError):
    """The checkpoint could not be restored; the container is left stopped, images kept."""


class CheckpointUnsettled(DockerError):
    """A dump of the container may still be running or writing its images."""


def restore_locally(
    adapter: DockerAdapter,
    root: DataRoot,
    container_id: str,
    checkpoint: str,
    restart_policy: dict[str, object],
    timeout: float,
    ctrd: CtrdSweeper | None = None,
) -> str:
    """Blocking. Make the container run here again from its checkpoint; returns how.

    Raises StateNotRestored when its state cannot be restored (it stays stopped).
    """
    info = adapter.inspect_container(container_id)
    state = info.get("State") or {}
    how: str
    if state.get("Paused"):
        adapter.unpause(container_id)
        shutil.rmtree(root.checkpoint_dir(container_id, checkpoint), ignore_errors=True)
        how = "resumed in place (frozen, never stopped): connections and file locks kept"
    elif state.get("Running"):
        # The freeze never completed (CRIU refused to dump): it never stopped, and
        # whatever part of a dump exists describes a past it has already left.
        how = "still running (checkpoint did not complete)"
        shutil.rmtree(root.checkpoint_dir(container_id, checkpoint), ignore_errors=True)
    else:
        src = root.checkpoint_dir(container_id, checkpoint)
        if not src.is_dir():
            raise StateNotRestored(
                "rollback",
                f"no checkpoint images at {src}; {container_id[:12]} is left stopped "
                "(start it by hand only if losing its memory state is acceptable)",
            )
        how = _restore_from(
            adapter, root, container_id, src, checkpoint, timeout, ctrd or CtrdSweeper(None)
        )
    if (restart_policy.get("Name") or "no") != "no":
        with contextlib.suppress(DockerNotFound):
            adapter.update_restart_policy(container_id, restart_policy)
    return how


def _restore_from(
    adapter: DockerAdapter,
    root: DataRoot,
    container_id: str,
    src: Path,
    checkpoint: str,
    timeout: float,
    ctrd: CtrdSweeper,
) -> str:
    last: DockerError | None = None
    for attempt in range(3):
        fresh = _fresh_name(root, container_id, checkpoint)
        dest = root.checkpoint_dir(container_id, fresh)
        os.rename(src, dest)
        try:
            with ctrd.restoring():
                adapter.start(container_id, checkpoint=fresh)
            adapter.wait_running(container_id, timeout=timeout)
        except DockerError as exc:
            last = exc
            log.error(
                "migration.rollback_restore_failed",
                container=container_id,
                attempt=attempt + 1,
                error=str(exc),
            )
            # Not `checkpoint_delete`: Docker would remove the images with the name.
            if dest.is_dir():
                src = dest  # keep every byte: the next try, or the operator, uses these
            running = (adapter.inspect_container(container_id).get("State") or {}).get("Running")
            if running:
                # Not ours (a restart policy or a person started it): never call that restored.
                raise StateNotRestored(
                    "rollback",
                    f"restore failed ({exc.message}) and the container was started without "
                    f"its state by someone else; checkpoint kept at {src}",
                ) from exc
            if not any(t in exc.message for t in _TRANSIENT):
                break
            continue
        with contextlib.suppress(DockerError):
            adapter.checkpoint_delete(container_id, fresh)
        shutil.rmtree(dest, ignore_errors=True)
        return f"restored from checkpoint {fresh}"
    assert last is not None
    raise StateNotRestored(
        "rollback",
        f"its state could not be restored ({last.message}); the container is left stopped "
        f"and its checkpoint kept at {src}",
    ) from last


def _fresh_name(root: DataRoot, container_id: str, checkpoint: str) -> str:
    base = checkpoint.split("-rb")[0]
    for n in range(1, 1000):
        name = f"{base}-rb{n}"
        if not root.checkpoint_dir(container_id, name).exists():
            return name
    raise DockerError("rollback", f"no free checkpoint name for {checkpoint}")


def _tree_fingerprint(path: Path) -> tuple[int, int, float]:
    files = size = 0
    newest = 0.0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                files += 1
                size += st.st_size
                newest = max(newest, st.st_mtime)
    return files, size, newest


def wait_checkpoint_settled(
    adapter: DockerAdapter,
    root: DataRoot,
    container_id: str,
    checkpoint: str,
    timeout: float,
    *,
    settle: float = 2.0,
    in_progress: Callable[[str], bool] = held.dump_in_progress,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> str:
    """Blocking. Wait until no dump of the container runs and its images stop changing.

    Returns "running" (the dump never completed: the container runs on) or
    "complete" (images whole, container stopped). A restarted agent must not
    restore from images dockerd is still writing (`archive/tar: write too long`).
    """
    deadline = monotonic() + timeout
    ckpt = root.checkpoint_dir(container_id, checkpoint)
    seen: tuple[int, int, float] | None = None
    quiet_since: float | None = None
    while True:
        busy = in_progress(container_id)
        running = bool((adapter.inspect_container(container_id).get("State") or {}).get("Running"))
        now = monotonic()
        if busy:
            quiet_since, seen = None, None
        else:
            fingerprint = _tree_fingerprint(ckpt) if ckpt.is_dir() else None
            if fingerprint != seen or quiet_since is None:
                seen, quiet_since = fingerprint, now
            elif now - quiet_since >= settle:
                if running:
                    return "running"
                if fingerprint is not None and (ckpt / "inventory.img").exists():
                    return "complete"
                return "complete" if fingerprint is not None else "missing"
        if now > deadline:
            raise CheckpointUnsettled(
                "reconcile",
                f"the checkpoint of {container_id[:12]} was still being written after "
                f"{timeout:.0f}s",
            )
        sleep(0.25)
