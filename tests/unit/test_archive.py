"""Streaming state archive: faithful round trip, digest checks, hostile archives refused."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import tarfile
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from agent import archive
from agent.archive import ArchiveStats, DigestMismatch, Packer, StagedUnpack, UnsafeArchive
from tests.helpers import run_async


def _pack_to_file(sections: dict[str, Path], dest: Path, **kwargs: Any) -> ArchiveStats:
    """The source's Packer, its stream kept in a file so a test can corrupt or inspect it."""
    packer = Packer(sections, **kwargs)
    with open(dest, "wb") as f:
        for chunk in packer:
            f.write(chunk)
    return packer.stats


def _staged_unpack(
    path: Path, sections: dict[str, Path], *, expected_digest: str, **kwargs: Any
) -> ArchiveStats:
    """The target's way: StagedUnpack takes the stream as it arrives, commit publishes it."""
    staged = StagedUnpack(sections, **kwargs)
    with open(path, "rb") as f:
        staged.consume(iter(lambda: f.read(1 << 16), b""))
    return staged.commit(expected_digest)


UID, GID = 1234, 4321


def _xattr_ok(path: Path, name: str) -> bool:
    try:
        os.setxattr(path, name, b"y")
    except OSError:
        return False
    os.removexattr(path, name)
    return True


def _make_tree(root: Path) -> None:
    upper, ckpt = root / "upper", root / "ckpt"
    (upper / "etc" / "app").mkdir(parents=True)
    (upper / "var" / "lib").mkdir(parents=True)
    (upper / "etc" / "app" / "conf").write_text("port=1\n")
    os.chmod(upper / "etc" / "app" / "conf", 0o640)
    os.chown(upper / "etc" / "app" / "conf", UID, GID)
    (upper / "bin").mkdir()
    tool = upper / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chown(tool, UID, GID)
    os.chmod(tool, 0o4755)  # after chown, which would clear set-id
    (upper / "empty").write_bytes(b"")
    (upper / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"odd name")
    os.symlink("/usr/share/zoneinfo/UTC", upper / "etc" / "localtime")  # container-absolute
    os.symlink("app/conf", upper / "etc" / "conf-link")
    os.lchown(upper / "etc" / "conf-link", UID, GID)
    os.link(upper / "etc" / "app" / "conf", upper / "var" / "lib" / "conf-hardlink")
    opaque = upper / "var" / "lib"
    os.setxattr(opaque, "user.note", b"\xff\x00binary\x01")
    if _xattr_ok(opaque, "trusted.overlay.opaque"):
        os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "etc" / "app" / "conf", "user.checksum", b"abc")
    os.mknod(upper / "etc" / "deleted", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # whiteout
    os.chmod(upper / "var", 0o1777)
    os.chmod(upper, 0o755)
    ckpt.mkdir()
    (ckpt / "pages-1.img").write_bytes(os.urandom(3 << 20) + b"\0" * (1 << 20))
    (ckpt / "inventory.img").write_bytes(b"inv")
    os.utime(upper / "etc" / "app" / "conf", ns=(1, 1_600_000_000_123_456_789))
    os.utime(upper / "etc" / "localtime", ns=(1, 1_500_000_000_987_654_321), follow_symlinks=False)
    os.utime(upper / "etc", ns=(1, 1_400_000_000_000_000_001))


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything we promise to preserve, per relative path."""
    out: dict[str, tuple[object, ...]] = {}
    inode_ids: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            if name == "" and dirpath != str(root):
                continue
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            xattrs = {
                n: os.getxattr(p, n, follow_symlinks=False)
                for n in os.listxattr(p, follow_symlinks=False)
            }
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    content = (content, inode_ids.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            mtime = None if stat.S_ISDIR(st.st_mode) and rel == "." else st.st_mtime_ns
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, mtime, content, xattrs)
    return out


def test_round_trip_preserves_overlay_upper_dir(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    before_upper, before_ckpt = _snapshot(src / "upper"), _snapshot(src / "ckpt")
    progress: list[tuple[int, int]] = []
    spooled = tmp_path / "state.tar.zst"
    stats = _pack_to_file(
        {"checkpoint": src / "ckpt", "upper": src / "upper"},
        spooled,
        chunk_size=256 * 1024,
        progress=lambda raw, comp: progress.append((raw, comp)),
    )
    assert stats.digest == "blake3:" + blake3.blake3(spooled.read_bytes()).hexdigest()
    assert stats.compressed_bytes == spooled.stat().st_size
    assert progress and progress == sorted(progress)
    assert progress[-1] == (stats.raw_bytes, stats.compressed_bytes)

    dst = tmp_path / "dst"
    got = _staged_unpack(
        spooled,
        {"checkpoint": dst / "ckpt", "upper": dst / "upper"},
        expected_digest=stats.digest,
    )
    assert got.digest == stats.digest
    assert (
        got.raw_bytes
        == sum((src / "ckpt" / n).stat().st_size for n in ("pages-1.img", "inventory.img"))
        + sum(
            f.stat().st_size
            for f in (src / "upper").rglob("*")
            if f.is_file() and not f.is_symlink()
        )
        - (src / "upper" / "etc" / "app" / "conf").stat().st_size
    )  # hardlinked once
    after_upper = _snapshot(dst / "upper")
    assert after_upper == before_upper
    assert _snapshot(dst / "ckpt") == before_ckpt
    assert stat.S_IMODE(os.stat(dst / "upper" / "bin" / "tool").st_mode) == 0o4755
    assert os.stat(dst / "upper" / "etc" / "app" / "conf").st_nlink == 2
    wh = os.lstat(dst / "upper" / "etc" / "deleted")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def test_async_packing_streams_the_same_bytes(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    sections = {"checkpoint": tmp_path / "ckpt", "upper": tmp_path / "upper"}
    sync_bytes = b"".join(Packer(sections, chunk_size=65536))

    async def collect() -> tuple[bytes, str, int]:
        packer = Packer(sections, chunk_size=65536)
        chunks = [c async for c in packer.aiter()]
        return b"".join(chunks), packer.digest, len(chunks)

    data, digest, count = run_async(collect())
    assert data == sync_bytes
    assert digest == "blake3:" + blake3.blake3(data).hexdigest()
    assert count > 1


def test_digest_known_only_at_the_end(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    packer = Packer({"upper": tmp_path / "d"})
    with pytest.raises(archive.ArchiveError, match="only after"):
        _ = packer.digest


def test_pack_refuses_fifos_and_skips_sockets(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "app.sock"))
        packer = Packer({"upper": d})
        b"".join(packer)
        assert packer.stats.skipped == ["upper/app.sock"]
    finally:
        sock.close()
    os.mkfifo(d / "pipe")
    with pytest.raises(archive.ArchiveError, match="fifo cannot be migrated"):
        b"".join(Packer({"upper": d}))


def _dests(tmp_path: Path) -> dict[str, Path]:
    return {"checkpoint": tmp_path / "out" / "ckpt", "upper": tmp_path / "out" / "upper"}


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["keep"]


def test_digest_mismatch_writes_nothing(tmp_path: Path) -> None:
    _make_tree(tmp_path / "src")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    spooled = tmp_path / "a.zst"
    stats = _pack_to_file({"upper": tmp_path / "src" / "upper"}, spooled)
    with pytest.raises(DigestMismatch, match="expected sha256:0000"):
        _staged_unpack(spooled, _dests(tmp_path), expected_digest="sha256:" + "0" * 64)
    _assert_nothing_written(tmp_path)

    data = bytearray(spooled.read_bytes())
    data[len(data) // 2] ^= 0xFF  # corruption in transit
    spooled.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        _staged_unpack(spooled, _dests(tmp_path), expected_digest=stats.digest)
    _assert_nothing_written(tmp_path)


def _entry(
    name: str, kind: bytes = tarfile.REGTYPE, **attrs: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    data = b""
    for key, value in attrs.items():
        if key == "data":
            assert isinstance(value, bytes)
            data = value
        else:
            setattr(info, key, value)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _hostile(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    path.write_bytes(compressed)
    return "sha256:" + hashlib.sha256(compressed).hexdigest()


_BASE = [_entry("upper", tarfile.DIRTYPE), _entry("checkpoint", tarfile.DIRTYPE)]

HOSTILE = {
    "dotdot": ([*_BASE, _entry("upper/../../outside/pwn", data=b"x")], "'..' path component"),
    "absolute": ([*_BASE, _entry("/outside/pwn", data=b"x")], "absolute path"),
    "unknown section": ([*_BASE, _entry("other/pwn", data=b"x")], "unknown section 'other'"),
    "symlink escape then file through it (checkpoint)": (
        [
            *_BASE,
            _entry("checkpoint/evil", tarfile.SYMTYPE, linkname="../../outside"),
            _entry("checkpoint/evil/pwn", data=b"x"),
        ],
        "points outside its section",
    ),
    "absolute symlink in checkpoint": (
        [*_BASE, _entry("checkpoint/evil", tarfile.SYMTYPE, linkname="/etc/shadow")],
        "symlink to absolute path",
    ),
    "file through container-absolute symlink (upper)": (
        [
            *_BASE,
            _entry("upper/evil", tarfile.SYMTYPE, linkname="/outside"),
            _entry("upper/evil/pwn", data=b"x"),
        ],
        "goes through 'upper/evil', which is not a directory",
    ),
    "hardlink to outside": (
        [*_BASE, _entry("upper/passwd", tarfile.LNKTYPE, linkname="/etc/passwd")],
        "hardlink to '/etc/passwd'",
    ),
    "hardlink climbing out": (
        [*_BASE, _entry("upper/keep", tarfile.LNKTYPE, linkname="upper/../../outside/keep")],
        "hardlink to",
    ),
    "block device": (
        [*_BASE, _entry("upper/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
        "block device 8:0 is not allowed",
    ),
    "char device other than 0:0": (
        [*_BASE, _entry("upper/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)],
        "character device 1:1 is not allowed",
    ),
    "fifo": ([*_BASE, _entry("upper/pipe", tarfile.FIFOTYPE)], "fifo is not allowed"),
    "file without its directory": (
        [*_BASE, _entry("upper/a/b", data=b"x")],
        "its directory 'upper/a' comes later or never",
    ),
    "duplicate replaces a dir with a symlink": (
        [
            *_BASE,
            _entry("upper/d", tarfile.DIRTYPE),
            _entry("upper/d", tarfile.SYMTYPE, linkname="/outside"),
        ],
        "appears twice",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    entries, message = HOSTILE[case]
    spooled = tmp_path / "evil.zst"
    digest = _hostile(spooled, entries)
    with pytest.raises(UnsafeArchive, match=message.replace("(", r"\(")):
        _staged_unpack(spooled, _dests(tmp_path), expected_digest=digest)
    _assert_nothing_written(tmp_path)


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    spooled = tmp_path / "bomb.zst"
    digest = _hostile(spooled, [*_BASE, _entry("upper/zeros", data=b"\0" * (1 << 20))])
    assert spooled.stat().st_size < 4096
    with pytest.raises(UnsafeArchive, match="more than 65536 bytes"):
        _staged_unpack(spooled, _dests(tmp_path), expected_digest=digest, max_raw_bytes=65536)
    _assert_nothing_written(tmp_path)


def test_unpack_never_follows_symlinks_already_in_destination(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    dests = _dests(tmp_path)
    dests["upper"].mkdir(parents=True)
    os.symlink(tmp_path / "outside", dests["upper"] / "lib")
    spooled = tmp_path / "a.zst"
    digest = _hostile(
        spooled,
        [*_BASE, _entry("upper/lib", tarfile.DIRTYPE), _entry("upper/lib/pwn", data=b"x")],
    )
    _staged_unpack(spooled, dests, expected_digest=digest)
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["keep"]
    assert (dests["upper"] / "lib").is_dir() and not (dests["upper"] / "lib").is_symlink()
    assert (dests["upper"] / "lib" / "pwn").read_bytes() == b"x"
