"""Names a policy may test, as glob patterns.

Signal sources live in `agent.signals`; this list is the contract between
them and policy files, so a typo (``psi.cpu.some.avg01``) is an error at load
time instead of a condition that is silently never true. Callers may pass a
longer list (e.g. with third-party sources' names) to the loader.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable

_PSI = [
    f"psi.{res}.{kind}.{window}"
    for res, kind, window in itertools.product(
        ("cpu", "memory", "io"), ("some", "full"), ("avg10", "avg60", "avg300")
    )
]

BUILTIN_SIGNAL_PATTERNS: tuple[str, ...] = (
    "load.1",
    "load.5",
    "load.15",
    "load.per_core.*",
    *_PSI,
    "psi.available",  # 1.0 when the kernel exposes PSI; lets a policy fall back to load.*
    "mem.available_bytes",
    "mem.available_ratio",
    "mem.total_bytes",
    "disk.docker.free_bytes",
    "disk.docker.free_ratio",
    "disk.docker.total_bytes",
    "marker.*",
    "command.*",
    "containers.running",
    "docker.connected",  # 1.0 while the Docker event stream is connected
)


def known_signal_patterns() -> list[str]:
    """The registry of signal names a policy may use (glob patterns)."""
    return list(BUILTIN_SIGNAL_PATTERNS)


def is_known_signal(name: str, patterns: Iterable[str] | None = None) -> bool:
    pats = known_signal_patterns() if patterns is None else patterns
    return any(fnmatch.fnmatchcase(name, p) for p in pats)


def suggest(name: str, patterns: Iterable[str] | None = None) -> str | None:
    """The closest known pattern, for "did you mean" hints."""
    import difflib

    pats = list(known_signal_patterns() if patterns is None else patterns)
    close = difflib.get_close_matches(name, pats, n=1, cutoff=0.6)
    return close[0] if close else None
