"""The wire framing: compressed where it pays, stored where it does not, digested as received."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard

from agent.archive import ArchiveError, DigestMismatch, Packer, StagedUnpack, UnsafeArchive
from agent.archive_frames import (
    KIND_STORED,
    KIND_ZSTD,
    MAGIC,
    MAX_FRAME_RAW,
    FrameError,
    Framer,
    TarSource,
)


def _src(tmp_path: Path) -> dict[str, Path]:
    ckpt, upper = tmp_path / "src" / "ckpt", tmp_path / "src" / "upper"
    ckpt.mkdir(parents=True)
    (ckpt / "pages-1.img").write_bytes(os.urandom(3 << 20))  # random memory: stored
    (ckpt / "pages-2.img").write_bytes(b"\0" * (2 << 20) + b"page" * (256 << 10))  # compresses
    (ckpt / "core-1.img").write_bytes(os.urandom(300))
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("hello\n" * 1000)
    return {"checkpoint": ckpt, "upper": upper}


def _dests(tmp_path: Path) -> dict[str, Path]:
    return {"checkpoint": tmp_path / "dst" / "ckpt", "upper": tmp_path / "dst" / "upper"}


def _records(wire: bytes) -> list[tuple[int, int]]:
    """(kind, payload length) of every record, checking the layout end to end."""
    assert wire.startswith(MAGIC)
    pos, out = len(MAGIC), []
    while pos < len(wire):
        kind, length = wire[pos], int.from_bytes(wire[pos + 1 : pos + 5], "big")
        out.append((kind, length))
        pos += 5 + length
    assert pos == len(wire)
    return out


def _unpack(tmp_path: Path, chunks: list[bytes], digest: str | None, **kw: object) -> StagedUnpack:
    staged = StagedUnpack(_dests(tmp_path), **kw)  # type: ignore[arg-type]
    staged.consume(iter(chunks))
    return staged


def test_random_pages_are_stored_and_the_rest_compressed(tmp_path: Path) -> None:
    src = _src(tmp_path)
    packer = Packer(src)
    chunks = list(packer)
    wire = b"".join(chunks)
    kinds = {k for k, _ in _records(wire)}
    assert kinds == {KIND_STORED, KIND_ZSTD}
    # The random file went as it is; the zero pages and text shrank to almost nothing.
    assert packer.stats.stored_bytes == 3 << 20
    assert len(wire) < (3 << 20) + (64 << 10)
    assert packer.stats.raw_bytes > (6 << 20)

    staged = _unpack(tmp_path, chunks, packer.digest)
    assert staged.stats.digest == packer.digest == "blake3:" + blake3.blake3(wire).hexdigest()
    staged.commit(packer.digest)
    for name in ("pages-1.img", "pages-2.img", "core-1.img"):
        got = (tmp_path / "dst" / "ckpt" / name).read_bytes()
        assert got == (src["checkpoint"] / name).read_bytes(), name
    assert (tmp_path / "dst" / "upper" / "etc" / "motd").read_text() == "hello\n" * 1000


def test_a_flipped_byte_in_stored_pages_is_a_digest_mismatch(tmp_path: Path) -> None:
    """Stored records have no zstd checksum: only the digest over the received bytes catches it."""
    packer = Packer(_src(tmp_path))
    wire = bytearray(b"".join(packer))
    offset = len(MAGIC)
    for kind, length in _records(bytes(wire)):
        if kind == KIND_STORED:
            wire[offset + 5 + length // 2] ^= 0xFF
            break
        offset += 5 + length
    staged = _unpack(tmp_path, [bytes(wire)], packer.digest)
    assert staged.problem is None  # it decodes fine...
    with pytest.raises(DigestMismatch):
        staged.commit(packer.digest)  # ...and is still refused, with nothing left behind
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def test_unpack_caps_still_hold_for_stored_data(tmp_path: Path) -> None:
    packer = Packer(_src(tmp_path))
    chunks = list(packer)
    staged = _unpack(tmp_path, chunks, packer.digest, max_raw_bytes=1 << 20)
    with pytest.raises(UnsafeArchive, match="more than 1048576 bytes"):
        staged.commit(packer.digest)
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def _framed(*records: tuple[int, bytes]) -> bytes:
    return MAGIC + b"".join(bytes((k,)) + len(p).to_bytes(4, "big") + p for k, p in records)


def _read_all(wire: bytes) -> bytes:
    chunks = iter([wire[i : i + 777] for i in range(0, len(wire), 777)])  # odd cuts
    return TarSource(lambda: next(chunks, None)).read()


def test_records_cut_anywhere_read_back_in_order() -> None:
    frame = zstandard.ZstdCompressor().compress(b"b" * 5000)
    wire = _framed((KIND_STORED, b"a" * 3000), (KIND_ZSTD, frame), (KIND_STORED, b"c" * 10))
    assert _read_all(wire) == b"a" * 3000 + b"b" * 5000 + b"c" * 10


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_framed((ord("X"), b"abc")), "unknown record kind"),
        (_framed((KIND_STORED, b"abc"))[:-1], "ends inside a stored record"),
        (_framed((KIND_ZSTD, b"\0" * 10))[:-3], "ends inside a compressed record"),
        (MAGIC + b"S\0", "ends inside a record header"),
        (b"PK\3\4 not ours", "unknown format"),
        (b"", "empty"),
        # A frame that declares more than a record may hold: refused before any memory is taken.
        (
            _framed((KIND_ZSTD, zstandard.ZstdCompressor().compress(b"\0" * (MAX_FRAME_RAW + 1)))),
            "declares",
        ),
        # A frame that does not say how big it is.
        (
            _framed(
                (
                    KIND_ZSTD,
                    zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100),
                )
            ),
            "declares",
        ),
    ],
)
def test_bad_wire_is_refused_with_a_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        _read_all(wire)


def test_bad_wire_is_an_archive_problem_with_nothing_written(tmp_path: Path) -> None:
    wire = _framed((ord("X"), b"abc"))
    staged = _unpack(tmp_path, [wire], None)
    with pytest.raises(ArchiveError, match="corrupt: unknown record kind"):
        staged.commit(None)
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def test_older_agents_single_zstd_stream_still_unpacks(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in ("checkpoint", "upper"):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        f = tarfile.TarInfo("checkpoint/pages-1.img")
        data = os.urandom(200_000)
        f.size = len(data)
        tar.addfile(f, io.BytesIO(data))
    wire = zstandard.ZstdCompressor().compress(raw.getvalue())
    staged = _unpack(tmp_path, [wire[:1000], wire[1000:]], None)
    staged.commit("sha256:" + hashlib.sha256(wire).hexdigest())  # their digest, as they sent it
    assert (tmp_path / "dst" / "ckpt" / "pages-1.img").read_bytes() == data


def test_framer_compresses_small_pieces_together() -> None:
    framer = Framer(level=1, chunk_size=1 << 20)
    outs = [framer.add(b"header" * 50) for _ in range(100)]
    assert outs[0] == MAGIC and all(o is None for o in outs[1:])  # gathered, not sent one by one
    tail = framer.finish()
    assert tail is not None and tail[0] == KIND_ZSTD
    assert _read_all(MAGIC + tail) == b"header" * 50 * 100
