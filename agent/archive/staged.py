"""Staged unpacking: unpack while the bytes arrive, publish only once the digest matched."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Collection,
    Iterator,
    Mapping,
)
from pathlib import Path

import zstandard

from agent.archive.checks import Checker, open_tar
from agent.archive.common import (
    CONTAINER_ROOT_SECTIONS,
    O_DIR,
    PART_OFFSET_KEY,
    SECTION_RE,
    ArchiveError,
    ArchiveStats,
    ArchiveTooLarge,
    DigestMismatch,
    ProgressFn,
    SpoolResult,
    digest_text,
)
from agent.archive.fdops import (
    Tree,
    append_file,
    apply_fd_meta,
    apply_path_meta,
    clear_slot,
    write_file,
)
from agent.archive_frames import FrameError, TarSource, WireDigest
from agent.bridges import feed_blocking_consumer


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
            src_fd = os.open(self.tree, O_DIR)
            try:
                dst_fd = os.open(self.dest, O_DIR)
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
            sub_src = os.open(name, O_DIR, dir_fd=src_fd)
            try:
                sub_dst = os.open(name, O_DIR, dir_fd=dst_fd)
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
        apply_fd_meta(dst_fd, m)


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
            if not SECTION_RE.match(name):
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
            self.stats.digest = digest_text(reader.hash)
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
        checker = Checker(set(self.sections), self.container_roots, self.max_raw_bytes)
        trees = {name: Tree(stage.tree) for name, stage in self._stages.items()}
        dirs: list[tuple[str, tuple[str, ...], tarfile.TarInfo]] = []
        written = 0
        try:
            with open_tar(source) as tar:
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
                    if PART_OFFSET_KEY in m.pax_headers:  # the checker vouched for it
                        offset = int(m.pax_headers[PART_OFFSET_KEY])
                        written += append_file(source, m, pfd, leaf, offset)
                        if self.progress:
                            self.progress(written, reader.count)
                        continue
                    exists = clear_slot(pfd, leaf, m.isdir())
                    if m.isdir():
                        if not exists:
                            os.mkdir(leaf, 0o700, dir_fd=pfd)
                    elif m.isreg():
                        written += write_file(source, m, pfd, leaf)
                    elif m.issym():
                        os.symlink(m.linkname, leaf, dir_fd=pfd)
                        apply_path_meta(pfd, leaf, m, chmod=False)
                    elif m.islnk():
                        src = tuple(m.linkname.split("/"))[1:]
                        spfd = os.open(".", O_DIR, dir_fd=tree.dir_fd(src[:-1]))
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
                        apply_path_meta(pfd, leaf, m, chmod=True)
                    if self.progress:
                        self.progress(written, reader.count)
            # Directory metadata last: adding entries changes a dir's mtime, and a
            # read-only mode would be in the way. Deepest first.
            for section, rel, m in sorted(dirs, key=lambda d: len(d[1]), reverse=True):
                tree = trees[section]
                fd = os.open(".", O_DIR, dir_fd=tree.dir_fd(rel))
                try:
                    apply_fd_meta(fd, m)
                finally:
                    os.close(fd)
                self._dir_meta.setdefault(section, {})[rel] = m
        finally:
            for tree in trees.values():
                tree.close()
        self.stats.raw_bytes = written
