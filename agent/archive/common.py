"""What the rest of the package shares: limits, errors, stats."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.archive_frames import WireDigest

ProgressFn = Callable[[int, int], None]
"""Called with (uncompressed bytes, compressed bytes) so far."""


XATTR_PREFIX = "SCHILY.xattr."

MTIME_NS_KEY = "FERRY.mtime_ns"
# A member carrying this PAX record continues the file of the same name from this
# byte offset (packed while a dump was still writing it; see packing.GrowingFiles).
PART_OFFSET_KEY = "FERRY.part_offset"

DEFAULT_CHUNK = 1 << 20

# zstd level 1: on CRIU pages it compresses about as well as 3 (random pages do
# not compress, zero pages compress at any level) at twice the speed.
DEFAULT_LEVEL = 1


ENCODING = "utf-8"

ERRORS = "surrogateescape"  # file names and xattr values are bytes; keep them exact

SECTION_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Sections whose symlinks are read inside a container's root, where an absolute
# target (or a relative one climbing past "/") still stays in that root.
CONTAINER_ROOT_SECTIONS = frozenset({"upper"})


class ArchiveError(Exception):
    """The archive cannot be packed or unpacked; the message says why."""


class DigestMismatch(ArchiveError):
    pass


class UnsafeArchive(ArchiveError):
    """An entry would write outside its destination or is a forbidden kind of file."""


class ArchiveTooLarge(UnsafeArchive):
    """The archive unpacks to more than it may (a compression bomb, or more than declared)."""


@dataclass
class ArchiveStats:
    raw_bytes: int = 0
    compressed_bytes: int = 0
    entries: int = 0
    stored_bytes: int = 0  # tar stream bytes sent as they are: compressing them saved nothing
    digest: str = ""
    skipped: list[str] = field(default_factory=list)


def digest_text(h: WireDigest) -> str:
    return h.digest()


def kind_of_mode(mode: int, rdev: int = 0) -> str:
    if stat.S_ISBLK(mode):
        return f"block device {os.major(rdev)}:{os.minor(rdev)}"
    if stat.S_ISCHR(mode):
        return f"character device {os.major(rdev)}:{os.minor(rdev)}"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return f"file of mode {mode:o}"


@dataclass
class SpoolResult:
    digest: str
    size: int
