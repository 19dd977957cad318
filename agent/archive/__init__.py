"""Migration state as one digested stream.

Layout: a PAX tar stream whose top-level directories are named sections
(e.g. ``checkpoint/...`` for CRIU images, ``upper/...`` for the container's
overlay2 upper dir), framed for the wire by agent.archive_frames (zstd where it
pays, stored where it saves nothing, as for pages of random memory), with a
BLAKE3 digest over the wire bytes ("blake3:<hex>"). It carries what an overlay
upper dir needs: regular files, dirs, symlinks, hardlinks, numeric owners, modes, nanosecond mtimes,
xattrs (``SCHILY.xattr.*`` PAX records, e.g. ``trusted.overlay.opaque``) and
whiteouts (0:0 character devices, the only device nodes allowed).

Packing yields chunks as it goes (packed ahead in a thread) so they can feed an
HTTP upload directly. Unpacking (StagedUnpack) happens in one pass while the
bytes arrive: every byte is hashed, every entry
validated before it is written, and written into a private staging dir in the
destination's parent, walked with O_NOFOLLOW directory fds so it can never
leave it. Only `commit`, after the digest matched, renames the staged trees
into place; a bad or hostile archive, or a digest mismatch, leaves nothing in
the destinations and removes the staging dirs.

The package, one concern a module:
  common    errors, limits, stats, what the others share
  packing   Packer: directories into one framed, digested stream
  checks    the member checks: what an archive may contain (the security policy)
  staged    StagedUnpack: unpack while receiving, publish on a matching digest
  fdops     file operations relative to O_NOFOLLOW directory fds
"""

from __future__ import annotations

from agent.archive.checks import MAX_META_BYTES, BoundedTarInfo
from agent.archive.common import (
    CONTAINER_ROOT_SECTIONS,
    DEFAULT_CHUNK,
    DEFAULT_LEVEL,
    MTIME_NS_KEY,
    XATTR_PREFIX,
    ArchiveError,
    ArchiveStats,
    ArchiveTooLarge,
    DigestMismatch,
    ProgressFn,
    SpoolResult,
    UnsafeArchive,
)
from agent.archive.packing import GrowingFiles, Packer
from agent.archive.staged import StagedUnpack

__all__ = [
    "CONTAINER_ROOT_SECTIONS",
    "DEFAULT_CHUNK",
    "DEFAULT_LEVEL",
    "MAX_META_BYTES",
    "MTIME_NS_KEY",
    "XATTR_PREFIX",
    "ArchiveError",
    "ArchiveStats",
    "ArchiveTooLarge",
    "BoundedTarInfo",
    "DigestMismatch",
    "GrowingFiles",
    "Packer",
    "ProgressFn",
    "SpoolResult",
    "StagedUnpack",
    "UnsafeArchive",
]
