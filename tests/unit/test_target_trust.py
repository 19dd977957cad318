"""The target trusts no peer blindly: specs, images and state streams it refuses leave nothing.

Drives the target's handlers directly, as a hostile peer would through the
API, over the engine tests' fake daemon (real directories for the state).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.migration.resources import state_cap
from agent.peer.api import HandlerError
from tests.helpers import run_async
from tests.unit.test_migration_engine import IMAGE_ID, Host, Upload, saved_image
from tests.unit.test_migration_engine import stage_spec as spec

OTHER_ID = "sha256:" + "2" * 64


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Host]:
    host = Host(tmp_path, "b", "a", ())
    yield host
    host.journal.close()


def chunks(*parts: bytes) -> Upload:
    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    return Upload(gen())


async def prepare(host: Host, mid: str, estimate: int = 1 << 20, image_bytes: int = 0) -> None:
    await host.service.handlers.prepare(
        "a",
        {
            "migration_id": mid,
            "name": "web",
            "container_id": "f" * 64,
            "image_id": IMAGE_ID,
            "image_bytes": image_bytes,
            "memory_bytes": 1 << 20,
            "state_bytes_estimate": estimate,
        },
    )


def refused(coro: Any) -> HandlerError:
    with pytest.raises(HandlerError) as err:
        run_async(coro)
    assert "\n" not in err.value.reason
    return err.value


def nothing_left(host: Host, mid: str) -> None:
    handlers = host.service.handlers
    assert mid not in handlers.incoming and not handlers.reservations.active()
    rec = host.journal.get(mid)
    assert rec.outcome == "aborted", rec
    assert not host.docker.containers
    stages = [p for p in host.docker.root.rglob(".ferry-stage-*")]
    assert stages == []


def test_a_privileged_spec_is_refused_and_the_migration_ends_at_once(target: Host) -> None:
    target.docker.images[IMAGE_ID] = {"Id": IMAGE_ID, "Size": 1, "RepoTags": []}
    run_async(prepare(target, "m1"))
    err = refused(target.service.handlers.stage("a", "m1", {"spec": spec(Privileged=True)}))
    assert err.status == 403 and err.error == "not_accepted"
    assert "HostConfig.Privileged" in err.reason and "migration.accept.privileged" in err.reason
    nothing_left(target, "m1")


def test_a_wrongly_shaped_spec_is_a_400_with_the_field(target: Host) -> None:
    target.docker.images[IMAGE_ID] = {"Id": IMAGE_ID, "Size": 1, "RepoTags": []}
    run_async(prepare(target, "m2"))
    err = refused(target.service.handlers.stage("a", "m2", {"spec": {**spec(), "ports": "x"}}))
    assert err.status == 400 and err.reason.startswith("spec.ports"), err.reason
    nothing_left(target, "m2")


def test_a_spec_for_another_name_than_prepared_is_refused(target: Host) -> None:
    target.docker.images[IMAGE_ID] = {"Id": IMAGE_ID, "Size": 1, "RepoTags": []}
    run_async(prepare(target, "m3"))
    err = refused(target.service.handlers.stage("a", "m3", {"spec": spec(name="other")}))
    assert err.status == 400 and "spec.name" in err.reason


def test_an_image_upload_cannot_move_a_tag_and_abort_removes_only_what_it_made(
    target: Host,
) -> None:
    # app:1 names another image here; the upload claims app:1 and lab:2 for its own.
    target.docker.images[OTHER_ID] = {"Id": OTHER_ID, "Size": 1, "RepoTags": ["app:1"]}
    handlers = target.service.handlers
    archive = saved_image(IMAGE_ID, ["app:1", "lab:2"])
    run_async(prepare(target, "m4", image_bytes=len(archive)))
    meta = {"image_id": IMAGE_ID}
    out = run_async(handlers.receive_image("a", "m4", chunks(archive[:900], archive[900:]), meta))
    assert out["tags_added"] == ["lab:2"]
    assert target.docker.inspect_image("app:1")["Id"] == OTHER_ID, "an existing tag moved"
    assert target.docker.inspect_image("lab:2")["Id"] == IMAGE_ID
    staged = run_async(handlers.stage("a", "m4", {"spec": spec()}))
    assert staged["image"] == IMAGE_ID, "the container must be created from the image ID"
    run_async(handlers.abort("a", "m4", {"reason": "test"}))
    assert set(target.docker.images) == {OTHER_ID}, "the loaded image and its tag stay behind"
    assert target.docker.inspect_image("app:1")["Id"] == OTHER_ID
    nothing_left(target, "m4")


def test_an_image_that_is_not_the_declared_one_is_refused_and_removed(target: Host) -> None:
    handlers = target.service.handlers
    archive = saved_image(OTHER_ID, ["app:1"])
    run_async(prepare(target, "m5", image_bytes=len(archive)))
    err = refused(handlers.receive_image("a", "m5", chunks(archive), {"image_id": IMAGE_ID}))
    assert err.error == "image_mismatch" and OTHER_ID in err.reason
    assert target.docker.images == {}
    nothing_left(target, "m5")


def test_an_image_upload_over_its_declared_size_is_refused(target: Host) -> None:
    handlers = target.service.handlers
    run_async(prepare(target, "m6", image_bytes=1000))
    cap = handlers.incoming["m6"].image_cap
    assert cap == state_cap(1000)
    big = saved_image(IMAGE_ID, []) + b"\0" * cap
    err = refused(handlers.receive_image("a", "m6", chunks(big), {"image_id": IMAGE_ID}))
    assert err.status == 413
    nothing_left(target, "m6")


def zstd_tar(files: dict[str, int]) -> bytes:
    """A zstd tar stream with sections checkpoint/ and upper/, files of zeros of these sizes."""

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readinto(self, b: Any) -> int:
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    out = io.BytesIO()
    with (
        zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as z,
        tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for section in ("checkpoint", "upper"):
            d = tarfile.TarInfo(section)
            d.type = tarfile.DIRTYPE
            d.mode = 0o755
            tar.addfile(d)
        for name, size in files.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, Zeros(size))
    return out.getvalue()


def pax_bomb(comment_bytes: int) -> bytes:
    """Sections, then one PAX header record of about `comment_bytes`, built by hand
    (tarfile's stream writer takes quadratic time on a header this size)."""
    z = zstandard.ZstdCompressor(level=3).compressobj()
    out = [z.compress(zstd_tar_raw_sections())]
    record_len = len(" comment=\n") + comment_bytes
    record_len += len(str(record_len + len(str(record_len))))
    head = tarfile.TarInfo("PaxHeader/f")
    head.type = tarfile.XHDTYPE
    head.size = record_len
    out.append(z.compress(head.tobuf(tarfile.USTAR_FORMAT)))
    out.append(z.compress(f"{record_len} comment=".encode()))
    block = b"x" * (1 << 20)
    for _ in range(comment_bytes // len(block)):
        out.append(z.compress(block))
    out.append(z.compress(b"x" * (comment_bytes % len(block)) + b"\n"))
    out.append(z.flush())
    return b"".join(out)


def zstd_tar_raw_sections() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for section in ("checkpoint", "upper"):
            d = tarfile.TarInfo(section)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
    return buf.getvalue()[: 2 * tarfile.BLOCKSIZE]  # without the end-of-archive blocks


def staged_for_state(target: Host, mid: str, estimate: int) -> None:
    target.docker.images[IMAGE_ID] = {"Id": IMAGE_ID, "Size": 1, "RepoTags": []}
    run_async(prepare(target, mid, estimate=estimate))
    run_async(target.service.handlers.stage("a", mid, {"spec": spec()}))


def test_a_zstd_bomb_is_refused_past_the_declared_size_leaving_nothing(target: Host) -> None:
    staged_for_state(target, "m7", estimate=1 << 20)
    cap = state_cap(1 << 20)
    bomb = zstd_tar({"checkpoint/pages-1.img": 4 * cap})
    assert len(bomb) < 1 << 20  # tiny on the wire
    err = refused(target.service.handlers.receive_state("a", "m7", chunks(bomb), None))
    assert err.status == 413 and err.error == "too_large" and str(cap) in err.reason
    nothing_left(target, "m7")


def test_a_huge_metadata_header_is_refused_before_it_is_read(target: Host) -> None:
    # An empty file with a PAX header of more than the cap: tarfile would hold the whole
    # header in memory; it is refused from its declared size instead.
    staged_for_state(target, "m8", estimate=0)
    bomb = pax_bomb(state_cap(0) + (1 << 20))
    err = refused(target.service.handlers.receive_state("a", "m8", chunks(bomb), None))
    assert err.status == 413 and "metadata header" in err.reason, err.reason
    nothing_left(target, "m8")


def test_an_unsafe_state_archive_is_refused_during_the_upload(target: Host) -> None:
    staged_for_state(target, "m9", estimate=1 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("checkpoint")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        fifo = tarfile.TarInfo("checkpoint/fifo")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    archive = zstandard.ZstdCompressor().compress(buf.getvalue())
    err = refused(target.service.handlers.receive_state("a", "m9", chunks(archive), None))
    assert err.status == 422 and err.error == "unsafe_archive" and "fifo" in err.reason
    nothing_left(target, "m9")


def test_a_state_within_its_declared_size_still_arrives(target: Host) -> None:
    staged_for_state(target, "m10", estimate=2 << 20)
    archive = zstd_tar({"checkpoint/pages-1.img": 2 << 20, "upper/x": 4096})
    out = run_async(target.service.handlers.receive_state("a", "m10", chunks(archive), None))
    assert out["bytes"] == len(archive)
    assert target.service.handlers.incoming["m10"].staging_dirs
    assert os.path.isdir(target.service.handlers.incoming["m10"].staging_dirs[0])
    run_async(target.service.handlers.abort("a", "m10", {}))
    nothing_left(target, "m10")


def test_prepare_reserves_the_capped_state_on_dockers_data_root(target: Host) -> None:
    handlers = target.service.handlers
    target.docker.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.docker.root).free
    err = refused(prepare(target, "m11", estimate=free))
    assert err.error == "no_capacity" and "disk" in err.reason, err.reason
    assert str(target.docker.root) in err.reason, "the data root's disk, not state_dir's"
    assert not handlers.reservations.active()
    run_async(prepare(target, "m12", estimate=8 << 20))
    (held,) = handlers.reservations.active()
    assert held.disk_bytes >= state_cap(8 << 20)
