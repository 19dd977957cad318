"""Pages packed while the dump still writes them: parts, then the rest after the dump."""

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

from agent.archive import ArchiveError, Packer, StagedUnpack, UnsafeArchive
from agent.archive.common import PART_OFFSET_KEY
from agent.archive.packing import GrowingFiles
from tests.helpers import run_async, wait_for

PART = 64 << 10


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def _unpack(tmp_path: Path, chunks: list[bytes], digest: str) -> Path:
    (tmp_path / "layer" / "diff").mkdir(parents=True)
    dests = {
        "checkpoint": tmp_path / "containers" / "c1" / "checkpoints" / "ck",
        "upper": tmp_path / "layer" / "diff",
    }
    staged = StagedUnpack(dests)
    run_async(staged.receive(_aiter(chunks), expected_digest=digest))
    staged.commit(digest)
    return dests["checkpoint"]


def test_a_file_written_while_it_is_packed_arrives_whole(tmp_path: Path) -> None:
    ckpt, upper = tmp_path / "src" / "ckpt", tmp_path / "src" / "upper"
    upper.mkdir(parents=True)
    (upper / "motd").write_text("hello")
    growing = GrowingFiles("checkpoint", ckpt, part=PART, poll=0.001)
    packer = Packer({"checkpoint": ckpt, "upper": upper}, chunk_size=16 << 10, growing=growing)
    data = os.urandom(10 * PART + 1234)  # not a whole number of parts
    chunks: list[bytes] = []
    consumer = threading.Thread(target=lambda: chunks.extend(packer))
    consumer.start()
    try:
        # The "dump": the directory appears, a page image grows front to back.
        ckpt.mkdir(parents=True)
        (ckpt / "core-1.img").write_bytes(b"core")
        with open(ckpt / "pages-1.img", "wb") as f:
            for i in range(0, len(data), 3 * PART):
                f.write(data[i : i + 3 * PART])
                f.flush()
                sent = len(data[: i + 3 * PART]) // PART * PART
                wait_for(
                    lambda sent=sent: growing.sent.get("pages-1.img", 0) >= sent,
                    timeout=10,
                    what="the packer to send the written prefix",
                )
        (ckpt / "pagemap-1.img").write_bytes(b"map")
    finally:
        growing.finish()
        consumer.join(timeout=30)
    assert growing.sent["pages-1.img"] == 10 * PART  # sent while "dumping"
    out = _unpack(tmp_path, chunks, packer.digest)
    assert (out / "pages-1.img").read_bytes() == data
    assert (out / "core-1.img").read_bytes() == b"core"
    assert (out / "pagemap-1.img").read_bytes() == b"map"


def test_a_failed_dump_stops_the_packer(tmp_path: Path) -> None:
    growing = GrowingFiles("checkpoint", tmp_path / "never", poll=0.001)
    packer = Packer({"checkpoint": tmp_path / "never"}, growing=growing)
    growing.abandon("runc exited 1")
    with pytest.raises(ArchiveError, match="runc exited 1"):
        list(packer)


def _with_parts(*members: tuple[str, bytes, dict[str, str], int]) -> tuple[list[bytes], str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in ("checkpoint", "upper"):
            d = tarfile.TarInfo(name)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, body, pax, kind in members:
            info = tarfile.TarInfo(name)
            info.type = bytes([kind]) if isinstance(kind, int) else kind
            info.size = len(body) if info.type == tarfile.REGTYPE else 0
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(body) if info.type == tarfile.REGTYPE else None)
    data = zstandard.ZstdCompressor().compress(raw.getvalue())
    return [data], "sha256:" + hashlib.sha256(data).hexdigest()


REG = tarfile.REGTYPE[0]
DIR = tarfile.DIRTYPE[0]


@pytest.mark.parametrize(
    ("members", "why"),
    [
        # A part of a file the archive never made (one already on the target, say).
        ((("checkpoint/x", b"zz", {PART_OFFSET_KEY: "0"}, REG),), "not an earlier file"),
        # A part that would leave a hole, or overwrite what is there.
        (
            (
                ("checkpoint/x", b"abcd", {}, REG),
                ("checkpoint/x", b"zz", {PART_OFFSET_KEY: "2"}, REG),
            ),
            "has 4 bytes",
        ),
        (
            (("checkpoint/d", b"", {}, DIR), ("checkpoint/d", b"z", {PART_OFFSET_KEY: "0"}, REG)),
            "not an earlier file",
        ),
        (
            (
                ("checkpoint/x", b"abcd", {}, REG),
                ("checkpoint/x", b"zz", {PART_OFFSET_KEY: "-4"}, REG),
            ),
            "not a number",
        ),
    ],
)
def test_parts_that_do_not_continue_an_earlier_file_are_refused(
    tmp_path: Path, members: tuple[tuple[str, bytes, dict[str, str], int], ...], why: str
) -> None:
    chunks, digest = _with_parts(*members)
    with pytest.raises(UnsafeArchive, match=why):
        _unpack(tmp_path, chunks, digest)
    assert not (tmp_path / "containers").exists()


def test_a_part_at_the_end_of_an_earlier_file_continues_it(tmp_path: Path) -> None:
    chunks, digest = _with_parts(
        ("checkpoint/x", b"abcd", {}, REG),
        ("checkpoint/x", b"ef", {PART_OFFSET_KEY: "4"}, REG),
    )
    assert (_unpack(tmp_path, chunks, digest) / "x").read_bytes() == b"abcdef"
