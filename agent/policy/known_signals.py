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


# What a signal's values can be, first match wins: a threshold outside the range is a
# condition that is always or never true (`mem.available_ratio < 5` is a percentage
# written where a ratio belongs). Third-party signals have no entry and are not checked.
SIGNAL_RANGES: tuple[tuple[str, float, float, str], ...] = (
    ("psi.available", 0.0, 1.0, "1 or 0"),
    ("docker.connected", 0.0, 1.0, "1 or 0"),
    ("marker.*", 0.0, 1.0, "1 (present) or 0 (absent)"),
    ("command.*", 0.0, 2.0, "0 (ok), 1 (problem) or 2 (unknown)"),
    ("*_ratio", 0.0, 1.0, "a ratio between 0 and 1"),
    ("psi.*", 0.0, 100.0, "a percentage between 0 and 100"),
    ("*_bytes", 0.0, float("inf"), "a number of bytes, never negative"),
    ("load.*", 0.0, float("inf"), "a load average, never negative"),
    ("containers.running", 0.0, float("inf"), "a count, never negative"),
)


def signal_range(name: str) -> tuple[float, float, str] | None:
    """(lowest, highest, what it is) for a built-in signal; None when unknown."""
    for pattern, lo, hi, what in SIGNAL_RANGES:
        if fnmatch.fnmatchcase(name, pattern):
            return lo, hi, what
    return None


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
