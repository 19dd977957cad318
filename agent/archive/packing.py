"""Packing: directories as named sections into one framed, digested stream."""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import threading
from collections.abc import (
    AsyncGenerator,
    Generator,
    Iterator,
    Mapping,
)
from pathlib import Path
from typing import Any

import structlog

from agent.archive.common import (
    DEFAULT_CHUNK,
    DEFAULT_LEVEL,
    ENCODING,
    ERRORS,
    MTIME_NS_KEY,
    PART_OFFSET_KEY,
    SECTION_RE,
    XATTR_PREFIX,
    ArchiveError,
    ArchiveStats,
    ProgressFn,
    digest_text,
    kind_of_mode,
)
from agent.archive_frames import Framer, WireDigest
from agent.bridges import aiter_thread

log = structlog.get_logger(__name__)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


class GrowingFiles:
    """Image files a dump is still writing, packed as they grow.

    CRIU writes each pages-N.img front to back (splice into the file's
    position), so what is below its size is final. While the dump runs, the
    packer sends that prefix in whole parts of `part` bytes; once `finish` is
    called (the dump returned), the section's walk sends the rest. `abandon`
    (the dump failed) makes the packer raise.
    """

    def __init__(
        self,
        section: str,
        directory: Path,
        prefix: str = "pages-",
        part: int = 8 << 20,
        poll: float = 0.005,
    ) -> None:
        self.section = section
        self.directory = Path(directory)
        self.prefix = prefix
        self.part = part
        self.poll = poll
        self.sent: dict[str, int] = {}  # file name -> bytes packed as parts
        self.root_sent = False
        self._done = threading.Event()
        self._failed: str | None = None

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def finish(self) -> None:
        self._done.set()

    def abandon(self, why: str) -> None:
        self._failed = why
        self._done.set()

    def check(self) -> None:
        if self._failed is not None:
            raise ArchiveError(f"the dump being packed failed: {self._failed}")

    def wait(self) -> None:
        self._done.wait(self.poll)


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
        growing: GrowingFiles | None = None,
    ) -> None:
        for name, root in sections.items():
            if not SECTION_RE.match(name):
                raise ArchiveError(f"invalid section name {name!r}")
            if growing is not None and name == growing.section:
                continue  # the dump makes it
            if not Path(root).is_dir():
                raise ArchiveError(f"section {name}: {root} is not a directory")
        self.growing = growing
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
        self.stats.digest = digest_text(h)
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
        if self.growing is not None:
            for chunk, bulk in self._pack_growing(self.growing):
                written += len(chunk)
                yield chunk, bulk
            self.growing.check()
        for section, root in self.sections.items():
            for chunk, bulk in self._pack_section(section, Path(root)):
                written += len(chunk)
                yield chunk, bulk
        # End-of-archive: two zero blocks, padded to a full record like tarfile does.
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        written += len(end)
        pad = -written % tarfile.RECORDSIZE
        yield end + tarfile.NUL * pad, False

    def _pack_growing(self, growing: GrowingFiles) -> Iterator[tuple[bytes, bool]]:
        """While the dump runs: its directory, then whole parts of the files it writes."""
        section, directory = growing.section, growing.directory
        while growing.running:
            growing.check()
            if not growing.root_sent and directory.is_dir():
                info = self._tarinfo(str(directory), section, os.lstat(directory), {})
                assert info is not None
                self.stats.entries += 1
                growing.root_sent = True
                yield info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS), False
            if growing.root_sent:
                for name in sorted(os.listdir(directory)):
                    if not (name.startswith(growing.prefix) and name.endswith(".img")):
                        continue
                    path = directory / name
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    offset = growing.sent.get(name, 0)
                    n = (st.st_size - offset) // growing.part * growing.part
                    if n <= 0:
                        continue
                    info = self._part_info(path, f"{section}/{name}", st, offset, n)
                    self.stats.entries += 1
                    yield info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS), False
                    yield from self._file_data(str(path), n, offset)
                    growing.sent[name] = offset + n
            growing.wait()

    @staticmethod
    def _part_info(
        path: Path, arcname: str, st: os.stat_result, offset: int, size: int
    ) -> tarfile.TarInfo:
        info = tarfile.TarInfo(arcname)
        info.type = tarfile.REGTYPE
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        info.size = size
        # The final member (from the walk) carries the file's own metadata.
        info.pax_headers = {PART_OFFSET_KEY: str(offset)} if offset else {}
        return info

    def _pack_section(self, section: str, root: Path) -> Iterator[tuple[bytes, bool]]:
        inodes: dict[tuple[int, int], str] = {}
        growing = self.growing if self.growing and self.growing.section == section else None

        def walk(path: str, arcname: str) -> Iterator[tuple[bytes, bool]]:
            st = os.lstat(path)
            info = self._tarinfo(path, arcname, st, inodes)
            if info is None:
                return
            # The dump dir and the prefixes of its growing files went while it ran.
            header = not (growing and arcname == section and growing.root_sent)
            offset = 0
            if growing and info.type == tarfile.REGTYPE and arcname.count("/") == 1:
                offset = growing.sent.get(arcname.partition("/")[2], 0)
                if info.size < offset:
                    raise ArchiveError(f"{path} shrank while being packed")
                if offset:
                    info.size -= offset
                    info.pax_headers = {**info.pax_headers, PART_OFFSET_KEY: str(offset)}
            if header:
                self.stats.entries += 1
                yield info.tobuf(tarfile.PAX_FORMAT, ENCODING, ERRORS), False
                if info.type == tarfile.REGTYPE and info.size:
                    yield from self._file_data(path, info.size, offset)
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
            raise ArchiveError(f"{path}: {kind_of_mode(mode, st.st_rdev)} cannot be migrated")
        for name, value in _xattrs(path).items():
            pax[XATTR_PREFIX + name] = value.decode(ENCODING, ERRORS)
        info.pax_headers = pax
        return info

    def _file_data(self, path: str, size: int, offset: int = 0) -> Iterator[tuple[bytes, bool]]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
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
