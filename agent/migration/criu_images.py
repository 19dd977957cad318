"""Read and rewrite CRIU's page map images (pagemap-N.img, pages-N.img).

The layout follows CRIU's own definitions (criu/include/magic.h, images/pagemap.proto,
criu/include/pagemap.h), checked against images CRIU 4.2 wrote on the testbed:

    u32 IMG_COMMON_MAGIC (0x54564319), u32 PAGEMAP_MAGIC (0x56084025),
    then entries, each a u32 little-endian length and a protobuf message:
      first  pagemap_head  { uint32 pages_id = 1; }
      then   pagemap_entry { uint64 vaddr = 1; uint32 compat_nr_pages = 2;
                             bool in_parent = 3; uint32 flags = 4; uint64 nr_pages = 5; }

`pages-<pages_id>.img` holds, back to back, the 4 KiB pages of every entry whose
flags have PE_PRESENT, in entry order. Fields are kept as they came (unknown
ones included); only `flags` is ever rewritten.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4
PAGE_SIZE = 4096

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ImageFormatError(ValueError):
    pass


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ImageFormatError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ImageFormatError("varint too long")


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


Field = tuple[int, int, int | bytes]  # field number, wire type, value


def decode_message(data: bytes) -> list[Field]:
    fields: list[Field] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, i = _varint(data, i)
        elif wire == _LEN:
            length, i = _varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == _I64:
            value, i = data[i : i + 8], i + 8
        elif wire == _I32:
            value, i = data[i : i + 4], i + 4
        else:
            raise ImageFormatError(f"unsupported wire type {wire}")
        fields.append((num, wire, value))
    if i != len(data):
        raise ImageFormatError("message overruns its length")
    return fields


def encode_message(fields: list[Field]) -> bytes:
    out = bytearray()
    for num, wire, value in fields:
        out += _put_varint(num << 3 | wire)
        if wire == _VARINT:
            assert isinstance(value, int)
            out += _put_varint(value)
        elif wire == _LEN:
            assert isinstance(value, bytes)
            out += _put_varint(len(value)) + value
        else:
            assert isinstance(value, bytes)
            out += value
    return bytes(out)


@dataclass
class PagemapEntry:
    fields: list[Field]

    def _get(self, num: int, default: int = 0) -> int:
        for n, wire, value in self.fields:
            if n == num and wire == _VARINT:
                assert isinstance(value, int)
                return value
        return default

    @property
    def vaddr(self) -> int:
        return self._get(1)

    @property
    def nr_pages(self) -> int:
        # CRIU 4 writes the 64-bit field 5; older images have only field 2.
        return self._get(5) or self._get(2)

    @property
    def flags(self) -> int:
        return self._get(4)

    def with_flags(self, flags: int) -> PagemapEntry:
        kept = [f for f in self.fields if f[0] != 4]
        return PagemapEntry([*kept, (4, _VARINT, flags)])


@dataclass
class Pagemap:
    pages_id: int
    head: list[Field]
    entries: list[PagemapEntry]


def _records(data: bytes) -> Iterator[bytes]:
    i = 8
    while i < len(data):
        if i + 4 > len(data):
            raise ImageFormatError("truncated entry length")
        (size,) = struct.unpack_from("<I", data, i)
        i += 4
        if i + size > len(data):
            raise ImageFormatError("truncated entry")
        yield data[i : i + size]
        i += size


def read_pagemap(path: Path) -> Pagemap:
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<II", data) != (IMG_COMMON_MAGIC, PAGEMAP_MAGIC):
        raise ImageFormatError(f"{path.name} is not a CRIU pagemap image")
    records = list(_records(data))
    if not records:
        raise ImageFormatError(f"{path.name} has no pagemap head")
    head = decode_message(records[0])
    pages_id = next((v for n, w, v in head if n == 1 and w == _VARINT), None)
    if not isinstance(pages_id, int):
        raise ImageFormatError(f"{path.name}: pagemap head without pages_id")
    return Pagemap(pages_id, head, [PagemapEntry(decode_message(r)) for r in records[1:]])


def write_pagemap(path: Path, pagemap: Pagemap) -> None:
    out = bytearray(struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC))
    for fields in [pagemap.head, *(e.fields for e in pagemap.entries)]:
        body = encode_message(fields)
        out += struct.pack("<I", len(body)) + body
    path.write_bytes(bytes(out))


def present_pages(pagemap: Pagemap) -> int:
    return sum(
        e.nr_pages for e in pagemap.entries if e.flags & PE_PRESENT and not e.flags & PE_PARENT
    )


def lazy_pages_in(images: Path) -> int:
    """Pages a lazy restore of `images` leaves to its daemon (PE_LAZY, not present)."""
    total = 0
    for path in sorted(images.glob("pagemap-*.img")):
        pagemap = read_pagemap(path)
        total += sum(
            e.nr_pages
            for e in pagemap.entries
            if e.flags & PE_LAZY and not e.flags & PE_PRESENT and not e.flags & PE_PARENT
        )
    return total


def make_lazy(src_dir: Path, dst_dir: Path, pagemap_name: str) -> tuple[int, int]:
    """Write a lazy pagemap and a compact pages file for one process into `dst_dir`.

    Entries CRIU marked PE_LAZY lose PE_PRESENT (a lazy restore leaves them to the
    lazy-pages daemon and skips them in the pages file); the pages of the entries
    still present are copied. This is what `criu dump --lazy-pages` itself writes.
    Returns (pages kept, pages left to the daemon).
    """
    pagemap = read_pagemap(src_dir / pagemap_name)
    pages_name = f"pages-{pagemap.pages_id}.img"
    full = src_dir / pages_name
    expected = present_pages(pagemap) * PAGE_SIZE
    if full.stat().st_size != expected:
        raise ImageFormatError(
            f"{pages_name} has {full.stat().st_size} bytes, its pagemap says {expected}"
        )
    kept = lazy = 0
    entries: list[PagemapEntry] = []
    with full.open("rb") as src, (dst_dir / pages_name).open("wb") as dst:
        for e in pagemap.entries:
            flags = e.flags
            if not flags & PE_PRESENT or flags & PE_PARENT:
                entries.append(e)
                continue
            size = e.nr_pages * PAGE_SIZE
            if flags & PE_LAZY:
                src.seek(size, 1)
                entries.append(e.with_flags(flags & ~PE_PRESENT))
                lazy += e.nr_pages
            else:
                _copy(src, dst, size)
                entries.append(e)
                kept += e.nr_pages
    write_pagemap(dst_dir / pagemap_name, Pagemap(pagemap.pages_id, pagemap.head, entries))
    return kept, lazy


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size:
        chunk = src.read(min(size, 1 << 20))
        if not chunk:
            raise ImageFormatError("pages file ends early")
        dst.write(chunk)
        size -= len(chunk)
