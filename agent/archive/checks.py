"""The member checks: what an archive may contain, decided before anything is written.

This is the security policy of unpacking, reviewable on its own: every entry
passes `Checker` (paths, sections, kinds, sizes) and tarfile reads no
metadata header bigger than MAX_META_BYTES (`BoundedTarInfo`).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from agent.archive.common import (
    ENCODING,
    ERRORS,
    PART_OFFSET_KEY,
    ArchiveTooLarge,
    UnsafeArchive,
)
from agent.archive_frames import TarSource

# Metadata entries tarfile reads whole into memory: PAX headers and GNU long names.
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
     tarfile.GNUTYPE_LONGLINK}
)  # fmt: skip


MAX_META_BYTES = 1 << 20  # xattrs and long names of real files fit many times over


class BoundedTarInfo(tarfile.TarInfo):
    """Refuses a PAX header or GNU long name bigger than MAX_META_BYTES before tarfile
    reads it into memory (a header of gigabytes is a memory bomb, not metadata)."""

    def _proc_member(self, archive: Any) -> Any:
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise ArchiveTooLarge(
                f"entry {self.name[:80]!r}: a {self.size}-byte metadata header "
                f"(at most {MAX_META_BYTES})"
            )
        # tarfile's own dispatch (not in its type stubs), which reads the header's data.
        return tarfile.TarInfo._proc_member(self, archive)  # type: ignore[attr-defined]


def open_tar(source: TarSource) -> tarfile.TarFile:
    # "r:" (not the stream mode "r|"): tarfile then reads headers straight from
    # the source, which only moves forward, and leaves file contents to copy_to.
    fileobj: Any = source  # file-like enough for tarfile; typeshed wants a real file
    return tarfile.open(
        fileobj=fileobj, mode="r:", encoding=ENCODING, errors=ERRORS, tarinfo=BoundedTarInfo
    )


@dataclass
class Checker:
    """Validates entries in archive order; both passes use it so they agree."""

    sections: Collection[str]
    container_roots: Collection[str]
    max_raw_bytes: int | None
    seen: dict[str, str] = field(default_factory=dict)  # name -> "dir"/"file"/"other"
    sizes: dict[str, int] = field(default_factory=dict)  # regular file -> bytes so far
    raw: int = 0

    def check(self, m: tarfile.TarInfo) -> tuple[str, tuple[str, ...]]:
        name = m.name
        parts = tuple(name.split("/"))
        where = f"entry {name!r}"
        if name.startswith("/"):
            raise UnsafeArchive(f"{where}: absolute path")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeArchive(f"{where}: empty, '.' or '..' path component")
        section = parts[0]
        if section not in self.sections:
            raise UnsafeArchive(f"{where}: unknown section {section!r}")
        if PART_OFFSET_KEY in m.pax_headers:
            self._check_part(m, where)
            return section, parts
        if name in self.seen:
            raise UnsafeArchive(f"{where}: appears twice")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if self.seen.get(prefix, "dir") != "dir":
                raise UnsafeArchive(f"{where}: goes through {prefix!r}, which is not a directory")
            if prefix not in self.seen:
                raise UnsafeArchive(f"{where}: its directory {prefix!r} comes later or never")
        if len(parts) == 1 and not m.isdir():
            raise UnsafeArchive(f"{where}: a section root must be a directory")

        if m.isreg() and not m.issparse():
            kind = "file"
            self.sizes[name] = m.size
            self.raw += m.size
            if self.max_raw_bytes is not None and self.raw > self.max_raw_bytes:
                raise ArchiveTooLarge(f"archive unpacks to more than {self.max_raw_bytes} bytes")
        elif m.isdir():
            kind = "dir"
        elif m.issym():
            kind = "other"
            self._check_symlink(where, section, parts, m.linkname)
        elif m.islnk():
            kind = "other"
            target = m.linkname
            if self.seen.get(target) != "file" or target.split("/")[0] != section:
                raise UnsafeArchive(
                    f"{where}: hardlink to {target!r}, which is not an earlier file of this section"
                )
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            kind = "other"  # overlay whiteout
        else:
            raise UnsafeArchive(f"{where}: {_member_kind(m)} is not allowed")
        self.seen[name] = kind
        return section, parts

    def _check_part(self, m: tarfile.TarInfo, where: str) -> None:
        """A continuation: more bytes of a regular file this archive made, exactly at its end."""
        raw_offset = m.pax_headers[PART_OFFSET_KEY]
        if not raw_offset.isdigit():
            raise UnsafeArchive(f"{where}: part offset {raw_offset[:20]!r} is not a number")
        if not m.isreg() or m.issparse() or self.seen.get(m.name) != "file":
            raise UnsafeArchive(f"{where}: a part of something that is not an earlier file")
        if int(raw_offset) != self.sizes.get(m.name):
            raise UnsafeArchive(
                f"{where}: part at offset {raw_offset}, but the file has "
                f"{self.sizes.get(m.name)} bytes"
            )
        self.sizes[m.name] += m.size
        self.raw += m.size
        if self.max_raw_bytes is not None and self.raw > self.max_raw_bytes:
            raise ArchiveTooLarge(f"archive unpacks to more than {self.max_raw_bytes} bytes")

    def _check_symlink(self, where: str, section: str, parts: tuple[str, ...], target: str) -> None:
        if not target or "\0" in target:
            raise UnsafeArchive(f"{where}: empty symlink target")
        if section in self.container_roots:
            return  # resolved inside the container's root; unpacking never follows links
        if target.startswith("/"):
            raise UnsafeArchive(f"{where}: symlink to absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join("/".join(parts[1:-1]), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchive(f"{where}: symlink {target!r} points outside its section")


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.isblk():
        return f"block device {m.devmajor}:{m.devminor}"
    if m.ischr():
        return f"character device {m.devmajor}:{m.devminor}"
    if m.isfifo():
        return "fifo"
    if m.issparse():
        return "sparse file"
    return f"entry of type {m.type!r}"
