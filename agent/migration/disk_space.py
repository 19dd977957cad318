"""How much disk a migration needs on each side, checked before anything is frozen.

Measured on the testbed (a 64 MiB memhog, engine checkpoints): a source with
100 MiB free failed *during* the dump (`pages-1.img: no space left on
device`), leaving the container stopped with no images to restore; a target
with 100 MiB free accepted (the old estimate was memory + writable layer, 71
MiB) and then failed the restore: `docker start --checkpoint` uploads the
images into containerd's content store under the data root, a second copy.
Both sides therefore count that second copy:

- source: the images, and containerd's copy of them (an engine checkpoint
  passes them through the content store; a rollback restore from runc's
  images uploads them there too);
- target: images + writable layer + the image if shipped, and containerd's
  copy of the images at restore. The lazy restore (migration.restore_via:
  lazy) hands Docker only the small images, but falls back to the plain
  restore when the lazy path is unavailable, so the target reserves for that.

Plus headroom for what the estimate misses (CRIU's own files, logs, the
container's metadata).
"""

from __future__ import annotations

from pathlib import Path

from agent.migration.resources import amount, disk_free

HEADROOM = 0.1
MARGIN = 16 * 1024 * 1024


def with_headroom(n: int) -> int:
    return int(n * (1 + HEADROOM)) + MARGIN


def source_need(memory: int) -> int:
    """Bytes the source's data root needs to checkpoint, and to restore if it rolls back."""
    return with_headroom(2 * memory)


def target_need(state_estimate: int, memory: int, image: int) -> int:
    """Bytes the target's data root needs: state + image as sent, containerd's copy at restore.

    Without headroom: the target's reservations add theirs.
    """
    return state_estimate + memory + image + MARGIN


def shortfall(host: str, path: Path, need: int, what: str, free: int | None = None) -> str | None:
    """One line when `path`'s filesystem has less than `need` free: host, path, need, free."""
    free = disk_free(path) if free is None else free
    if need <= free:
        return None
    return (
        f"{host}: not enough free disk under {path} for {what}: needs {amount(need)}, "
        f"{amount(max(free, 0))} free"
    )
