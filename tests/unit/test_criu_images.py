"""The page map codec against a page map CRIU 4.2 wrote on the testbed (a 16 MiB memhog)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent.migration import criu_images as ci

FIXTURE = Path(__file__).parent / "fixtures" / "criu" / "memhog-pagemap-1.img"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    src = tmp_path / "full"
    src.mkdir()
    shutil.copy(FIXTURE, src / "pagemap-1.img")
    pagemap = ci.read_pagemap(src / "pagemap-1.img")
    # Page i holds its own number, so every page can be traced through the rewrite.
    with (src / "pages-1.img").open("wb") as f:
        for i in range(ci.present_pages(pagemap)):
            f.write(i.to_bytes(8, "little") * (ci.PAGE_SIZE // 8))
    return src


def test_round_trip_is_byte_identical() -> None:
    pagemap = ci.read_pagemap(FIXTURE)
    assert pagemap.pages_id == 1 and len(pagemap.entries) == 24
    assert {e.flags for e in pagemap.entries} == {ci.PE_PRESENT, ci.PE_PRESENT | ci.PE_LAZY}
    assert ci.present_pages(pagemap) == 4112  # 16 MiB of memhog + 16 other pages


def test_rewrite_equals_the_original_bytes(tmp_path: Path) -> None:
    ci.write_pagemap(tmp_path / "p.img", ci.read_pagemap(FIXTURE))
    assert (tmp_path / "p.img").read_bytes() == FIXTURE.read_bytes()


def test_make_lazy_keeps_only_the_eager_pages_in_order(images: Path, tmp_path: Path) -> None:
    dst = tmp_path / "lazy"
    dst.mkdir()
    kept, lazy = ci.make_lazy(images, dst, "pagemap-1.img")
    assert (kept, lazy) == (8, 4104)
    rewritten = ci.read_pagemap(dst / "pagemap-1.img")
    original = ci.read_pagemap(images / "pagemap-1.img")
    assert [e.vaddr for e in rewritten.entries] == [e.vaddr for e in original.entries]
    assert not any(e.flags & ci.PE_PRESENT and e.flags & ci.PE_LAZY for e in rewritten.entries)
    assert ci.present_pages(rewritten) == kept
    # The compact file holds exactly the eager pages, in the order the full file had them.
    expected, index = [], 0
    for e in original.entries:
        for n in range(e.nr_pages):
            if not e.flags & ci.PE_LAZY:
                expected.append(index + n)
        index += e.nr_pages
    data = (dst / "pages-1.img").read_bytes()
    assert len(data) == kept * ci.PAGE_SIZE
    got = [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), ci.PAGE_SIZE)]
    assert got == expected


def test_a_pages_file_that_disagrees_with_its_map_is_refused(images: Path, tmp_path: Path) -> None:
    with (images / "pages-1.img").open("ab") as f:
        f.write(os.urandom(ci.PAGE_SIZE))
    with pytest.raises(ci.ImageFormatError, match="pagemap says"):
        ci.make_lazy(images, tmp_path, "pagemap-1.img")


def test_not_a_pagemap(tmp_path: Path) -> None:
    (tmp_path / "x.img").write_bytes(b"\0" * 16)
    with pytest.raises(ci.ImageFormatError, match="not a CRIU pagemap"):
        ci.read_pagemap(tmp_path / "x.img")


def test_lazy_pages_in_counts_what_the_daemon_must_bring(images: Path, tmp_path: Path) -> None:
    # A full dump leaves nothing to a daemon; its lazy rewrite leaves the lazy entries.
    assert ci.lazy_pages_in(images) == 0
    dst = tmp_path / "lazy"
    dst.mkdir()
    _, lazy = ci.make_lazy(images, dst, "pagemap-1.img")
    assert ci.lazy_pages_in(dst) == lazy == 4104
