"""Migration state as one compressed, digested stream.

Layout: a PAX tar stream whose top-level directories are named sections
(e.g. ``checkpoint/...`` for CRIU images, ``upper/...`` for the container's
overlay2 upper dir), compressed with zstd, with a sha256 over the compressed
bytes ("sha256:<hex>"). It carries what an overlay upper dir needs: regular
files, dirs, symlinks, hardlinks, numeric owners, modes, nanosecond mtimes,
xattrs (``SCHILY.xattr.*`` PAX records, e.g. ``trusted.overlay.opaque``) and
whiteouts (0:0 character devices, the only device nodes allowed).

Packing yields chunks as it goes so they can feed an HTTP upload directly.
Unpacking is done from a spooled file and in two passes: the first verifies
the digest and validates every entry, the second writes. A bad or hostile
archive therefore writes nothing at all, and the writing pass walks the
destination with O_NOFOLLOW directory fds so it can never leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Generator,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
import zstandard

log = structlog.get_logger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called with (uncompressed bytes, compressed bytes) so far."""

XATTR_PREFIX = "SCHILY.xattr."
MTIME_NS_KEY = "FERRY.mtime_ns"
DEFAULT_CHUNK = 1 << 20
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # file names and xattr values are bytes; keep them exact
_SECTION_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Sections whose symlinks are read inside a container's root, where an absolute
# target (or a relative one climbing past "/") still stays in that root.
CONTAINER_ROOT_SECTIONS = frozenset({"upper"})


class ArchiveError(Exception):
    """The archive cannot be packed or unpacked; the message says why."""


class DigestMismatch(ArchiveError):
    pass


class UnsafeArchive(ArchiveError):
    """An entry would write outside its destination or is a forbidden kind of file."""


@dataclass
class ArchiveStats:
    raw_bytes: int = 0
    compressed_bytes: int = 0
    entries: int = 0
    digest: str = ""
    skipped: list[str] = field(default_factory=list)


def _digest(h: Any) -> str:
    return f"sha256:{h.hexdigest()}"


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


class Packer:
    """Packs directories as named sections into a zstd tar stream.

    Iterate it (or `aiter()` from asyncio) for compressed chunks; once
    exhausted, `stats.digest` holds the sha256 of everything yielded.
    """

    def __init__(
        self,
        sections: Mapping[str, Path],
        *,
        level: int = 3,
        chunk_size: int = DEFAULT_CHUNK,
        progress: ProgressFn | None = None,
    ) -> None:
        for name, root in sections.items():
            if not _SECTION_RE.match(name):
                raise ArchiveError(f"invalid section name {name!r}")
            if not Path(root).is_dir():
                raise ArchiveError(f"section {name}: {root} is not a directory")
        self.sections = dict(sections)
        self.level = level
        self.chunk_size = chunk_size
        self.progress = progress
        self.stats = ArchiveStats()
        self._done = False

    @property
    def digest(self) -> str:
        if not self._done:
            raise ArchiveError("digest is known only after the whole archive was produced")
        return self.stats.digest

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _chunks(self) -> Generator[bytes, None, None]:
        h = hashlib.sha256()
        chunker = zstandard.ZstdCompressor(level=self.level, write_checksum=True).chunker(
            chunk_size=self.chunk_size
        )
        for raw in self._tar_stream():
            self.stats.raw_bytes += len(raw)
            for out in chunker.compress(raw):
                yield self._emit(h, out)
        for out in chunker.finish():
            yield self._emit(h, out)
        self.stats.digest = _digest(h)
        self._done = True

    def _emit(self, h: Any, out: bytes) -> bytes:
        h.update(out)
        self.stats.compressed_bytes += len(out)
        if self.progress:
            self.progress(self.stats.raw_bytes, self.stats.compressed_bytes)
        return out

    async def aiter(self) -> AsyncIterator[bytes]:
        """The same chunks, produced in a worker thread so the event loop keeps running."""
        it = self._chunks()
        try:
            while True:
                chunk = await asyncio.to_thread(next, it, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            # ValueError: still running in a worker after a cancel; it ends with that thread.
            with contextlib.suppress(ValueError):
                it.close()

    def _tar_stream(self) -> Iterator[bytes]:
        written = 0
        for section, root in self.sections.items():
            for chunk in self._pack_section(section, Path(root)):
                written += len(chunk)
                yield chunk
        # End-of-archive: two zero blocks, padded to a full record like tarfile does.
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        written += len(end)
        pad = -written % tarfile.RECORDSIZE
        yield end + tarfile.NUL * pad

    def _pack_section(self, section: str, root: Path) -> Iterator[bytes]:
        inodes: dict[tuple[int, int], str] = {}

        def walk(path: str, arcname: str) -> Iterator[bytes]:
            st = os.lstat(path)
            info = self._tarinfo(path, arcname, st, inodes)
            if info is None:
                return
            self.stats.entries += 1
            yield info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)
            if info.type == tarfile.REGTYPE and info.size:
                yield from self._file_data(path, info.size)
            if info.type == tarfile.DIRTYPE:
                with os.scandir(path) as it:
                    names = sorted(e.name for e in it)
                for name in names:
                    yield from walk(os.path.join(path, name), f"{arcname}/{name}")

        yield from walk(str(root), section)

    def _tarinfo(
        self, path: str, arcname: str, st: os.stat_result, inodes: dict[tuple[int, int], str]
    ) -> tarfile.TarInfo | None:
        info = tarfile.TarInfo(arcname)
        mode = st.st_mode
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""  # numeric owners only: names differ between hosts
        info.mtime = int(st.st_mtime)
        pax = {MTIME_NS_KEY: str(st.st_mtime_ns)}
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in inodes:
                info.type = tarfile.LNKTYPE
                info.linkname = inodes[key]
            else:
                if st.st_nlink > 1:
                    inodes[key] = arcname
                info.type = tarfile.REGTYPE
                info.size = st.st_size
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) and st.st_rdev == 0:
            info.type = tarfile.CHRTYPE  # overlay whiteout
            info.devmajor = info.devminor = 0
        elif stat.S_ISSOCK(mode):
            # A socket inode holds no data and cannot live in a tar; the
            # process that owns it re-creates or re-binds it on restore.
            log.info("archive.skip_socket", path=path)
            self.stats.skipped.append(arcname)
            return None
        else:
            raise ArchiveError(f"{path}: {_kind(mode, st.st_rdev)} cannot be migrated")
        for name, value in _xattrs(path).items():
            pax[XATTR_PREFIX + name] = value.decode(_ENCODING, _ERRORS)
        info.pax_headers = pax
        return info

    def _file_data(self, path: str, size: int) -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = size
            while left:
                data = os.read(fd, min(self.chunk_size, left))
                if not data:
                    raise ArchiveError(f"{path} shrank while being packed")
                left -= len(data)
                yield data
        finally:
            os.close(fd)
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            yield tarfile.NUL * pad


def _kind(mode: int, rdev: int = 0) -> str:
    if stat.S_ISBLK(mode):
        return f"block device {os.major(rdev)}:{os.minor(rdev)}"
    if stat.S_ISCHR(mode):
        return f"character device {os.major(rdev)}:{os.minor(rdev)}"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return f"file of mode {mode:o}"


def pack_to_file(sections: Mapping[str, Path], dest: Path, **kwargs: Any) -> ArchiveStats:
    """Pack into a file (for spooling or tests); returns the stats with the digest."""
    packer = Packer(sections, **kwargs)
    with open(dest, "wb") as f:
        for chunk in packer:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return packer.stats


@dataclass
class SpoolResult:
    digest: str
    size: int


async def spool(
    stream: AsyncIterable[bytes],
    dest: Path,
    *,
    expected_digest: str | None = None,
    max_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> SpoolResult:
    """Write an incoming archive to `dest`, hashing as it arrives.

    With `expected_digest`, a mismatch removes the file and raises DigestMismatch.
    """
    h = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as f:
            async for chunk in stream:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ArchiveError(f"archive exceeds {max_bytes} bytes")
                h.update(chunk)
                f.write(chunk)
                if progress:
                    progress(0, size)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        digest = _digest(h)
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(f"archive digest is {digest}, expected {expected_digest}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return SpoolResult(digest, size)


class _HashingReader:
    """File reader that hashes everything read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data


def _open_tar(fileobj: Any) -> tarfile.TarFile:
    reader = zstandard.ZstdDecompressor().stream_reader(fileobj, read_size=DEFAULT_CHUNK)
    return tarfile.open(fileobj=reader, mode="r|", encoding=_ENCODING, errors=_ERRORS)


@dataclass
class _Checker:
    """Validates entries in archive order; both passes use it so they agree."""

    sections: Collection[str]
    container_roots: Collection[str]
    max_raw_bytes: int | None
    seen: dict[str, str] = field(default_factory=dict)  # name -> "dir"/"file"/"other"
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
            self.raw += m.size
            if self.max_raw_bytes is not None and self.raw > self.max_raw_bytes:
                raise UnsafeArchive(f"archive unpacks to more than {self.max_raw_bytes} bytes")
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


def unpack_file(
    archive: Path,
    sections: Mapping[str, Path],
    *,
    expected_digest: str | None,
    container_roots: Collection[str] = CONTAINER_ROOT_SECTIONS,
    max_raw_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> ArchiveStats:
    """Verify, validate, then unpack `archive` into the destination dir of each section.

    Blocking; run it with asyncio.to_thread. Destinations are created if missing.
    Raises DigestMismatch / UnsafeArchive / ArchiveError without writing anything
    when the archive is bad.
    """
    try:
        stats = _validate(archive, sections, expected_digest, container_roots, max_raw_bytes)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise ArchiveError(f"archive {archive} is corrupt: {exc}") from exc
    for root in sections.values():
        root.mkdir(parents=True, exist_ok=True)
    try:
        return _extract(archive, sections, container_roots, max_raw_bytes, stats, progress)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise ArchiveError(f"archive {archive} is corrupt: {exc}") from exc


def _validate(
    archive: Path,
    sections: Mapping[str, Path],
    expected_digest: str | None,
    container_roots: Collection[str],
    max_raw_bytes: int | None,
) -> ArchiveStats:
    checker = _Checker(set(sections), set(container_roots), max_raw_bytes)
    stats = ArchiveStats()
    with open(archive, "rb") as f:
        reader = _HashingReader(f)
        problem: BaseException | None = None
        try:
            with _open_tar(reader) as tar:
                for member in tar:
                    checker.check(member)
                    stats.entries += 1
        except (ArchiveError, tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            problem = exc
        while reader.read(DEFAULT_CHUNK):
            pass  # the digest covers every byte, including what the tar reader left
        stats.digest = _digest(reader.hash)
        stats.compressed_bytes = reader.count
    # A corrupted transfer is reported as such, not as whatever garbage it decodes to.
    if expected_digest is not None and stats.digest != expected_digest:
        raise DigestMismatch(f"archive digest is {stats.digest}, expected {expected_digest}")
    if problem is not None:
        raise problem
    stats.raw_bytes = checker.raw
    return stats


class _Tree:
    """A destination dir reached only through O_NOFOLLOW directory fds."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _O_DIR)
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
                    nxt = os.open(part, _O_DIR, dir_fd=fd)
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
                    value.encode(_ENCODING, _ERRORS),
                    follow_symlinks=isinstance(target, int),  # an fd: nothing to follow
                )
            except OSError as exc:
                raise ArchiveError(f"{m.name}: cannot set xattr {name}: {exc}") from exc


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get(MTIME_NS_KEY)
    if raw is not None and raw.isdigit():
        return int(raw)
    return int(m.mtime * 1_000_000_000)


def _apply_fd_meta(fd: int, m: tarfile.TarInfo) -> None:
    # chown first: it clears set-id bits and file capabilities set before it.
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
    _set_xattrs(fd, m)
    ns = _mtime_ns(m)
    os.utime(fd, ns=(ns, ns))


def _clear_slot(pfd: int, leaf: str, member_is_dir: bool) -> bool:
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


def _extract(
    archive: Path,
    sections: Mapping[str, Path],
    container_roots: Collection[str],
    max_raw_bytes: int | None,
    stats: ArchiveStats,
    progress: ProgressFn | None,
) -> ArchiveStats:
    checker = _Checker(set(sections), set(container_roots), max_raw_bytes)
    trees = {name: _Tree(Path(root)) for name, root in sections.items()}
    dirs: list[tuple[str, tuple[str, ...], tarfile.TarInfo]] = []
    written = 0
    try:
        with open(archive, "rb") as f, _open_tar(f) as tar:
            for m in tar:
                section, parts = checker.check(m)
                rel = parts[1:]
                tree = trees[section]
                if not rel:
                    dirs.append((section, rel, m))
                    continue
                pfd = tree.dir_fd(rel[:-1])
                leaf = rel[-1]
                exists = _clear_slot(pfd, leaf, m.isdir())
                if m.isdir():
                    if not exists:
                        os.mkdir(leaf, 0o700, dir_fd=pfd)
                    dirs.append((section, rel, m))
                elif m.isreg():
                    written += _write_file(tar, m, pfd, leaf)
                elif m.issym():
                    os.symlink(m.linkname, leaf, dir_fd=pfd)
                    _apply_path_meta(pfd, leaf, m, chmod=False)
                elif m.islnk():
                    src = tuple(m.linkname.split("/"))[1:]
                    spfd = os.open(".", _O_DIR, dir_fd=tree.dir_fd(src[:-1]))
                    try:
                        os.link(
                            src[-1],
                            leaf,
                            src_dir_fd=spfd,
                            dst_dir_fd=tree.dir_fd(rel[:-1]),
                            follow_symlinks=False,
                        )
                    finally:
                        os.close(spfd)
                else:  # whiteout, the only device the checker lets through
                    os.mknod(leaf, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
                    _apply_path_meta(pfd, leaf, m, chmod=True)
                if progress:
                    progress(written, stats.compressed_bytes)
            # Directory metadata last: adding entries changes a dir's mtime, and a
            # read-only mode would be in the way. Deepest first.
            for section, rel, m in sorted(dirs, key=lambda d: len(d[1]), reverse=True):
                tree = trees[section]
                fd = os.open(".", _O_DIR, dir_fd=tree.dir_fd(rel))
                try:
                    _apply_fd_meta(fd, m)
                finally:
                    os.close(fd)
    finally:
        for tree in trees.values():
            tree.close()
    stats.raw_bytes = written
    return stats


def _write_file(tar: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, leaf: str) -> int:
    src = tar.extractfile(m)
    if src is None:
        raise ArchiveError(f"{m.name}: no data")
    fd = os.open(
        leaf,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=pfd,
    )
    written = 0
    try:
        while True:
            data = src.read(DEFAULT_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            written += len(data)
        _apply_fd_meta(fd, m)
    finally:
        os.close(fd)
    return written


def _apply_path_meta(pfd: int, leaf: str, m: tarfile.TarInfo, *, chmod: bool) -> None:
    """Metadata for entries that cannot be opened (symlinks, whiteouts)."""
    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
    if chmod:
        os.chmod(leaf, m.mode & 0o7777, dir_fd=pfd)  # just made by mknod, not a link
    # /proc/self/fd/N/leaf reaches the entry through our verified dir fd.
    _set_xattrs(f"/proc/self/fd/{pfd}/{leaf}", m)
    ns = _mtime_ns(m)
    os.utime(leaf, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
