"""Bounded value types for config and policy models: counts, sizes, durations, paths.

A value outside its range is refused at load time with the range in the
message. Upper bounds matter as much as lower ones: a timeout of
100000000000h overflows the event loop's timer long after `check-config`
said ok, and a count of 10**400 is a typo, not a plan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AfterValidator, ByteSize, ValidatorFunctionWrapHandler, WrapValidator

from agent.durations import format_duration

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
PIB = 1024**5

HOUR = 3600.0
DAY = 86400.0

# Paths Ferry must never treat as its own state: writing a journal or staging
# archives there would clobber the system, and `/` would make every file "ours".
SYSTEM_ROOTS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/sbin",
        "/var",
        "/var/lib",
        "/var/log",
        "/var/run",
        "/var/tmp",
    }
)
# Kernel filesystems: nothing Ferry keeps can live below them.
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")
MAX_PATH_BYTES = 4095
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def _refuse_bool(value: Any) -> None:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not {str(value).lower()}")


def count_in(lo: int, hi: int) -> WrapValidator:
    """An int in [lo, hi]; booleans are refused (`true` is never meant as 1)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> int:
        _refuse_bool(value)
        number: int = handler(value)
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi} (got {_short(number)})")
        return number

    return WrapValidator(check)


def format_bytes(n: int) -> str:
    for unit, scale in (("PiB", PIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def size_in(lo: int, hi: int) -> WrapValidator:
    """A ByteSize ("512MiB", "4GiB" or bytes) in [lo, hi]."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> ByteSize:
        _refuse_bool(value)
        size: ByteSize = handler(value)
        if not lo <= int(size) <= hi:
            raise ValueError(
                f"must be between {format_bytes(lo)} and {format_bytes(hi)} "
                f"(got {format_bytes(int(size))})"
            )
        return size

    return WrapValidator(check)


def duration_in(lo: float, hi: float, *, lo_open: bool = False) -> AfterValidator:
    """For Annotated[Duration, ...]: in [lo, hi], or (lo, hi] when zero makes no sense."""

    def check(value: float) -> float:
        low_ok = value > lo if lo_open else value >= lo
        if not low_ok or value > hi:
            low = (
                f"more than {format_duration(lo)}" if lo_open else f"at least {format_duration(lo)}"
            )
            raise ValueError(
                f"must be {low} and at most {format_duration(hi)} (got {format_duration(value)})"
            )
        return value

    return AfterValidator(check)


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def check_path_text(value: Path) -> Path:
    """Refuse paths no one means: surrounding whitespace, NUL bytes, over PATH_MAX."""
    text = str(value)
    if text != text.strip():
        raise ValueError(f"path {text!r} has leading or trailing whitespace")
    if "\x00" in text:
        raise ValueError("path contains a NUL byte")
    if not text:
        raise ValueError("path is empty")
    if len(os.fsencode(text)) > MAX_PATH_BYTES:
        raise ValueError(f"path is longer than {MAX_PATH_BYTES} bytes")
    return value


def expand_user(value: Path) -> Path:
    """`~` and `~user` expanded; a ValueError (not RuntimeError) when that is impossible."""
    try:
        return value.expanduser()
    except (RuntimeError, KeyError):
        raise ValueError(
            f"cannot expand {str(value)!r}: no such user, or no home directory"
        ) from None


def refuse_system_root(value: Path) -> Path:
    """For directories Ferry writes into: never a system directory or a kernel filesystem."""
    text = os.path.normpath(str(value))
    if text in SYSTEM_ROOTS:
        raise ValueError(f"{text} is a system directory; use a directory of Ferry's own")
    for root in VIRTUAL_ROOTS:
        if text.startswith(root + "/"):
            raise ValueError(f"{text} is inside {root}, a kernel filesystem")
    return value


def check_socket_path(value: Path) -> Path:
    """A unix socket path: absolute as written, short enough to bind, not in /proc or /sys."""
    check_path_text(value)
    path = expand_user(value)
    if not path.is_absolute():
        raise ValueError(f"{str(value)!r} is relative; a socket path must be absolute")
    text = os.path.normpath(str(path))
    if text in SYSTEM_ROOTS:
        raise ValueError(f"{text} is a directory, not a socket path")
    if len(os.fsencode(text)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path is {len(os.fsencode(text))} bytes; unix sockets allow "
            f"at most {MAX_SOCKET_PATH_BYTES}"
        )
    for root in ("/proc", "/sys"):
        if text.startswith(root + "/"):
            raise ValueError(f"{text} is inside {root}, a kernel filesystem")
    return Path(text)
