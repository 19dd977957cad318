"""Bring a frozen container back to life on the source, from its own checkpoint.

Docker refuses to restore a container from the checkpoint name it was just
dumped under (moby#42900: "already exists" in containerd), so the images are
moved to a fresh name first.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import structlog

from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)


def restore_locally(
    adapter: DockerAdapter,
    root: DataRoot,
    container_id: str,
    checkpoint: str,
    restart_policy: dict[str, object],
    timeout: float,
) -> str:
    """Blocking. Make the container run here again; returns how.

    Raises DockerError when it cannot be made to run at all.
    """
    info = adapter.inspect_container(container_id)
    state = info.get("State") or {}
    how: str
    if state.get("Running"):
        # The freeze never completed (CRIU refused to dump): it never stopped.
        how = "still running (checkpoint did not complete)"
    else:
        src = root.checkpoint_dir(container_id, checkpoint)
        if src.is_dir():
            fresh = _fresh_name(root, container_id, checkpoint)
            os.rename(src, root.checkpoint_dir(container_id, fresh))
            try:
                adapter.start(container_id, checkpoint=fresh)
                adapter.wait_running(container_id, timeout=timeout)
                how = f"restored from checkpoint {fresh}"
            except DockerError as exc:
                # Losing memory state beats leaving the service down: start it afresh.
                log.error(
                    "migration.rollback_restore_failed", container=container_id, error=str(exc)
                )
                fresh_info = adapter.inspect_container(container_id)
                if not (fresh_info.get("State") or {}).get("Running"):
                    adapter.start(container_id)
                    adapter.wait_running(container_id, timeout=timeout)
                how = f"restore from checkpoint failed ({exc.message}); started fresh"
            with contextlib.suppress(DockerError):
                adapter.checkpoint_delete(container_id, fresh)
            shutil.rmtree(root.checkpoint_dir(container_id, fresh), ignore_errors=True)
        else:
            adapter.start(container_id)
            adapter.wait_running(container_id, timeout=timeout)
            how = "no checkpoint images found; started fresh"
    if (restart_policy.get("Name") or "no") != "no":
        with contextlib.suppress(DockerNotFound):
            adapter.update_restart_policy(container_id, restart_policy)
    return how


def _fresh_name(root: DataRoot, container_id: str, checkpoint: str) -> str:
    for n in range(1, 1000):
        name = f"{checkpoint}-rb{n}"
        if not root.checkpoint_dir(container_id, name).exists():
            return name
    raise DockerError("rollback", f"no free checkpoint name for {checkpoint}")
