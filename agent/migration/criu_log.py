"""CRIU's own words: the error line that says why a dump or restore failed, and where its log is.

CRIU writes ``(secs) Error (file:line): what`` lines; the first one is usually
the cause and the rest its consequences ("Dump files ... failed", "Dumping
FAILED"). Where dockerd or runc put the log is a path in dockerd's mount
namespace, which is not necessarily this agent's, and Docker and containerd
delete those files soon after. So the agent copies the log into its own state
dir and quotes the copy's path.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from pathlib import Path

ERROR_RE = re.compile(r"\bError \([^)]*\):\s*(.*)$")
# Logged when root lacks CAP_SYS_RESOURCE (the testbed's VM); CRIU carries on
# without it, so it is never the reason a dump or restore failed.
BENIGN = ("Can't setup RLIMIT_NOFILE for self",)
# "criu failed: ... path= /x/criu-dump.log: unknown" (Docker via containerd),
# "log file: /x/restore.log" (runc's own wording).
LOG_PATH_RE = re.compile(r"(?:path=\s*|log file:\s*)(/\S+?\.log)\b")
LOGS_DIR = "criu-logs"


def first_error(text: str) -> str | None:
    """The first CRIU error line that is not known to be harmless, without its timestamp."""
    fallback: str | None = None
    for line in text.splitlines():
        m = ERROR_RE.search(line)
        if not m:
            continue
        said = line[line.index("Error (") :].strip()
        if any(b in m.group(1) for b in BENIGN):
            fallback = fallback or said
            continue
        return said
    return fallback


def log_path_in(message: str) -> str | None:
    """The CRIU log path an error message from Docker or runc names, if any."""
    m = LOG_PATH_RE.search(message)
    return m.group(1) if m else None


def in_daemon_root(daemon_pid: int, path: str, proc: Path = Path("/proc")) -> Path:
    """`path` as dockerd (process `daemon_pid`) sees it, reachable from this mount namespace.

    Follows symlinks inside dockerd's root (``/var/run -> /run`` would otherwise
    lead back into ours).
    """
    root = proc / str(daemon_pid) / "root"
    parts = [p for p in posixpath.normpath(path).split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and hops < 40:
            hops += 1
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def keep(log: Path, logs_dir: Path, name: str) -> Path | None:
    """Copy a CRIU log to `logs_dir/name` (`<state_dir>/criu-logs`); the copy, or None."""
    dest = logs_dir / name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
    except OSError:
        return None
    return dest


def describe(log: Path | None) -> str | None:
    """``CRIU: <first error> (log <path>)`` for a log this agent can read, else None."""
    if log is None:
        return None
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    said = first_error(text)
    if said is None:
        return f"CRIU logged no error line (log {log})"
    return f"CRIU: {said} (log {log})"
