"""Hostile inputs against a real `ferry run` target: a peer certificate must not be root there.

A probe in host1's network namespace speaks the peer API to host2's agent with
host1's real peer certificate (tests/chaos/hostile_probe.py) and asks for what
no target should do: privileged and host-namespace containers, `/` bound,
`/dev/mem`, a retagging image, a zstd bomb, crafted archives, wrongly shaped
JSON, slow and half-open connections. Each test ends checking that nothing is
left on the target: no extra container, no staging dir, no unfinished journal
row, no tag moved or added, no image loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.migration.resources import state_cap
from agent.migration.spec import spec_from_inspect
from tests.chaos.invariants import Workload, check_all, journal_rows, leftover_problems
from tests.chaos.support import Cluster
from tests.e2e.migration_support import COUNTER, ONLY_ON_FIRST, ferry_migrate, result_of
from tests.testbed.agents import CERT_DIR
from tests.testbed.faults import netns_run
from tests.testbed.layout import AGENT_PORT
from tests.unit.test_archive import HOSTILE

pytestmark = [pytest.mark.chaos, pytest.mark.testbed, pytest.mark.e2e]

VICTIM = "hostile-victim"
MIB = 1 << 20


# ---------------------------------------------------------------- talking as a hostile peer


def probe(cluster: Cluster, tmp: Path, mode: str, **request: Any) -> dict[str, Any]:
    h1, h2 = cluster.hosts
    req = {
        "mode": mode,
        "address": f"{h2.ip}:{AGENT_PORT}",
        "target_name": h2.name,
        "ca": str(CERT_DIR / "ca.crt"),
        "cert": str(CERT_DIR / f"{h1.name}.crt"),
        "key": str(CERT_DIR / f"{h1.name}.key"),
        "migration_id": f"hostile-{secrets.token_hex(4)}",
        **request,
    }
    path = tmp / f"probe-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(req))
    argv = [sys.executable, "-m", "tests.chaos.hostile_probe", str(path)]
    proc = netns_run(h1, argv, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(scope="module")
def source_spec(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """A real spec, made by Ferry's own code from a counter running on host1."""
    h1 = cluster.hosts[0]
    c1 = cluster.clients[h1.name]
    src = c1.containers.run(COUNTER, name="hostile-src", detach=True)
    try:
        spec = spec_from_inspect(c1.api.inspect_container(src.id)).to_dict()
    finally:
        src.remove(force=True)
    spec["name"] = VICTIM
    yield spec


# ---------------------------------------------------------------- what the target holds


@dataclass
class Target:
    containers: set[str]
    tags: dict[str, str]
    images: set[str]
    since: float


def target_state(cluster: Cluster) -> Target:
    client = cluster.clients[cluster.hosts[1].name]
    images = client.images.list(all=True)
    tags = {t: i.id for i in images for t in i.tags}
    containers = {c.id for c in client.containers.list(all=True)}
    return Target(containers, tags, {i.id for i in images}, time.time())


def assert_nothing_left(cluster: Cluster, before: Target, *, made_rows: bool = True) -> None:
    """Nothing of the probe's migrations is left on the target; with `made_rows`, it made
    at least one (else the test did not test what it says)."""
    after = target_state(cluster)
    assert after.containers == before.containers, "the target kept a container"
    assert after.tags == before.tags, "a tag moved, appeared or went"
    assert after.images == before.images, "an image was left (or removed)"
    h2 = cluster.hosts[1]
    rows = [r for r in journal_rows(h2) if r.started >= before.since]
    assert rows or not made_rows, "the probe made no migration at all"
    unfinished = [r for r in rows if r.outcome is None]
    assert not unfinished, f"unfinished journal rows: {unfinished}"
    left = leftover_problems([h2], cluster.clients, rows, before.since, keep=set())
    assert not left, left
    stages = [p for p in Path(h2.data_root).rglob(".ferry-stage-*")]
    assert not stages, stages


# ---------------------------------------------------------------- specs


def _bind_root(spec: dict[str, Any]) -> None:
    spec["body"]["HostConfig"]["Mounts"] = [{"Type": "bind", "Source": "/", "Target": "/host"}]
    spec["binds"] = [{"source": "/", "destination": "/host", "read_only": False}]


def _dev_mem(spec: dict[str, Any]) -> None:
    spec["body"]["HostConfig"]["Devices"] = [
        {"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem", "CgroupPermissions": "rwm"}
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["body"]["HostConfig"].update(Privileged=True), "HostConfig.Privileged"),
        (lambda s: s["body"]["HostConfig"].update(PidMode="host"), "HostConfig.PidMode"),
        (lambda s: s["body"]["HostConfig"].update(NetworkMode="host"), "HostConfig.NetworkMode"),
        (_bind_root, "HostConfig.Mounts '/host': bind of host path '/'"),
        (_dev_mem, "HostConfig.Devices: host device '/dev/mem'"),
    ],
    ids=["privileged", "host-pid", "host-network", "bind-root", "dev-mem"],
)
def test_a_spec_asking_for_the_host_is_refused_before_anything_is_made(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path, change: Any, field: str
) -> None:
    spec = json.loads(json.dumps(source_spec))
    change(spec)
    before = target_state(cluster)
    out = probe(cluster, tmp_path, "stage", spec=spec)
    assert "ok" in out["prepare"], out
    refused = out["stage"]
    assert refused.get("status") == 403 and refused["error"] == "not_accepted", out
    assert field in refused["reason"] and "migration.accept." in refused["reason"], refused
    assert out["status"]["ok"]["outcome"] == "aborted", out
    assert_nothing_left(cluster, before)


def test_ferry_migrate_shows_the_targets_refusal_before_anything_is_frozen(
    cluster: Cluster,
) -> None:
    h1, h2 = cluster.hosts
    c1 = cluster.clients[h1.name]
    src = c1.containers.run(
        COUNTER, name="hostile-priv", detach=True, privileged=True, labels={"ferry.migrate": "true"}
    )
    try:
        started = c1.api.inspect_container(src.id)["State"]["StartedAt"]
        before = target_state(cluster)
        rc, lines, err = ferry_migrate(h1, "hostile-priv", h2.name, timeout=120)
        assert rc == 1, err
        result = result_of(lines)
        assert result["kind"] == "refused", result
        reason = result["reason"]
        # In the eligibility dry run (/v1/check) or at stage: the target's words either way.
        assert f"{h2.name} does not accept" in reason, reason
        assert "HostConfig.Privileged" in reason and "migration.accept.privileged" in reason
        assert "\n" not in reason
        # Refused at stage, before the freeze: the same process runs on, never checkpointed.
        state = c1.api.inspect_container(src.id)["State"]
        assert state["Running"] and state["StartedAt"] == started, state
        assert not c1.api.get(c1.api._url(f"/containers/{src.id}/checkpoints")).json()
        # A dry run (/v1/check) may have refused it before any migration began there.
        assert_nothing_left(cluster, before, made_rows=False)
    finally:
        src.remove(force=True)


# ---------------------------------------------------------------- images


def retagged_save(cluster: Cluster, tmp: Path, tags: list[str]) -> tuple[Path, str]:
    """host1's only-on-first image as `docker save` makes it, but claiming `tags`."""
    image = cluster.clients[cluster.hosts[0].name].images.get(ONLY_ON_FIRST)
    raw = b"".join(image.save(named=True))
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(raw)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for m in src:
            f = src.extractfile(m) if m.isreg() else None
            if m.name == "manifest.json" and f is not None:
                manifest = json.load(f)
                manifest[0]["RepoTags"] = tags
                data = json.dumps(manifest).encode()
                m.size = len(data)
                f = io.BytesIO(data)
            if m.name == "repositories" and f is not None:
                repos = {t.rpartition(":")[0]: {t.rpartition(":")[2]: "x"} for t in tags}
                data = json.dumps(repos).encode()
                m.size = len(data)
                f = io.BytesIO(data)
            dst.addfile(m, f)
    path = tmp / "retag.tar"
    path.write_bytes(out.getvalue())
    return path, str(image.id)


@pytest.fixture
def only_on_first_stays_there(cluster: Cluster) -> Iterator[None]:
    """Whatever a failing test did to host2's images is undone, so others are not misled."""
    client = cluster.clients[cluster.hosts[1].name]
    counter = client.images.get(COUNTER).id
    yield
    only_on_first = cluster.clients[cluster.hosts[0].name].images.get(ONLY_ON_FIRST).id
    for img in client.images.list(all=True):
        if img.id == only_on_first or "ferry-hostile/new:1" in img.tags:
            client.images.remove(img.id, force=True)  # keep "only on first" true for others
    if client.images.get(counter).tags != [COUNTER]:
        client.images.get(counter).tag(COUNTER)


@pytest.mark.usefixtures("only_on_first_stays_there")
def test_an_image_upload_cannot_repoint_a_tag_and_abort_removes_what_it_loaded(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path
) -> None:
    before = target_state(cluster)
    counter_id = before.tags[COUNTER]
    archive, image_id = retagged_save(cluster, tmp_path, [COUNTER, "ferry-hostile/new:1"])
    assert image_id not in before.images and counter_id != image_id
    spec = {**source_spec, "image_id": image_id, "image_ref": COUNTER}
    out = probe(
        cluster, tmp_path, "image", spec=spec, archive=str(archive), image_id=image_id, stage=True
    )
    loaded = out["image"].get("ok")
    assert loaded and loaded["tags_added"] == ["ferry-hostile/new:1"], out
    # Created from the image ID, not from a tag that names another image here.
    assert out["stage"]["ok"]["image"] == image_id, out
    assert out["abort"]["ok"]["aborted"], out
    after = target_state(cluster)
    assert after.tags[COUNTER] == counter_id, "ferry-test/counter:1 was repointed"
    assert_nothing_left(cluster, before)


@pytest.mark.usefixtures("only_on_first_stays_there")
def test_an_image_that_is_not_the_declared_one_is_refused_and_removed(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path
) -> None:
    before = target_state(cluster)
    archive, real_id = retagged_save(cluster, tmp_path, [COUNTER])
    claimed = "sha256:" + "0" * 64
    spec = {**source_spec, "image_id": claimed}
    out = probe(cluster, tmp_path, "image", spec=spec, archive=str(archive), image_id=claimed)
    refused = out["image"]
    assert refused.get("status") == 422 and refused["error"] == "image_mismatch", out
    assert real_id in refused["reason"], refused
    assert_nothing_left(cluster, before)


# ---------------------------------------------------------------- state archives


def crafted_archives() -> dict[str, tuple[bytes, str]]:
    """Every hostile archive tests/unit/test_archive.py refuses, with the refusal's words."""
    out = {}
    for case, (entries, message) in HOSTILE.items():
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info, data in entries:
                tar.addfile(info, io.BytesIO(data) if data else None)
        slug = "".join(c if c.isalnum() else "-" for c in case)
        out[slug] = (zstandard.ZstdCompressor().compress(raw.getvalue()), message)
    return out


def zstd_bomb(raw_bytes: int) -> bytes:
    """One CRIU-looking file of `raw_bytes` zeros: a few tens of KB on the wire."""
    z = zstandard.ZstdCompressor(level=19).compressobj()
    sections = io.BytesIO()
    with tarfile.open(fileobj=sections, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for section in ("checkpoint", "upper"):
            d = tarfile.TarInfo(section)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
    # Built by hand: the two section dirs, then one header and the zeros, streamed.
    parts = [z.compress(sections.getvalue()[: 2 * tarfile.BLOCKSIZE])]
    info = tarfile.TarInfo("checkpoint/pages-1.img")
    info.size = raw_bytes
    parts.append(z.compress(info.tobuf(tarfile.PAX_FORMAT)))
    block = bytes(4 * MIB)
    for _ in range(raw_bytes // len(block)):
        parts.append(z.compress(block))
    parts.append(z.compress(tarfile.NUL * (2 * tarfile.BLOCKSIZE)))
    parts.append(z.flush())
    return b"".join(parts)


def test_a_zstd_bomb_is_refused_at_the_declared_size_leaving_nothing(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.zst"
    bomb.write_bytes(zstd_bomb(2 * 1024 * MIB))
    assert bomb.stat().st_size < 256 * 1024, "not a bomb: too big on the wire"
    before = target_state(cluster)
    # The data root's own bytes: the disk's free space also moves with everything
    # else this machine writes meanwhile.
    used_before = _tree_bytes(Path(cluster.hosts[1].data_root))
    out = probe(cluster, tmp_path, "states", spec=source_spec, archives=[str(bomb)])
    one = out["bomb.zst"]
    refused = one["state"]
    assert refused.get("status") == 413 and refused["error"] == "too_large", one
    # The probe declared 1 MiB: refused once it decoded past that plus the slack.
    assert str(state_cap(MIB)) in refused["reason"], refused
    assert one["status"]["ok"]["outcome"] == "aborted", one
    assert one["state_s"] < 30, one
    assert_nothing_left(cluster, before)
    lost = _tree_bytes(Path(cluster.hosts[1].data_root)) - used_before
    assert lost < 64 * MIB, f"{lost} bytes of disk gone after a refused bomb"


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_every_crafted_archive_is_refused_over_the_wire_writing_nothing(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path
) -> None:
    archives = crafted_archives()
    for slug, (data, _) in archives.items():
        (tmp_path / slug).write_bytes(data)
    before = target_state(cluster)
    paths = [str(tmp_path / slug) for slug in archives]
    out = probe(cluster, tmp_path, "states", spec=source_spec, archives=paths)
    for slug, (_, message) in archives.items():
        one = out[slug]
        assert "ok" in one["stage"], (slug, one)
        refused = one["state"]
        assert refused.get("status") == 422 and refused["error"] == "unsafe_archive", (slug, one)
        assert message in refused["reason"] and "\n" not in refused["reason"], (slug, refused)
        assert one["status"]["ok"]["outcome"] == "aborted", (slug, one)
    assert_nothing_left(cluster, before)
    h2 = cluster.hosts[1]
    # The archives aim at outside/pwn and outside/keep next to their destination.
    for root in (Path(h2.data_root), Path(h2.state_dir), Path(h2.host_dir)):
        for dirpath, _, files in os.walk(root):
            for name in ("pwn", "keep"):
                path = Path(dirpath) / name
                if name in files and path.stat().st_mtime >= before.since:
                    raise AssertionError(f"{path} was written by a refused archive")


# ---------------------------------------------------------------- HTTP


def test_wrongly_shaped_json_gets_400_with_one_line(
    cluster: Cluster, source_spec: dict[str, Any], tmp_path: Path
) -> None:
    good = {"migration_id": "hostile-shape", "name": VICTIM}
    posts = [
        ("/v1/migrations", {**good, "memory_bytes": "lots"}),
        ("/v1/migrations", {**good, "ports": "x"}),
        ("/v1/migrations", {**good, "state_bytes_estimate": [1]}),
        ("/v1/migrations", {"name": VICTIM}),
        ("/v1/migrations/hostile-shape/stage", {"spec": 5}),
        ("/v1/migrations/hostile-shape/restore", {"digest": {"a": 1}}),
        ("/v1/migrations/hostile-shape/abort", {"reason": 7}),
    ]
    before = target_state(cluster)
    out = probe(cluster, tmp_path, "shapes", posts=posts)
    for (_, body), answer in zip(posts, out["answers"], strict=True):
        assert answer.get("status") == 400 and answer["error"] == "bad_request", (body, answer)
        reason = answer["reason"]
        assert reason.startswith("body.") and "\n" not in reason, (body, reason)
        assert "Error" not in reason and "Traceback" not in reason, reason
    after = target_state(cluster)
    assert after.containers == before.containers and after.tags == before.tags
    h2 = cluster.hosts[1]
    assert not [r for r in journal_rows(h2) if r.id == "hostile-shape"], "a bad body began one"


def test_slow_and_half_open_clients_are_dropped_and_a_real_migration_still_works(
    cluster: Cluster, memhog: Workload, tmp_path: Path
) -> None:
    out = probe(cluster, tmp_path, "slow", raw=100, half=20, wait_s=20)
    assert out["half_ok"] == 20 and out["opened"] == 120, out
    assert out["closed"] == out["opened"], f"connections held past 20 s: {out}"
    # Over the cap (64): dropped at once; the rest (the 20 half headers among them)
    # within the 5 s header timeout.
    assert out["closed_within_1s"] >= out["opened"] - 64, out
    assert out["last_closed_s"] < 5 + 3, out
    check_all(cluster.hosts, cluster.clients, memhog)
