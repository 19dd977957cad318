"""Unpacking while receiving: staged next to the destination, published only after the digest."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard

from agent import archive
from agent.archive import ArchiveError, DigestMismatch, Packer, StagedUnpack, UnsafeArchive
from tests.helpers import run_async


def _src(tmp_path: Path) -> dict[str, Path]:
    upper, ckpt = tmp_path / "src" / "upper", tmp_path / "src" / "ckpt"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("hello")
    os.symlink("/etc/motd", upper / "etc" / "issue")  # container-absolute, never followed
    ckpt.mkdir()
    (ckpt / "pages-1.img").write_bytes(os.urandom(3 << 20))
    return {"checkpoint": ckpt, "upper": upper}


def _dests(tmp_path: Path) -> dict[str, Path]:
    # As on a target: the checkpoint dir does not exist yet, the upper dir exists empty.
    (tmp_path / "layer" / "diff").mkdir(parents=True)
    return {
        "checkpoint": tmp_path / "containers" / "c1" / "checkpoints" / "ck",
        "upper": tmp_path / "layer" / "diff",
    }


def _packed(sections: dict[str, Path]) -> tuple[list[bytes], str]:
    packer = Packer(sections, chunk_size=64 << 10)
    chunks = list(packer)
    return chunks, packer.digest


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def _assert_untouched(tmp_path: Path) -> None:
    """Nothing in the destinations, no staging dir, no parent made for them."""
    assert not (tmp_path / "containers").exists()
    assert list((tmp_path / "layer").iterdir()) == [tmp_path / "layer" / "diff"]
    assert list((tmp_path / "layer" / "diff").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["keep"]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    return tmp_path / "outside"


def test_streamed_state_appears_only_at_commit(tmp_path: Path, outside: Path) -> None:
    src = _src(tmp_path)
    chunks, digest = _packed(src)
    dests = _dests(tmp_path)
    staged = StagedUnpack(dests)

    async def go() -> archive.SpoolResult:
        return await staged.receive(_aiter(chunks))  # digest unknown while streaming

    res = run_async(go())
    assert (res.digest, res.size) == (digest, sum(map(len, chunks)))
    # Everything is unpacked, but in staging dirs beside the destinations.
    assert not dests["checkpoint"].exists() and list(dests["upper"].iterdir()) == []
    boxes = staged.staging_dirs
    assert len(boxes) == 2 and all(Path(b).name.startswith(".ferry-stage-") for b in boxes)
    assert {Path(b).parent for b in boxes} == {dests["checkpoint"].parent, dests["upper"].parent}
    assert all(os.stat(b).st_mode & 0o777 == 0o700 for b in boxes)

    stats = staged.commit(digest)
    assert stats.digest == digest and stats.entries == 6
    assert (dests["upper"] / "etc" / "motd").read_text() == "hello"
    assert os.readlink(dests["upper"] / "etc" / "issue") == "/etc/motd"
    assert (dests["checkpoint"] / "pages-1.img").read_bytes() == (
        src["checkpoint"] / "pages-1.img"
    ).read_bytes()
    assert not any(Path(b).exists() for b in boxes)
    assert sorted(p.name for p in (tmp_path / "layer").iterdir()) == ["diff"]


def test_digest_mismatch_after_streaming_leaves_nothing(tmp_path: Path, outside: Path) -> None:
    chunks, _ = _packed(_src(tmp_path))
    staged = StagedUnpack(_dests(tmp_path))
    run_async(staged.receive(_aiter(chunks)))
    with pytest.raises(DigestMismatch, match="expected sha256:0000"):
        staged.commit("sha256:" + "0" * 64)
    _assert_untouched(tmp_path)
    staged.discard()  # again: harmless
    _assert_untouched(tmp_path)


def test_known_digest_checked_at_the_end_of_the_stream(tmp_path: Path, outside: Path) -> None:
    chunks, _ = _packed(_src(tmp_path))
    staged = StagedUnpack(_dests(tmp_path))
    with pytest.raises(DigestMismatch):
        run_async(staged.receive(_aiter(chunks), expected_digest="sha256:" + "1" * 64))
    _assert_untouched(tmp_path)


def test_corruption_in_transit_reports_as_digest_mismatch(tmp_path: Path, outside: Path) -> None:
    chunks, digest = _packed(_src(tmp_path))
    data = bytearray(b"".join(chunks))
    data[len(data) // 2] ^= 0xFF
    staged = StagedUnpack(_dests(tmp_path))
    run_async(staged.receive(_aiter([bytes(data)])))
    with pytest.raises(DigestMismatch):
        staged.commit(digest)
    _assert_untouched(tmp_path)


def _hostile() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("upper", tarfile.DIRTYPE), ("checkpoint", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
        ok = tarfile.TarInfo("upper/fine")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"fine"))
        evil = tarfile.TarInfo("checkpoint/../../outside/pwn")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def test_hostile_entry_refused_at_commit_with_nothing_written(
    tmp_path: Path, outside: Path
) -> None:
    data = _hostile()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    staged = StagedUnpack(_dests(tmp_path))
    # The upload itself is accepted (its digest is right); the staging is already gone.
    res = run_async(staged.receive(_aiter([data[:100], data[100:]]), expected_digest=digest))
    assert res.digest == digest
    assert staged.staging_dirs == []
    with pytest.raises(UnsafeArchive, match=r"'\.\.' path component"):
        staged.commit(digest)
    _assert_untouched(tmp_path)


def test_broken_upload_removes_the_staging(tmp_path: Path, outside: Path) -> None:
    chunks, _ = _packed(_src(tmp_path))

    async def broken() -> AsyncIterator[bytes]:
        for c in chunks[:3]:
            yield c
        raise ConnectionResetError("peer went away")

    staged = StagedUnpack(_dests(tmp_path))
    with pytest.raises(ConnectionResetError):
        run_async(staged.receive(broken()))
    _assert_untouched(tmp_path)


def test_size_limit_while_streaming(tmp_path: Path, outside: Path) -> None:
    chunks, _ = _packed(_src(tmp_path))
    staged = StagedUnpack(_dests(tmp_path))
    with pytest.raises(ArchiveError, match="exceeds 100000 bytes"):
        run_async(staged.receive(_aiter(chunks), max_bytes=100_000))
    _assert_untouched(tmp_path)


def test_decompression_bomb_refused(tmp_path: Path, outside: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("upper"))
        big = tarfile.TarInfo("upper/zeros")
        big.size = 1 << 20
        tar.addfile(big, io.BytesIO(b"\0" * (1 << 20)))
    data = zstandard.ZstdCompressor().compress(raw.getvalue())
    staged = StagedUnpack(_dests(tmp_path), max_raw_bytes=65536)
    run_async(staged.receive(_aiter([data])))
    with pytest.raises(UnsafeArchive, match="more than 65536 bytes"):
        staged.commit(None)
    _assert_untouched(tmp_path)


def test_stream_decoding_past_the_cap_is_cut_even_when_no_size_adds_up(
    tmp_path: Path, outside: Path
) -> None:
    # Empty files only: every declared size is 0, but their headers still decode to bytes.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("upper"))
        for i in range(400):  # about 200 KiB of headers
            tar.addfile(tarfile.TarInfo(f"upper/f{i}"))
    data = zstandard.ZstdCompressor().compress(raw.getvalue())
    staged = StagedUnpack(_dests(tmp_path), max_raw_bytes=65536, fail_fast=True)
    with pytest.raises(archive.ArchiveTooLarge, match="more than 65536 bytes"):
        run_async(staged.receive(_aiter([data])))
    _assert_untouched(tmp_path)


def test_a_huge_metadata_header_is_refused_before_it_is_read(tmp_path: Path, outside: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("upper"))
        f = tarfile.TarInfo("upper/f")
        f.pax_headers = {"comment": "x" * (archive.MAX_META_BYTES + 1)}
        tar.addfile(f)
    data = zstandard.ZstdCompressor().compress(raw.getvalue())
    staged = StagedUnpack(_dests(tmp_path), fail_fast=True)  # no cap at all
    with pytest.raises(archive.ArchiveTooLarge, match="metadata header"):
        run_async(staged.receive(_aiter([data])))
    _assert_untouched(tmp_path)


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def test_commit_merges_into_a_non_empty_destination(tmp_path: Path, outside: Path) -> None:
    src = _src(tmp_path)
    os.chmod(src["upper"] / "etc", 0o750)
    chunks, digest = _packed(src)
    dests = _dests(tmp_path)
    upper = dests["upper"]
    (upper / "already").write_text("kept")
    (upper / "etc").mkdir()
    (upper / "etc" / "motd").write_text("old")
    os.symlink(outside, upper / "etc" / "issue")  # replaced, never followed
    staged = StagedUnpack(dests)
    run_async(staged.receive(_aiter(chunks)))
    staged.commit(digest)
    assert (upper / "already").read_text() == "kept"
    assert (upper / "etc" / "motd").read_text() == "hello"
    assert os.readlink(upper / "etc" / "issue") == "/etc/motd"
    assert os.stat(upper / "etc").st_mode & 0o777 == 0o750
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert sorted(p.name for p in (tmp_path / "layer").iterdir()) == ["diff"]


def test_closing_the_packer_early_stops_its_thread(tmp_path: Path) -> None:
    src = _src(tmp_path)

    async def go() -> None:
        packer = Packer(src, chunk_size=16 << 10)
        it = packer.aiter(prefetch=2)
        async for _ in it:
            break
        await it.aclose()  # type: ignore[attr-defined]

    run_async(go())
    assert not [t for t in threading.enumerate() if t.name == "ferry-pack"]
