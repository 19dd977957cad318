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
HTTP upload directly. Unpacking (StagedUnpack)
happens in one pass while the bytes arrive: every byte is hashed, every entry
validated before it is written, and written into a private staging dir in the
destination's parent, walked with O_NOFOLLOW directory fds so it can never
leave it. Only `commit`, after the digest matched, renames the staged trees
into place; a bad or hostile archive, or a digest mismatch, leaves nothing in
the destinations and removes the staging dirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import (
    AsyncGenerator,
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
from typing import Any

import structlog
import zstandard

from agent.archive_frames import FrameError, Framer, TarSource, WireDigest
from agent.bridges import aiter_thread, feed_blocking_consumer

log = structlog.get_logger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called with (uncompressed bytes, compressed bytes) so far."""

XATTR_PREFIX = "SCHILY.xattr."
MTIME_NS_KEY = "FERRY.mtime_ns"
DEFAULT_CHUNK = 1 << 20
# zstd level 1: on CRIU pages it compresses about as well as 3 (random pages do
# not compress, zero pages compress at any level) at twice the speed.
DEFAULT_LEVEL = 1
_END = object()
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


def _digest(h: WireDigest) -> str:
    return h.digest()


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
    exhausted, `stats.digest` holds the digest of everything yielded.
    """

    def __init__(
        self,
        sections: Mapping[str, Path],
        *,
        level: int = DEFAULT_LEVEL,
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
        h = WireDigest()
        framer = Framer(self.level, self.chunk_size)
        for raw, bulk in self._tar_stream():
            self.stats.raw_bytes += len(raw)
            out = framer.add(raw, bulk)
            if out is not None:
                yield self._emit(h, out)
        out = framer.finish()
        if out is not None:
            yield self._emit(h, out)
        self.stats.stored_bytes = framer.stored_bytes
        self.stats.digest = _digest(h)
        self._done = True

    def _emit(self, h: Any, out: bytes) -> bytes:
        h.update(out)
        self.stats.compressed_bytes += len(out)
        if self.progress:
            self.progress(self.stats.raw_bytes, self.stats.compressed_bytes)
        return out

    def aiter(self, prefetch: int = 4) -> AsyncGenerator[bytes, None]:
        """The same chunks, packed ahead in a thread so packing overlaps with sending.

        Up to `prefetch` chunks wait for the consumer; the event loop keeps running.
        Closing or cancelling the iterator stops the packing thread and waits for it.
        """
        # Returned, not wrapped: closing it must reach the thread's own generator at once.
        return aiter_thread(self._chunks, prefetch, name="ferry-pack")

    def _tar_stream(self) -> Iterator[tuple[bytes, bool]]:
        """The tar stream in pieces, each flagged True when it is file contents."""
        written = 0
        for section, root in self.sections.items():
            for chunk, bulk in self._pack_section(section, Path(root)):
                written += len(chunk)
                yield chunk, bulk
        # End-of-archive: two zero blocks, padded to a full record like tarfile does.
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        written += len(end)
        pad = -written % tarfile.RECORDSIZE
        yield end + tarfile.NUL * pad, False

    def _pack_section(self, section: str, root: Path) -> Iterator[tuple[bytes, bool]]:
        inodes: dict[tuple[int, int], str] = {}

        def walk(path: str, arcname: str) -> Iterator[tuple[bytes, bool]]:
            st = os.lstat(path)
            info = self._tarinfo(path, arcname, st, inodes)
            if info is None:
                return
            self.stats.entries += 1
            yield info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS), False
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

    def _file_data(self, path: str, size: int) -> Iterator[tuple[bytes, bool]]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = size
            while left:
                data = os.read(fd, min(self.chunk_size, left))
                if not data:
                    raise ArchiveError(f"{path} shrank while being packed")
                left -= len(data)
                yield data, True
        finally:
            os.close(fd)
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            yield tarfile.NUL * pad, False


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


@dataclass
class SpoolResult:
    digest: str
    size: int


class _ChunkReader:
    """Wire chunks from an iterator, each hashed and counted as it is taken.

    An error from the iterator (the upload broke) is remembered in `failed`, so
    the unpacker can tell it from a problem with the archive itself.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.hash = WireDigest()
        self.count = 0
        self.failed: BaseException | None = None

    def next_chunk(self) -> bytes | None:
        try:
            chunk = next(self._chunks, None)
        except BaseException as exc:
            self.failed = exc
            raise
        if chunk is None:
            return None
        self.hash.update(chunk)
        self.count += len(chunk)
        return chunk

    def drain(self) -> None:
        """Pull (and hash) whatever the tar reader left: the digest covers every byte."""
        while self.next_chunk() is not None:
            pass


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


def _open_tar(source: TarSource) -> tarfile.TarFile:
    # "r:" (not the stream mode "r|"): tarfile then reads headers straight from
    # the source, which only moves forward, and leaves file contents to copy_to.
    fileobj: Any = source  # file-like enough for tarfile; typeshed wants a real file
    return tarfile.open(
        fileobj=fileobj, mode="r:", encoding=_ENCODING, errors=_ERRORS, tarinfo=BoundedTarInfo
    )


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


class _Stage:
    """A private staging dir next to one destination (same filesystem, so a rename moves it)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.made: list[Path] = []  # parents of dest created here, outermost first
        missing = []
        p = dest.parent
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir(exist_ok=True)
            self.made.append(p)
        try:
            # mkdtemp: mode 0700 and a random name, so nothing else walks in while we write.
            self.box: Path | None = Path(tempfile.mkdtemp(prefix=".ferry-stage-", dir=dest.parent))
            self.tree = self.box / "tree"
            self.tree.mkdir()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self.discard_box()
        self.discard_parents()

    def discard_box(self) -> None:
        if self.box is not None:
            shutil.rmtree(self.box, ignore_errors=True)
            self.box = None

    def discard_parents(self) -> None:
        for p in reversed(self.made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty
        self.made = []

    def commit(self, dir_meta: Mapping[tuple[str, ...], tarfile.TarInfo]) -> None:
        """Move the staged tree into place: one rename, or a merge into a non-empty dir."""
        assert self.box is not None
        try:
            st = os.lstat(self.dest)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"{self.dest} exists and is not a directory")
        try:
            os.rename(self.tree, self.dest)  # also replaces an empty directory
        except OSError as exc:
            if st is None or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                raise
            src_fd = os.open(self.tree, _O_DIR)
            try:
                dst_fd = os.open(self.dest, _O_DIR)
                try:
                    _merge(src_fd, dst_fd, (), dir_meta)
                finally:
                    os.close(dst_fd)
            finally:
                os.close(src_fd)
        shutil.rmtree(self.box, ignore_errors=True)
        self.box = None
        self.made = []


def _merge(
    src_fd: int,
    dst_fd: int,
    rel: tuple[str, ...],
    dir_meta: Mapping[tuple[str, ...], tarfile.TarInfo],
) -> None:
    """Move every entry of a staged dir into an existing dir, then give it the archive's metadata.

    Same outcome as unpacking in place: an existing dir is kept and merged,
    anything else standing in the way (a file, a symlink: never followed) is replaced.
    """
    for name in sorted(os.listdir(src_fd)):
        src_st = os.lstat(name, dir_fd=src_fd)
        try:
            dst_st = os.lstat(name, dir_fd=dst_fd)
        except FileNotFoundError:
            dst_st = None
        if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
            if not stat.S_ISDIR(src_st.st_mode):
                where = "/".join((*rel, name))
                raise ArchiveError(
                    f"{where}: a directory already exists where the archive has a file"
                )
            sub_src = os.open(name, _O_DIR, dir_fd=src_fd)
            try:
                sub_dst = os.open(name, _O_DIR, dir_fd=dst_fd)
                try:
                    _merge(sub_src, sub_dst, (*rel, name), dir_meta)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
            continue
        if dst_st is not None and stat.S_ISDIR(src_st.st_mode):
            os.unlink(name, dir_fd=dst_fd)  # rename cannot put a dir over a non-dir
        os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    m = dir_meta.get(rel)
    if m is not None:
        _apply_fd_meta(dst_fd, m)


class StagedUnpack:
    """Unpacks an archive while it arrives, into private staging dirs, and publishes on commit.

    Each destination gets a staging dir in its parent directory (so the final
    move is a rename on the same filesystem). Every byte is hashed as it comes
    in; entries are validated and written as they are decoded. Nothing appears
    in a destination until `commit` has checked the digest; a hostile or corrupt
    archive is refused then, and its staging dirs are already gone. `discard`
    (idempotent) removes everything staged.

    Problems with the archive are kept until `commit`, after the digest check,
    so a transfer corrupted in flight reports as a digest mismatch, not as the
    garbage it decodes to. With `fail_fast` (over TLS, where nothing is corrupted
    in flight) the first problem is raised at once instead, and the rest of the
    stream is not read.

    `max_raw_bytes` caps what the archive unpacks to, tar headers and padding
    included: the stream is refused the moment it decodes past it.
    """

    def __init__(
        self,
        sections: Mapping[str, Path],
        *,
        container_roots: Collection[str] = CONTAINER_ROOT_SECTIONS,
        max_raw_bytes: int | None = None,
        progress: ProgressFn | None = None,
        fail_fast: bool = False,
    ) -> None:
        for name in sections:
            if not _SECTION_RE.match(name):
                raise ArchiveError(f"invalid section name {name!r}")
        self.sections = {name: Path(p) for name, p in sections.items()}
        self.container_roots = set(container_roots)
        self.max_raw_bytes = max_raw_bytes
        self.progress = progress
        self.fail_fast = fail_fast
        self.stats = ArchiveStats()
        self.problem: Exception | None = None
        self._stages: dict[str, _Stage] = {}
        self._dir_meta: dict[str, dict[tuple[str, ...], tarfile.TarInfo]] = {}
        self._received = False
        self._lock = threading.Lock()

    @property
    def staging_dirs(self) -> list[str]:
        return [str(s.box) for s in self._stages.values() if s.box is not None]

    async def receive(
        self,
        stream: AsyncIterable[bytes],
        *,
        expected_digest: str | None = None,
        max_bytes: int | None = None,
    ) -> SpoolResult:
        """Consume an upload, unpacking into staging as it arrives.

        Raises DigestMismatch (with `expected_digest`) or ArchiveError (over
        `max_bytes`) with everything staged removed; a broken stream's own
        error propagates the same way. Problems with the archive's content are
        raised by `commit`.
        """

        async def limited() -> AsyncIterator[bytes]:
            size = 0
            async for chunk in stream:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ArchiveTooLarge(f"archive exceeds {max_bytes} bytes")
                yield chunk

        try:
            await feed_blocking_consumer(limited(), self.consume)
        except BaseException:
            await asyncio.to_thread(self.discard)
            raise
        if expected_digest is not None and self.stats.digest != expected_digest:
            await asyncio.to_thread(self.discard)
            raise DigestMismatch(
                f"archive digest is {self.stats.digest}, expected {expected_digest}"
            )
        return SpoolResult(self.stats.digest, self.stats.compressed_bytes)

    def consume(self, chunks: Iterator[bytes]) -> None:
        """Blocking: unpack `chunks` into staging. Only an error of `chunks` itself is raised,
        and with `fail_fast` the archive's first problem."""
        with self._lock:
            if self._received:
                raise ArchiveError("this StagedUnpack already received an archive")
            self._received = True
        reader = _ChunkReader(chunks)
        try:
            try:
                for name, dest in self.sections.items():
                    self._stages[name] = _Stage(dest)
                self._extract(reader)
            except Exception as exc:
                if reader.failed is not None:
                    raise
                if isinstance(exc, tarfile.TarError | zstandard.ZstdError | EOFError | FrameError):
                    exc = ArchiveError(f"archive is corrupt: {exc}")
                self.problem = exc
                self._discard_stages()  # free the space now; the rest is only hashed
                if self.fail_fast:
                    raise exc from None
            reader.drain()
        except BaseException:
            self._discard_stages()
            raise
        finally:
            self.stats.digest = _digest(reader.hash)
            self.stats.compressed_bytes = reader.count

    def commit(self, expected_digest: str | None) -> ArchiveStats:
        """Blocking: check the digest, then move every staged tree into its destination."""
        try:
            if not self._received:
                raise ArchiveError("nothing was received")
            if expected_digest is not None and self.stats.digest != expected_digest:
                raise DigestMismatch(
                    f"archive digest is {self.stats.digest}, expected {expected_digest}"
                )
            if self.problem is not None:
                raise self.problem
            for name, stage in self._stages.items():
                stage.commit(self._dir_meta.get(name, {}))
        except BaseException:
            self.discard()
            raise
        self._stages = {}
        return self.stats

    def discard(self) -> None:
        """Blocking: remove everything staged (and parents made for it). Safe to repeat."""
        self._discard_stages()

    def _discard_stages(self) -> None:
        stages = list(self._stages.values())
        for stage in stages:
            stage.discard_box()
        for stage in reversed(stages):  # parents may be shared: emptied boxes first
            stage.discard_parents()

    def _extract(self, reader: _ChunkReader) -> None:
        # The cap counts the whole tar stream, headers and padding included, and
        # nothing is decoded past it (a compression bomb never unfolds).
        source = TarSource(reader.next_chunk, limit=self.max_raw_bytes, too_large=ArchiveTooLarge)
        checker = _Checker(set(self.sections), self.container_roots, self.max_raw_bytes)
        trees = {name: _Tree(stage.tree) for name, stage in self._stages.items()}
        dirs: list[tuple[str, tuple[str, ...], tarfile.TarInfo]] = []
        written = 0
        try:
            with _open_tar(source) as tar:
                for m in tar:
                    section, parts = checker.check(m)
                    self.stats.entries += 1
                    rel = parts[1:]
                    tree = trees[section]
                    if m.isdir():
                        dirs.append((section, rel, m))
                        if not rel:
                            continue
                    pfd = tree.dir_fd(rel[:-1])
                    leaf = rel[-1]
                    exists = _clear_slot(pfd, leaf, m.isdir())
                    if m.isdir():
                        if not exists:
                            os.mkdir(leaf, 0o700, dir_fd=pfd)
                    elif m.isreg():
                        written += _write_file(source, m, pfd, leaf)
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
                    if self.progress:
                        self.progress(written, reader.count)
            # Directory metadata last: adding entries changes a dir's mtime, and a
            # read-only mode would be in the way. Deepest first.
            for section, rel, m in sorted(dirs, key=lambda d: len(d[1]), reverse=True):
                tree = trees[section]
                fd = os.open(".", _O_DIR, dir_fd=tree.dir_fd(rel))
                try:
                    _apply_fd_meta(fd, m)
                finally:
                    os.close(fd)
                self._dir_meta.setdefault(section, {})[rel] = m
        finally:
            for tree in trees.values():
                tree.close()
        self.stats.raw_bytes = written


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


def _write_file(source: TarSource, m: tarfile.TarInfo, pfd: int, leaf: str) -> int:
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
        _apply_fd_meta(fd, m)
    finally:
        os.close(fd)
    return int(m.size)


def _apply_path_meta(pfd: int, leaf: str, m: tarfile.TarInfo, *, chmod: bool) -> None:
    """Metadata for entries that cannot be opened (symlinks, whiteouts)."""
    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
    if chmod:
        os.chmod(leaf, m.mode & 0o7777, dir_fd=pfd)  # just made by mknod, not a link
    # /proc/self/fd/N/leaf reaches the entry through our verified dir fd.
    _set_xattrs(f"/proc/self/fd/{pfd}/{leaf}", m)
    ns = _mtime_ns(m)
    os.utime(leaf, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
