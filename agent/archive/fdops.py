"""File operations relative to directory fds, never following a symlink.

The unpacker walks its staging dir with O_NOFOLLOW directory fds, so an entry
can never write outside it, whatever the destination already holds.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path

from agent.archive.common import (
    ENCODING,
    ERRORS,
    MTIME_NS_KEY,
    O_DIR,
    XATTR_PREFIX,
    ArchiveError,
    UnsafeArchive,
)
from agent.archive_frames import TarSource


class Tree:
    """A destination dir reached only through O_NOFOLLOW directory fds."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, O_DIR)
        self._cached: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def dir_fd(self, parts: tuple[str, ...]) -> int:
        """fd of the directory at `parts` below the root (not to be closed by the caller)."""
        if not parts:
            return self.root_fd
        if self._cached is not None and self._cached[0] == parts:
            return self._cached[1]
        fd = self.root_fd
        try:
            for part in parts:
                try:
                    nxt = os.open(part, O_DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeArchive(
                            f"{'/'.join(parts)}: {part!r} is a symlink or not a directory"
                        ) from None
                    raise
                if fd != self.root_fd:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        self._drop_cache()
        self._cached = (parts, fd)
        return fd


def _set_xattrs(target: int | str, m: tarfile.TarInfo) -> None:
    for key, value in m.pax_headers.items():
        if key.startswith(XATTR_PREFIX):
            name = key[len(XATTR_PREFIX) :]
            try:
                os.setxattr(
                    target,
                    name,
                    value.encode(ENCODING, ERRORS),
                    follow_symlinks=isinstance(target, int),  # an fd: nothing to follow
                )
            except OSError as exc:
                raise ArchiveError(f"{m.name}: cannot set xattr {name}: {exc}") from exc


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get(MTIME_NS_KEY)
    if raw is not None and raw.isdigit():
        return int(raw)
    return int(m.mtime * 1_000_000_000)


def apply_fd_meta(fd: int, m: tarfile.TarInfo) -> None:
    # chown first: it clears set-id bits and file capabilities set before it.
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
    _set_xattrs(fd, m)
    ns = _mtime_ns(m)
    os.utime(fd, ns=(ns, ns))


def clear_slot(pfd: int, leaf: str, member_is_dir: bool) -> bool:
    """Make room for an entry; True when a directory already stands there (kept for a dir)."""
    try:
        st = os.lstat(leaf, dir_fd=pfd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if member_is_dir:
            return True
        raise ArchiveError(f"{leaf}: a directory already exists where the archive has a file")
    os.unlink(leaf, dir_fd=pfd)
    return False


def write_file(source: TarSource, m: tarfile.TarInfo, pfd: int, leaf: str) -> int:
    if source.tell() != m.offset_data:
        raise ArchiveError(f"{m.name}: its data is not where its header says")
    fd = os.open(
        leaf,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=pfd,
    )
    try:
        source.copy_to(fd, m.size)
        apply_fd_meta(fd, m)
    finally:
        os.close(fd)
    return int(m.size)


def append_file(source: TarSource, m: tarfile.TarInfo, pfd: int, leaf: str, offset: int) -> int:
    """More bytes of a file an earlier member made, which must hold exactly `offset` bytes."""
    if source.tell() != m.offset_data:
        raise ArchiveError(f"{m.name}: its data is not where its header says")
    fd = os.open(leaf, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size != offset:
            raise ArchiveError(f"{m.name}: a part at offset {offset} does not follow the file")
        os.lseek(fd, offset, os.SEEK_SET)
        source.copy_to(fd, m.size)
        apply_fd_meta(fd, m)
    finally:
        os.close(fd)
    return int(m.size)


def apply_path_meta(pfd: int, leaf: str, m: tarfile.TarInfo, *, chmod: bool) -> None:
    """Metadata for entries that cannot be opened (symlinks, whiteouts)."""
    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
    if chmod:
        os.chmod(leaf, m.mode & 0o7777, dir_fd=pfd)  # just made by mknod, not a link
    # /proc/self/fd/N/leaf reaches the entry through our verified dir fd.
    _set_xattrs(f"/proc/self/fd/{pfd}/{leaf}", m)
    ns = _mtime_ns(m)
    os.utime(leaf, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
