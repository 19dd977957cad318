"""The per-container CRIU config file that Ferry hands to restores it performs.

Docker's checkpoint API takes no CRIU options, but runc reads the file named by
a container's `org.criu.config` annotation on every checkpoint and restore of
that container (runc >= 1.1; without one, /etc/criu/runc.conf). Ferry creates
the target container, so it sets the annotation there and controls the restore:

- `leave-stopped`: the restored copy must not run application code before the
  source commits (docs/commit-protocol.md);
- `log-file`: Docker deletes its own restore.log when a restore fails; ours
  stays where the agent can quote CRIU's error.

The file lives under `<data root>/ferry/criu/`, a path both dockerd (which
hands it to runc) and the agent can reach through the data root.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.migration.paths import DataRoot

ANNOTATION = "org.criu.config"
CRIU_DIR = ("ferry", "criu")


@dataclass(frozen=True)
class CriuConfigFile:
    """One migration's config and restore log, as the daemon and as the agent see them."""

    daemon_path: str
    local_path: Path
    daemon_log: str
    local_log: Path

    def write(self, options: Sequence[str]) -> None:
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.local_path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in options))
        os.replace(tmp, self.local_path)

    def remove(self) -> None:
        for path in (self.local_path, self.local_log, self.local_path.with_suffix(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def for_migration(root: DataRoot, migration_id: str) -> CriuConfigFile:
    rel = (*CRIU_DIR, f"{migration_id}.conf")
    log_rel = (*CRIU_DIR, f"{migration_id}.restore.log")
    return CriuConfigFile(
        daemon_path=root.daemon_path(*rel),
        local_path=root.local_root.joinpath(*rel),
        daemon_log=root.daemon_path(*log_rel),
        local_log=root.local_root.joinpath(*log_rel),
    )


def restore_options(
    log_file: str, *, leave_stopped: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    """CRIU config lines (long option names without dashes, as runc's config file wants)."""
    options = [f"log-file {log_file}"]
    if leave_stopped:
        options.append("leave-stopped")
    options.extend(extra)
    return options
