"""The state archive on the wire: compressed where it pays, stored where it does not.

The archive itself is a PAX tar stream (agent.archive). On the wire it is cut
into records, so that each piece is compressed only when that saves something:
CRIU page images of random memory do not shrink at all, and zstd over them
cost as much CPU as the whole rest of the channel.

Layout: ``MAGIC``, then records of ``kind`` (1 byte), ``length`` (4 bytes, big
endian) and ``length`` bytes of payload:

- ``Z``: one complete zstd frame that declares its content size, at most
  MAX_FRAME_RAW bytes of tar stream (headers, small files, pages that shrink);
- ``S``: tar stream bytes, stored as they are.

The digest covers every byte on the wire, magic and record headers included.
It is BLAKE3 ("blake3:<hex>"): sha256 took about 1 ms per MiB on each side,
as much CPU as TLS itself, and BLAKE3 a quarter of that. A stream that starts
with zstd's own magic is the format of older agents (one zstd stream over the
whole tar, digested with sha256) and is still read.

The reading side (TarSource) gives tarfile a forward-only file (read, tell,
seek ahead) and hands file contents straight to a file descriptor, without
tarfile's buffering and copies.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable
from typing import Any

import blake3
import zstandard

MAGIC = b"FERRYTS\x01"  # "Ferry tar stream", format 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
KIND_ZSTD = ord("Z")
KIND_STORED = ord("S")
_HEADER = 5
MAX_FRAME_RAW = 8 << 20  # a Z record never unpacks to more: bounds a hostile frame's memory
MAX_FRAME_WIRE = MAX_FRAME_RAW + (MAX_FRAME_RAW >> 7) + 1024  # zstd's worst-case expansion
# Pieces at least this big are looked at on their own; smaller ones ride along
# in the next compressed record.
PROBE_BYTES = 64 << 10
# A piece is compressed when a sample of it shrinks to at most this share.
# Compressing and decompressing costs about 1.4 ms of CPU per MiB here, while
# TLS moves a MiB in about 3 ms: below a quarter saved it costs more than it gains.
PAYS_RATIO = 0.75


class WireDigest:
    """The digest of a wire stream, of the kind its first bytes call for.

    Framed streams: BLAKE3; older agents' zstd streams: sha256. Bytes that
    come before the kind is known are held (by reference) and hashed then.
    """

    def __init__(self) -> None:
        self._h: Any = None
        self._algo = ""
        self._early: list[Any] = []
        self._early_len = 0

    def update(self, chunk: Any) -> None:
        if self._h is not None:
            self._h.update(chunk)
            return
        self._early.append(chunk)
        self._early_len += len(chunk)
        if self._early_len >= len(MAGIC):
            self._decide()

    def _decide(self) -> None:
        head = b"".join(bytes(c[: len(MAGIC)]) for c in self._early)[: len(MAGIC)]
        if head == MAGIC:
            self._algo, self._h = "blake3", blake3.blake3()
        else:
            self._algo, self._h = "sha256", hashlib.sha256()
        for c in self._early:
            self._h.update(c)
        self._early = []

    def digest(self) -> str:
        if self._h is None:
            self._decide()
        return f"{self._algo}:{self._h.hexdigest()}"


class FrameError(Exception):
    """The wire stream is not a valid framed archive; the message says why."""


def _record(kind: int, length: int) -> bytes:
    return bytes((kind,)) + length.to_bytes(4, "big")


class Framer:
    """Turns tar stream pieces into wire bytes.

    `add(piece, bulk)`: headers and small pieces are gathered and compressed
    together; a bulk piece (file contents) is probed and, if zstd saves too
    little on a sample of it, stored as it is.
    """

    def __init__(self, level: int, chunk_size: int) -> None:
        if not 0 < chunk_size <= MAX_FRAME_RAW // 2:
            raise ValueError(f"chunk size must be 1..{MAX_FRAME_RAW // 2} bytes")
        self.chunk_size = chunk_size
        self._cctx = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
        self._pending: list[Any] = []
        self._pending_len = 0
        self._started = False
        self.stored_bytes = 0  # tar stream bytes sent without compression

    def add(self, piece: Any, bulk: bool = False) -> bytes | None:
        out: list[Any] = []
        if not self._started:
            self._started = True
            out.append(MAGIC)
        size = len(piece)
        if bulk and size >= PROBE_BYTES and not self._pays(piece):
            self._flush(out)
            out.append(_record(KIND_STORED, size))
            out.append(piece)
            self.stored_bytes += size
        else:
            if self._pending_len + size > self.chunk_size:
                self._flush(out)
            self._pending.append(piece)
            self._pending_len += size
            if self._pending_len >= self.chunk_size:
                self._flush(out)
        return _joined(out)

    def finish(self) -> bytes | None:
        out: list[Any] = []
        if not self._started:
            self._started = True
            out.append(MAGIC)
        self._flush(out)
        return _joined(out)

    def _pays(self, piece: Any) -> bool:
        sample = memoryview(piece)[:PROBE_BYTES]
        return len(self._cctx.compress(sample)) <= PAYS_RATIO * len(sample)

    def _flush(self, out: list[Any]) -> None:
        if not self._pending:
            return
        raw = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_len = [], 0
        frame = self._cctx.compress(raw)
        out.append(_record(KIND_ZSTD, len(frame)))
        out.append(frame)


def _joined(out: list[Any]) -> bytes | None:
    if not out:
        return None
    if len(out) == 1:
        return bytes(out[0]) if not isinstance(out[0], bytes) else out[0]
    return b"".join(out)


class TarSource:
    """The tar stream inside a wire stream, as a forward-only file.

    `next_chunk` returns the next wire chunk (hashed and counted by the
    caller) or None at the end. tarfile reads headers through read/tell/seek;
    file contents go to a descriptor with `copy_to`. With `limit`, a tar stream
    longer than that is refused (`too_large`) before the excess is decoded.
    """

    name = None  # tarfile looks for a name on its file object

    def __init__(
        self,
        next_chunk: Callable[[], bytes | None],
        *,
        limit: int | None = None,
        too_large: Callable[[str], Exception] = FrameError,
    ) -> None:
        self._next_chunk = next_chunk
        self._limit = limit
        self._too_large = too_large
        self._decoded = 0
        self._wire = memoryview(b"")
        self._wire_done = False
        self._pieces: collections.deque[memoryview] = collections.deque()
        self._avail = 0
        self._pos = 0
        self._format: str | None = None
        self._kind = 0
        self._left = 0
        self._dctx = zstandard.ZstdDecompressor()
        self._legacy: Any = None
        self.stored_bytes = 0

    # -- the file interface tarfile uses --

    def read(self, n: int = -1) -> bytes:
        while n < 0 or self._avail < n:
            if not self._fill():
                break
        take = self._avail if n < 0 else min(n, self._avail)
        parts = []
        left = take
        while left:
            head = self._pieces[0]
            if len(head) <= left:
                parts.append(head)
                self._pieces.popleft()
                left -= len(head)
            else:
                parts.append(head[:left])
                self._pieces[0] = head[left:]
                left = 0
        self._avail -= take
        self._pos += take
        return b"".join(parts)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise FrameError("the archive stream cannot go backwards")
        self._consume(pos - self._pos, None)
        return self._pos

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next `n` bytes of the tar stream to `fd`."""
        self._consume(n, fd)

    # -- decoding --

    def _consume(self, n: int, fd: int | None) -> None:
        while n:
            if not self._pieces and not self._fill():
                raise FrameError("the archive ends in the middle of a file")
            head = self._pieces[0]
            piece = head if len(head) <= n else head[:n]
            if len(piece) == len(head):
                self._pieces.popleft()
            else:
                self._pieces[0] = head[len(piece) :]
            if fd is not None:
                view = piece
                while view:
                    view = view[os.write(fd, view) :]
            n -= len(piece)
            self._avail -= len(piece)
            self._pos += len(piece)

    def _room(self, n: int) -> None:
        """Refuse before decoding `n` more bytes of tar stream that would pass the limit."""
        if self._limit is not None and self._decoded + n > self._limit:
            raise self._too_large(f"archive unpacks to more than {self._limit} bytes")
        self._decoded += n

    def _push(self, piece: Any) -> None:
        if len(piece):
            self._pieces.append(memoryview(piece))
            self._avail += len(piece)

    def _wire_take(self, n: int) -> memoryview | None:
        """Up to `n` wire bytes (without copying), None at the end of the wire."""
        while not self._wire:
            if self._wire_done:
                return None
            chunk = self._next_chunk()
            if chunk is None:
                self._wire_done = True
                return None
            self._wire = memoryview(chunk)
        out = self._wire[:n]
        self._wire = self._wire[len(out) :]
        return out

    def _wire_exact(self, n: int) -> Any:
        """Exactly `n` wire bytes, or fewer at the end of the wire."""
        first = self._wire_take(n)
        if first is None or len(first) == n:
            return first if first is not None else b""
        buf = bytearray(first)
        while len(buf) < n:
            more = self._wire_take(n - len(buf))
            if more is None:
                break
            buf += more
        return buf

    def _fill(self) -> bool:
        """Decode at least one more piece of the tar stream; False at its end."""
        if self._format is None:
            self._sniff()
        if self._format == "legacy":
            want = 1 << 20
            if self._limit is not None:  # never more than one byte past the limit
                want = max(1, min(want, self._limit - self._decoded + 1))
            out = self._legacy.read(want)
            self._room(len(out))
            self._push(out)
            return bool(out)
        while True:
            if self._left == 0:
                head = self._wire_exact(_HEADER)
                if not head:
                    return False
                if len(head) < _HEADER:
                    raise FrameError("the archive ends inside a record header")
                kind, length = head[0], int.from_bytes(head[1:], "big")
                if kind not in (KIND_ZSTD, KIND_STORED):
                    raise FrameError(f"unknown record kind {kind:#x}")
                if kind == KIND_ZSTD and not 0 < length <= MAX_FRAME_WIRE:
                    raise FrameError(f"compressed record of {length} bytes")
                self._kind, self._left = kind, length
                continue
            if self._kind == KIND_STORED:
                piece = self._wire_take(self._left)
                if piece is None:
                    raise FrameError("the archive ends inside a stored record")
                self._room(len(piece))
                self._left -= len(piece)
                self._push(piece)
                self.stored_bytes += len(piece)
                return True
            frame = self._wire_exact(self._left)
            if len(frame) < self._left:
                raise FrameError("the archive ends inside a compressed record")
            self._left = 0
            self._push(self._decompress(frame))
            return True

    def _decompress(self, frame: Any) -> bytes:
        size = zstandard.frame_content_size(frame)
        if not 0 <= size <= MAX_FRAME_RAW:
            raise FrameError(f"compressed record declares {size} bytes (at most {MAX_FRAME_RAW})")
        self._room(size)
        out = self._dctx.decompress(frame, max_output_size=MAX_FRAME_RAW)
        if len(out) != size:
            raise FrameError("compressed record does not hold what it declares")
        return out

    def _sniff(self) -> None:
        head = self._wire_exact(len(MAGIC))
        if head[: len(MAGIC)] == MAGIC:
            self._format = "framed"
            return
        if head[: len(ZSTD_MAGIC)] == ZSTD_MAGIC:
            # Older agents: one zstd stream. Read through zstd's own bounded reader.
            self._format = "legacy"
            older: Any = _Prefixed(bytes(head), self._wire_take)  # read() is all zstd uses
            self._legacy = self._dctx.stream_reader(older, read_size=1 << 20)
            return
        if not head:
            raise FrameError("the archive is empty")
        raise FrameError("the archive has an unknown format")


class _Prefixed:
    """A read()-able view of bytes already taken, then the rest of the wire."""

    def __init__(self, head: bytes, take: Callable[[int], memoryview | None]) -> None:
        self._head = head
        self._take = take

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        more = self._take(n)
        return b"" if more is None else bytes(more)
