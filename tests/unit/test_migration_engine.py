"""The migration engine end to end in one process: two fake daemons, peers wired directly.

The fakes keep real directories for checkpoints and writable layers, so the
archive really streams, verifies and unpacks; what they fake is Docker itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import FerryConfig
from agent.docker_adapter import CheckpointError, DockerError, DockerNotFound, DockerUnavailable
from agent.journal import Journal
from agent.migration import MigrationFailed, MigrationRefused, MigrationService
from agent.migration.held import ProcState
from agent.migration.report import ProgressEvent
from agent.migration.target import T_POSTCOPY, T_RESTORE, T_RESTORED
from agent.peer.api import HandlerError
from agent.peer.client import PeerRefused, PeerUnavailable
from tests.helpers import FakeClock, run_async, until

DAEMON_ROOT = "/var/lib/docker"
IMAGE_ID = "sha256:" + "1" * 64
_ids = itertools.count(1)


def saved_image(image_id: str, tags: list[str]) -> bytes:
    """A `docker save` archive of one image (config blob named by its digest)."""
    digest = image_id.removeprefix("sha256:")
    manifest = [{"Config": f"blobs/sha256/{digest}", "RepoTags": tags, "Layers": []}]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (f"blobs/sha256/{digest}", b"{}"),
            ("manifest.json", json.dumps(manifest).encode()),
            ("repositories", json.dumps({t.split(":")[0]: {} for t in tags}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeDocker:
    """Just enough of DockerAdapter, with real directories under `root`."""

    def __init__(self, root: Path, images: tuple[str, ...] = (IMAGE_ID,)) -> None:
        self.root = root
        self.containers: dict[str, dict[str, Any]] = {}
        self.images = {i: {"Id": i, "Size": 1000, "RepoTags": ["app:1"]} for i in images}
        self.calls: list[tuple[str, ...]] = []
        self.fail_restore: str | None = None
        self.dumped: dict[str, set[str]] = {}

    # helpers
    def add_running(self, name: str, policy: str = "always") -> str:
        cid = f"{next(_ids):064x}"
        upper = self.root / "overlay2" / cid / "diff"
        (upper / "data").mkdir(parents=True)
        (upper / "data" / "ticks.log").write_text("1\n2\n3\n")
        self.containers[cid] = {
            "Id": cid,
            "Name": f"/{name}",
            "Image": IMAGE_ID,
            "State": {"Status": "running", "Running": True},
            "Config": {"Image": "app:1", "Cmd": ["/app"], "Env": ["X=1"]},
            "HostConfig": {
                "RestartPolicy": {"Name": policy, "MaximumRetryCount": 0},
                "NetworkMode": "bridge",
                "PortBindings": {"8080/tcp": [{"HostIp": "", "HostPort": "18080"}]},
            },
            "Mounts": [],
            "NetworkSettings": {"Networks": {"bridge": {}}},
            "GraphDriver": {
                "Name": "overlay2",
                "Data": {"UpperDir": f"{DAEMON_ROOT}/overlay2/{cid}/diff"},
            },
        }
        return cid

    def _get(self, ref: str) -> dict[str, Any]:
        for c in self.containers.values():
            if ref in (c["Id"], c["Name"].lstrip("/")):
                return c
        raise DockerNotFound("inspect", f"No such container: {ref}", 404)

    def local_upper(self, cid: str) -> Path:
        return self.root / "overlay2" / cid / "diff"

    # DockerAdapter surface
    def data_root(self) -> str:
        return DAEMON_ROOT

    def close(self) -> None:
        pass

    def inspect_container(self, ref: str) -> dict[str, Any]:
        return self._get(ref)

    def find_container(self, ref: str) -> dict[str, Any] | None:
        try:
            return self._get(ref)
        except DockerNotFound:
            return None

    def list_containers(self) -> list[dict[str, Any]]:
        out = []
        for c in self.containers.values():
            ports = [
                {"PublicPort": int(b["HostPort"]), "IP": "0.0.0.0"}
                for bs in (c["HostConfig"].get("PortBindings") or {}).values()
                for b in bs
            ]
            out.append(
                {
                    "Id": c["Id"],
                    "State": c["State"]["Status"],
                    "Ports": ports,
                    "Labels": dict(c["Config"].get("Labels") or {}),
                }
            )
        return out

    def memory_usage(self, ref: str) -> int:
        return 1 << 20

    def inspect_image(self, ref: str) -> dict[str, Any]:
        for i in self.images.values():
            if ref == i["Id"] or ref in i["RepoTags"]:
                return i
        raise DockerNotFound("inspect image", f"No such image: {ref}", 404)

    def has_image(self, ref: str) -> bool:
        try:
            self.inspect_image(ref)
        except DockerNotFound:
            return False
        return True

    def image_save(self, names: list[str]) -> Any:
        class Stream:
            closed = False

            def __init__(self, data: bytes) -> None:
                self._it = iter([data[:700], data[700:]])

            def __iter__(self) -> Any:
                return self

            def __next__(self) -> bytes:
                return next(self._it)

            def close(self) -> None:
                self.closed = True

        return Stream(saved_image(IMAGE_ID, ["app:1"]))

    def image_load(self, stream: Any) -> list[str]:
        # Like `docker load`: names the image after the manifest's RepoTags.
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream)), mode="r:") as tar:
            f = tar.extractfile("manifest.json")
            assert f is not None
            (entry,) = json.load(f)
        image_id = "sha256:" + entry["Config"].rsplit("/", 1)[-1]
        for tag in entry["RepoTags"] or []:
            for other in self.images.values():
                other["RepoTags"] = [t for t in other["RepoTags"] if t != tag]
        self.images[image_id] = {"Id": image_id, "Size": 1000, "RepoTags": entry["RepoTags"]}
        return [f"Loaded image ID: {image_id}"]

    def image_ids(self) -> set[str]:
        return set(self.images)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        self.images[image]["RepoTags"].append(f"{repository}:{tag}")

    def remove_image(self, ref: str) -> None:
        image = self.inspect_image(ref)
        if ref in image["RepoTags"] and len(image["RepoTags"]) > 1:
            image["RepoTags"].remove(ref)
        else:
            del self.images[image["Id"]]

    def network_names(self) -> set[str]:
        return {"bridge", "host", "none"}

    def inspect_volume(self, name: str) -> dict[str, Any]:
        raise DockerNotFound("inspect volume", name, 404)

    def create_container(self, body: dict[str, Any], name: str | None = None) -> str:
        self.calls.append(("create", str(name)))
        if self.find_container(str(name)) is not None:
            raise DockerError("create", f"Conflict. The container name /{name} is already in use")
        cid = f"{next(_ids):064x}"
        self.local_upper(cid).mkdir(parents=True)
        self.containers[cid] = {
            "Id": cid,
            "Name": f"/{name}",
            "Image": IMAGE_ID,
            "State": {"Status": "created", "Running": False},
            "Config": {k: v for k, v in body.items() if k != "HostConfig"},
            "HostConfig": dict(body["HostConfig"]),
            "Mounts": [],
            "NetworkSettings": {"Networks": {"bridge": {}}},
            "GraphDriver": {
                "Name": "overlay2",
                "Data": {"UpperDir": f"{DAEMON_ROOT}/overlay2/{cid}/diff"},
            },
        }
        return cid

    def checkpoint_create(self, ref: str, name: str, exit: bool = True) -> None:
        c = self._get(ref)
        self.calls.append(("checkpoint", c["Id"], name))
        d = self.root / "containers" / c["Id"] / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "pages-1.img").write_bytes(os.urandom(4096))
        (d / "inventory.img").write_bytes(b"inv")
        self.dumped.setdefault(c["Id"], set()).add(name)
        c["State"] = {"Status": "exited", "Running": False, "ExitCode": 137}

    def checkpoint_delete(self, ref: str, name: str) -> None:
        self.calls.append(("checkpoint_delete", name))

    def start(self, ref: str, checkpoint: str | None = None) -> None:
        c = self._get(ref)
        self.calls.append(("start", c["Id"], str(checkpoint)))
        if checkpoint is not None:
            if self.fail_restore:
                raise CheckpointError("restore", self.fail_restore)
            if checkpoint in self.dumped.get(c["Id"], set()):
                raise CheckpointError("restore", "failed to upload checkpoint: already exists")
            d = self.root / "containers" / c["Id"] / "checkpoints" / checkpoint
            if not (d / "inventory.img").exists():
                raise CheckpointError("restore", f"no images in {d}")
            c["restored_from"] = checkpoint
            # CRIU's leave-stopped, asked for through the annotation Ferry sets.
            annotations = c["HostConfig"].get("Annotations") or {}
            c["held"] = "org.criu.config" in annotations
        c["State"] = {"Status": "running", "Running": True}

    def networks_labelled(self, label: str) -> list[dict[str, Any]]:
        return []

    def wait_running(self, ref: str, timeout: float, healthy: bool = False) -> dict[str, Any]:
        c = self._get(ref)
        if not c["State"]["Running"]:
            raise DockerError("wait", "not running")
        return c

    def pause(self, ref: str) -> None:
        c = self._get(ref)
        c["State"] = dict(c["State"], Paused=True, Status="paused")
        self.calls.append(("pause", c["Id"]))

    def unpause(self, ref: str) -> None:
        c = self._get(ref)
        c["State"] = dict(c["State"], Paused=False, Status="running")
        self.calls.append(("unpause", c["Id"]))

    def kill(self, ref: str) -> None:
        c = self._get(ref)
        c["State"] = {"Status": "exited", "Running": False, "Paused": False, "ExitCode": 137}
        self.calls.append(("kill", c["Id"]))

    def daemon_pid(self) -> int | None:
        return None

    def update_restart_policy(self, ref: str, policy: dict[str, Any]) -> None:
        self._get(ref)["HostConfig"]["RestartPolicy"] = dict(policy)
        self.calls.append(("policy", str(policy.get("Name"))))

    def remove(self, ref: str, force: bool = False) -> None:
        c = self._get(ref)
        del self.containers[c["Id"]]
        self.calls.append(("remove", c["Id"]))

    def rename(self, ref: str, new: str) -> None:
        self._get(ref)["Name"] = f"/{new}"


class FakeProcesses:
    """The host process table as the fake daemon's containers imply it."""

    def __init__(self, docker: FakeDocker) -> None:
        self.docker = docker

    def processes(self, container_id: str) -> list[ProcState]:
        c = self.docker.containers.get(container_id)
        if c is None or not c["State"]["Running"]:
            return []
        return [ProcState(int(container_id, 16), "T" if c.get("held") else "S")]

    def cont(self, procs: Any) -> int:
        count = 0
        for p in procs:
            c = self.docker.containers.get(f"{p.pid:064x}")
            if c is not None:
                c["held"] = False
                count += 1
        return count

    def dump_in_progress(self, container_id: str) -> bool:
        return False


class Upload:
    """What the peer server hands a handler: async chunks with a byte count."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = chunks
        self.bytes_read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            self.bytes_read += len(chunk)
            yield chunk


class DirectPeer:
    """A PeerClient stand-in that calls the target's handlers in-process."""

    def __init__(self, name: str, handlers: Any, caller: str) -> None:
        self.name = name
        self.handlers = handlers
        self.caller = caller
        self.break_upload = False
        self.down = False

    async def _call(self, coro: Any) -> dict[str, Any]:
        if self.down:
            coro.close()
            raise PeerUnavailable(self.name, "connection refused")
        try:
            result: dict[str, Any] = await coro
            return result
        except HandlerError as exc:
            raise PeerRefused(self.name, exc.status, exc.error, exc.reason) from None

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        parts = path.strip("/").split("/")  # v1 migrations [id [action]], or v1 check
        if parts[1] == "check":
            return await self._call(self.handlers.check(self.caller, body))
        if len(parts) == 2:
            return await self._call(self.handlers.prepare(self.caller, body))
        method = getattr(self.handlers, parts[3])
        return await self._call(method(self.caller, parts[2], body))

    async def get_json(self, path: str, *, timeout: float | None = None) -> dict[str, Any]:
        return await self._call(self.handlers.status(self.caller, path.strip("/").split("/")[2]))

    async def upload_state(self, mid: str, chunks: Any, digest: str | None = None) -> Any:
        if self.break_upload:
            async for _ in chunks:
                raise PeerUnavailable(self.name, "connection reset during upload")
        call = self.handlers.receive_state(self.caller, mid, Upload(chunks), digest)
        return await self._call(call)

    async def upload_image(self, mid: str, chunks: Any, meta: dict[str, Any]) -> Any:
        return await self._call(self.handlers.receive_image(self.caller, mid, Upload(chunks), meta))


def stage_spec(name: str = "web", **host_config: Any) -> dict[str, Any]:
    """A source's spec of container "f"*64 as `stage` receives it."""
    return {
        "id": "f" * 64,
        "name": name,
        "image_ref": "app:1",
        "image_id": IMAGE_ID,
        "body": {"Cmd": ["/app"], "HostConfig": {"NetworkMode": "bridge", **host_config}},
        "restart_policy": {"Name": "no"},
        "networks": ["bridge"],
    }


async def stage_web(handlers: Any, mid: str) -> None:
    """Prepare and stage stage_spec's container "web" on `handlers`, as source "a" does."""
    body = {"migration_id": mid, "container_id": "f" * 64, "name": "web", "image_id": IMAGE_ID}
    await handlers.prepare("a", body)
    await handlers.stage("a", mid, {"spec": stage_spec()})


class Host:
    def __init__(
        self,
        tmp: Path,
        name: str,
        other: str,
        images: tuple[str, ...],
        migration: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.docker = FakeDocker(tmp / name / "docker", images)
        self.config = FerryConfig.model_validate(
            {
                "name": name,
                "state_dir": str(tmp / name / "state"),
                "docker": {"data_root": str(tmp / name / "docker")},
                "peers": [{"name": other, "address": "127.0.0.1:9"}],
                # The fake's checkpoint API; runc's path has its own tests (test_checkpointers).
                "migration": {"checkpoint_via": "engine", **(migration or {})},
            }
        )
        self.journal = Journal(self.config.state_dir)
        self.peers: dict[str, DirectPeer] = {}
        self.service = MigrationService(
            self.docker,  # type: ignore[arg-type]
            self.config,
            self.journal,
            self.peers,
            processes=FakeProcesses(self.docker),
        )
        # No real sockets: every port binds on a fake host.
        self.service.handlers.bind_port = lambda ip, port, proto: 0


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")
    yield a, b
    a.journal.close()
    b.journal.close()


def test_successful_migration_moves_state_and_writable_layer(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cid = a.docker.add_running("web")
    events: list[ProgressEvent] = []
    report = run_async(a.service.migrate("web", "b", progress=events.append))

    assert report.outcome == "succeeded" and report.downtime_s is not None
    assert report.bytes_state > 0 and report.bytes_image == 0
    assert {e.phase for e in events} >= {"prepare", "freeze", "transfer", "restore", "done"}
    moved = b.docker._get("web")
    assert moved["State"]["Running"] and moved["restored_from"] == f"ferry-{report.migration_id}"
    assert moved["HostConfig"]["RestartPolicy"]["Name"] == "always"
    log = b.docker.local_upper(moved["Id"]) / "data" / "ticks.log"
    assert log.read_text() == "1\n2\n3\n"
    assert cid not in a.docker.containers, "source copy not removed"
    # Restart policy to "no" before the checkpoint, never the other way round.
    names = [c[0] for c in a.docker.calls]
    assert names.index("policy") < names.index("checkpoint")
    assert a.journal.get(report.migration_id).outcome == "succeeded"
    assert b.journal.get(report.migration_id).outcome == "succeeded"
    assert a.journal.get(report.migration_id).report["downtime_s"] == report.downtime_s


@pytest.mark.parametrize(
    ("lazy_min_bytes", "path"), [("8MiB", "plain"), ("4KiB", "lazy"), (0, "lazy")]
)
def test_lazy_restore_is_tried_only_for_checkpoints_with_enough_memory(
    tmp_path: Path, lazy_min_bytes: Any, path: str
) -> None:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", (IMAGE_ID,), {"lazy_min_bytes": lazy_min_bytes})
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")
    a.docker.add_running("web")  # the fake dumps one 4 KiB pages file
    with capture_logs() as logs:
        report = run_async(a.service.migrate("web", "b"))
    a.journal.close()
    b.journal.close()

    assert report.outcome == "succeeded"
    assert report.details["target_timings"]["page_bytes"] == 4096
    events = {e["event"]: e for e in logs}
    if path == "plain":
        assert "8388608" in events["migration.target.restore_plain"]["reason"]
        assert "migration.target.lazy_unavailable" not in events
    else:
        # Tried: the fake's images have no page maps, so it falls back and says why.
        assert "page maps" in events["migration.target.lazy_unavailable"]["reason"]
        assert "migration.target.restore_plain" not in events


def test_refusal_before_the_freeze_leaves_the_source_untouched(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cid = a.docker.add_running("web")
    b.docker.add_running("web")  # name clash on the target
    with pytest.raises(MigrationRefused, match="named web already exists on b"):
        run_async(a.service.migrate("web", "b"))
    c = a.docker.containers[cid]
    assert c["State"]["Running"] and c["HostConfig"]["RestartPolicy"]["Name"] == "always"
    assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)
    # Refused by the up-front check: no migration was started, so none is journalled.
    assert a.journal.history() == [] and b.journal.history() == []


def test_unknown_peer_and_container_are_bad_input(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    with pytest.raises(MigrationRefused, match="unknown peer") as e1:
        run_async(a.service.migrate("web", "zzz"))
    with pytest.raises(MigrationRefused, match="no container") as e2:
        run_async(a.service.migrate("nope", "b"))
    assert e1.value.bad_input and e2.value.bad_input


def test_restore_failure_rolls_back_under_a_fresh_checkpoint_name(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    cid = a.docker.add_running("web", policy="unless-stopped")
    b.docker.fail_restore = "criu: restore failed"
    with pytest.raises(MigrationFailed, match="criu: restore failed") as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.rolled_back
    mid = err.value.report.migration_id
    c = a.docker.containers[cid]
    assert c["State"]["Running"]
    assert c["restored_from"] == f"ferry-{mid}-rb1"  # not the dumped name (moby#42900)
    assert c["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert b.docker.find_container("web") is None, "half-made target container left behind"
    rec = a.journal.get(mid)
    assert rec.outcome == "rolled_back" and "criu: restore failed" in (rec.reason or "")
    assert rec.report["details"]["down_until_rollback_s"] >= 0
    assert b.journal.get(mid).outcome == "aborted"


def test_broken_transfer_rolls_back(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cid = a.docker.add_running("web")
    a.peers["b"].break_upload = True
    with pytest.raises(MigrationFailed, match="transfer broke") as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.rolled_back and a.docker.containers[cid]["State"]["Running"]
    assert b.docker.find_container("web") is None


class CutPeer(DirectPeer):
    """The link goes down during the upload and stays down until the test brings it back."""

    async def upload_state(self, mid: str, chunks: Any, digest: str | None = None) -> Any:
        self.down = True
        async for _ in chunks:
            raise PeerUnavailable(self.name, "connection reset during upload")


def test_an_unheard_abort_is_retried_until_the_target_drops_its_copy(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    peer = a.peers["b"] = CutPeer("b", b.service.handlers, "a")
    a.docker.add_running("web")

    async def scenario() -> str:
        with pytest.raises(MigrationFailed) as err:
            await a.service.migrate("web", "b")
        assert err.value.rolled_back
        assert b.docker.find_container("web") is not None, "the abort could not get through"
        peer.down = False  # the link is back: the source's retry must reach the target
        for _ in range(200):
            if b.docker.find_container("web") is None and all(t.done() for t in a.service._tasks):
                break
            await asyncio.sleep(0.05)
        assert b.docker.find_container("web") is None, "half-made target copy kept"
        return err.value.report.migration_id

    mid = run_async(scenario())
    assert b.journal.get(mid).outcome == "aborted"


class SilentDuringRestore(DirectPeer):
    """The restore call goes out, then the link dies: no answer, nor to anything else."""

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        if path.endswith("/restore"):
            self.down = True
            await asyncio.Event().wait()  # its answer never comes
        return await super().post_json(path, body, timeout=timeout)


def test_a_target_silent_during_the_restore_call_is_given_up_after_the_stall_timeout(
    tmp_path: Path,
) -> None:
    # restore_timeout stays at its 120 s: the stall timeout alone must end the wait.
    a = Host(tmp_path, "a", "b", (IMAGE_ID,), migration={"stall_timeout": "0.4s"})
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    peer = a.peers["b"] = SilentDuringRestore("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")
    cid = a.docker.add_running("web")

    async def scenario() -> MigrationFailed:
        with pytest.raises(MigrationFailed) as err:
            await a.service.migrate("web", "b")
        peer.down = False  # the link is back: let the abort through before the end
        for _ in range(200):
            if all(t.done() for t in a.service._tasks):
                break
            await asyncio.sleep(0.05)
        return err.value

    try:
        failed = run_async(scenario())
    finally:
        a.journal.close()
        b.journal.close()
    assert failed.rolled_back and a.docker.containers[cid]["State"]["Running"]
    assert "stall_timeout" in str(failed), str(failed)


def test_the_source_copy_is_removed_once_its_daemon_is_back(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    cid = a.docker.add_running("web")
    remove, away = a.docker.remove, [2]

    def flaky_remove(ref: str, force: bool = False) -> None:
        if away[0]:
            away[0] -= 1
            raise DockerUnavailable("remove", "daemon not answering")
        remove(ref, force)

    a.docker.remove = flaky_remove  # type: ignore[method-assign]

    async def scenario() -> Any:
        report = await a.service.migrate("web", "b")
        for _ in range(200):
            if cid not in a.docker.containers and all(t.done() for t in a.service._tasks):
                break
            await asyncio.sleep(0.05)
        return report

    report = run_async(scenario(), timeout=30)
    assert report.outcome == "succeeded"
    assert "retrying" in report.details["source_copy"]
    assert cid not in a.docker.containers, "the source kept its stopped copy"


def test_image_is_shipped_when_the_target_lacks_it(tmp_path: Path) -> None:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", ())
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")
    try:
        a.docker.add_running("web")
        report = run_async(a.service.migrate("web", "b"))
        assert report.image_shipped and report.bytes_image > 0
        assert b.docker.has_image(IMAGE_ID)
    finally:
        a.journal.close()
        b.journal.close()


def test_image_shipping_can_be_forbidden(tmp_path: Path) -> None:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", ())
    a.config = a.config.model_copy(
        update={"migration": a.config.migration.model_copy(update={"allow_image_shipping": False})}
    )
    a.service.config = a.config
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    try:
        cid = a.docker.add_running("web")
        with pytest.raises(MigrationRefused, match="allow_image_shipping is off"):
            run_async(a.service.migrate("web", "b"))
        assert a.docker.containers[cid]["State"]["Running"]
        assert b.docker.find_container("web") is None  # the target was told to drop its part
        assert not b.service.handlers.incoming
    finally:
        a.journal.close()
        b.journal.close()


def _crash_after_freeze(a: Host, b: Host) -> tuple[str, str]:
    """Leave a migration as a SIGKILL right after the checkpoint would."""
    cid = a.docker.add_running("web")
    a.peers["b"].break_upload = True

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise asyncio.CancelledError  # the process dies here: no rollback runs

    a.service._roll_back = crash  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        run_async(a.service.migrate("web", "b"))
    (rec,) = a.journal.unfinished()
    return cid, rec.id


def _reconcile_restarted(h: Host) -> list[dict[str, Any]]:
    """What a restarted agent on `h` (same Docker, journal and peers) reconciles."""
    docker: Any = h.docker  # the fake adapter
    restarted = MigrationService(
        docker, h.config, h.journal, h.peers, processes=FakeProcesses(h.docker)
    )
    return run_async(restarted.reconcile())


def test_reconcile_restores_a_frozen_container_exactly_once(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cid, mid = _crash_after_freeze(a, b)
    assert not a.docker.containers[cid]["State"]["Running"]
    assert b.docker.find_container("web") is not None  # half-made on the target

    results = _reconcile_restarted(a)
    assert results[0]["outcome"].startswith("rolled back")
    assert a.docker.containers[cid]["State"]["Running"]
    assert b.docker.find_container("web") is None
    assert a.journal.get(mid).outcome == "rolled_back"
    assert a.journal.unfinished() == []


AFTER_DECISION = "after-decision"


async def _stopped_after_the_decision(a: Host) -> str:
    """Run a migration of "web" until "commit" is journalled, then stop it as a dying agent
    would; returns its id. The caller disarms the hook (`_disarm`)."""
    hooks_dir = a.config.state_dir / "hooks"
    hooks_dir.mkdir(parents=True, exist_ok=True)
    (hooks_dir / AFTER_DECISION).write_text("test")
    task = asyncio.ensure_future(a.service.migrate("web", "b"))
    reached = hooks_dir / f"{AFTER_DECISION}.reached"
    await until(reached.exists, timeout=10.0, interval=0.005, what="the journalled decision")
    task.cancel()  # the agent stops: the journal says "commit"
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return a.journal.unfinished()[0].id


def _disarm(a: Host) -> None:
    (a.config.state_dir / "hooks" / AFTER_DECISION).unlink()


def test_reconcile_finishes_a_journalled_commit(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cid = a.docker.add_running("web")

    async def crash_after_the_decision() -> str:
        mid = await _stopped_after_the_decision(a)
        await b.service.handlers.close()  # its decision watcher belongs to this loop
        return mid

    mid = run_async(crash_after_the_decision())
    _disarm(a)
    assert a.journal.get(mid).report["decision"] == "commit"
    held_copy = b.docker._get("web")
    assert held_copy["held"], "the target copy must stay stopped until the commit"

    _reconcile_restarted(a)
    assert cid not in a.docker.containers
    assert not b.docker._get("web")["held"] and b.docker._get("web")["State"]["Running"]
    assert a.journal.get(mid).outcome == "succeeded"
    assert b.journal.get(mid).outcome == "succeeded"


def test_reconcile_removes_half_made_target_containers(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    _, mid = _crash_after_freeze(a, b)
    b.peers["a"].down = True  # the source is away; a created-only container is garbage anyway
    results = _reconcile_restarted(b)
    assert results == [
        {"migration_id": mid, "role": "target", "outcome": "removed half-made container"}
    ]
    assert b.docker.find_container("web") is None


def test_reconcile_stops_a_post_copy_copy_whose_agent_died_before_saying_so(
    hosts: tuple[Host, Host],
) -> None:
    """A post-copy restore runs at once. An agent killed after the start and before
    journalling "postcopy" finds phase "restore" and a copy running on pages it may
    never get: it is stopped and removed (the paused source is the copy), never kept
    as if a commit had continued it."""
    _, b = hosts
    handlers = b.service.handlers

    async def crash_in_the_window() -> None:
        await stage_web(handlers, "m-pc")
        inc = handlers.incoming["m-pc"]
        inc.postcopy_port = 7001  # as restore journals it, with the phase
        await handlers._phase(inc, T_RESTORE)
        await handlers.close()

    run_async(crash_in_the_window())
    copy = b.docker._get("web")
    copy["State"]["Running"] = True  # started, and running: post-copy holds nothing stopped
    results = _reconcile_restarted(b)
    assert results == [
        {"migration_id": "m-pc", "role": "target", "outcome": "removed: post-copy interrupted"}
    ]
    assert b.docker.find_container("web") is None
    assert b.journal.get("m-pc").outcome == "aborted"


def test_reconcile_removes_a_copy_that_runs_though_the_source_never_heard_held(
    hosts: tuple[Host, Host],
) -> None:
    """Phase "restore" and a copy that runs, not held: only a commit continues a copy,
    and none can have come (the source hears "held" after the phase "restored"). The
    source may have resumed its own: this one goes, never kept as committed."""
    _, b = hosts
    handlers = b.service.handlers

    async def crash_in_the_window() -> None:
        await stage_web(handlers, "m-run")
        await handlers._phase(handlers.incoming["m-run"], T_RESTORE)
        await handlers.close()

    run_async(crash_in_the_window())
    copy = b.docker._get("web")
    copy["State"]["Running"] = True  # CRIU did not leave it stopped
    copy["held"] = False
    results = _reconcile_restarted(b)
    assert results == [
        {"migration_id": "m-run", "role": "target", "outcome": "removed: ran before any commit"}
    ]
    assert b.docker.find_container("web") is None
    assert b.journal.get("m-run").outcome == "aborted"


def test_reconcile_drops_a_held_copy_the_source_never_heard_of(
    hosts: tuple[Host, Host],
) -> None:
    """Phase "restore" and a copy held stopped: the agent died before journalling
    "restored", so the source never heard "held" and cannot have committed. It goes at
    once, as the silence check drops such a migration, without waiting for the source."""
    _, b = hosts
    handlers = b.service.handlers

    async def crash_in_the_window() -> None:
        await stage_web(handlers, "m-held")
        await handlers._phase(handlers.incoming["m-held"], T_RESTORE)
        await handlers.close()

    run_async(crash_in_the_window())
    copy = b.docker._get("web")
    copy["State"]["Running"] = True
    copy["held"] = True  # restored with leave-stopped
    del b.peers["a"]  # the source is gone: nothing to ask, nothing to wait for
    results = _reconcile_restarted(b)
    assert results == [
        {"migration_id": "m-held", "role": "target", "outcome": "removed: never reported held"}
    ]
    assert b.docker.find_container("web") is None
    assert b.journal.get("m-held").outcome == "aborted"


def _silent_source(b: Host, source_says: Any) -> tuple[Any, list[str]]:
    """b's handlers with a fake clock, a short quiet limit and a recorded source status."""
    clock = FakeClock()
    handlers = b.service.handlers
    handlers.clock = handlers.silence.clock = clock
    handlers.reservations.clock = clock
    handlers.silence.limit = 0.05  # real seconds on the loop's timer; quiet is on `clock`
    asked: list[str] = []

    async def status(peer: str, mid: str) -> dict[str, Any] | None:
        asked.append(mid)
        clock.now += 1  # the question itself takes a while
        return source_says

    handlers.peer_status = handlers.silence.peer_status = status
    return clock, asked


def test_a_silent_source_that_cannot_be_reached_is_dropped_before_its_reservation_ends(
    hosts: tuple[Host, Host],
) -> None:
    _, b = hosts
    clock, asked = _silent_source(b, None)  # unreachable, or it never heard of it
    handlers = b.service.handlers

    async def scenario() -> None:
        await stage_web(handlers, "m-quiet")
        assert b.docker.find_container("web") is not None  # the half-made container
        clock.now += 121  # far less than the 600 s reservation
        await until(lambda: "m-quiet" not in handlers.incoming, what="the migration dropped")
        await handlers.close()

    run_async(scenario())
    assert asked == ["m-quiet"]
    rec = b.journal.get("m-quiet")
    assert rec.outcome == "aborted"
    assert "sent nothing for 12" in (rec.reason or "") and "cannot be reached" in (rec.reason or "")
    assert b.docker.find_container("web") is None
    assert not handlers.reservations.active()


def test_a_silent_source_that_says_its_migration_is_on_is_waited_for(
    hosts: tuple[Host, Host],
) -> None:
    _, b = hosts
    clock, asked = _silent_source(b, {"outcome": None, "phase": "freeze"})  # a long dump
    handlers = b.service.handlers
    body = {"migration_id": "m-slow", "container_id": "c", "name": "web", "image_id": IMAGE_ID}

    async def scenario() -> None:
        await handlers.prepare("a", body)
        clock.now += 121
        await until(lambda: asked[:1] == ["m-slow"], what="the source asked")
        assert "m-slow" in handlers.incoming
        clock.now += 500  # past the reservation taken at prepare: each answer extends it
        assert handlers.reservations.active()
        await handlers.close()

    run_async(scenario())
    assert b.journal.get("m-slow").outcome is None
    assert handlers.reservations.active()


@pytest.mark.parametrize("phase", [T_RESTORED, T_POSTCOPY])
def test_a_held_or_running_copy_is_never_dropped_for_a_silent_source(
    hosts: tuple[Host, Host], phase: str
) -> None:
    """Only the source's decision (held) or the page watchdog (post-copy) ends these."""
    _, b = hosts
    clock, asked = _silent_source(b, None)
    handlers = b.service.handlers

    async def scenario() -> None:
        await stage_web(handlers, "m-kept")
        b.journal.set_phase("m-kept", phase)
        clock.now += 3600
        # Due after the short quiet limit; done once its task is, and not armed again.
        await until(
            lambda: "m-kept" not in handlers.silence.timers and not handlers._cleanup_tasks,
            what="the silence check ran",
        )
        await handlers.close()

    run_async(scenario())
    assert asked == []
    assert "m-kept" in handlers.incoming
    assert b.journal.get("m-kept").outcome is None
    assert b.docker.find_container("web") is not None


def test_a_restore_whose_handler_died_is_dropped_when_its_source_falls_silent(
    hosts: tuple[Host, Host],
) -> None:
    """Phase "restore" with no request running: the source never heard "held", so it
    cannot have committed, and the silence check may drop it once the source says
    it has ended the migration."""
    _, b = hosts
    clock, asked = _silent_source(b, {"outcome": "rolled_back"})
    handlers = b.service.handlers

    async def scenario() -> None:
        await stage_web(handlers, "m-died")
        b.journal.set_phase("m-died", T_RESTORE)  # what a handler that died mid-restore leaves
        clock.now += 121
        await until(lambda: "m-died" not in handlers.incoming, what="the migration dropped")
        await handlers.close()

    run_async(scenario())
    assert asked == ["m-died"]
    rec = b.journal.get("m-died")
    assert rec.outcome == "aborted"
    assert "has ended it (rolled_back)" in (rec.reason or "")
    assert "never told of a restored copy" in (rec.reason or "")
    assert b.docker.find_container("web") is None
    assert not handlers.reservations.active()


def test_source_copy_can_be_kept_renamed_for_a_while(tmp_path: Path) -> None:
    a = Host(tmp_path, "a", "b", (IMAGE_ID,))
    b = Host(tmp_path, "b", "a", (IMAGE_ID,))
    mig = a.config.migration.model_copy(update={"keep_source_copy_for": 3600.0})
    a.service.config = a.config.model_copy(update={"migration": mig})
    a.peers["b"] = DirectPeer("b", b.service.handlers, "a")
    b.peers["a"] = DirectPeer("a", a.service.handlers, "b")

    async def scenario() -> Any:
        report = await a.service.migrate("web", "b")
        await a.service.close()  # cancels the pending removal: nothing outlives the service
        return report

    try:
        cid = a.docker.add_running("web")
        report = run_async(scenario())
        kept = a.docker.containers[cid]
        assert kept["Name"] == f"/web-ferry-{report.migration_id}"
        assert not kept["State"]["Running"]
        assert report.details["source_copy"].startswith("kept as")
    finally:
        a.journal.close()
        b.journal.close()


def _group(a: Host, *names: str) -> list[str]:
    cids = []
    for name in names:
        cid = a.docker.add_running(name)
        a.docker.containers[cid]["Config"]["Labels"] = {"com.docker.compose.project": "stack"}
        cids.append(cid)
    return cids


def test_a_group_moves_as_a_unit_with_one_decision(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cids = _group(a, "app", "cache")
    report = run_async(a.service.migrate("app", "b"))
    assert report.outcome == "succeeded"
    assert report.details["group"] == "stack"
    assert report.details["member_outcomes"] == {"app": "succeeded", "cache": "succeeded"}
    for name in ("app", "cache"):
        moved = b.docker._get(name)
        assert moved["State"]["Running"] and not moved["held"]
    assert not any(cid in a.docker.containers for cid in cids)
    # Every member froze before any was committed: one freeze window.
    calls = [c[0] for c in a.docker.calls]
    assert calls.count("checkpoint") == 2
    assert all(rec.outcome == "succeeded" for rec in a.journal.history(10))


def test_a_failure_inside_a_group_rolls_every_member_back(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    cids = _group(a, "app", "cache")
    b.docker.fail_restore = "criu: restore failed"
    with pytest.raises(MigrationFailed) as err:
        run_async(a.service.migrate("cache", "b"))
    assert err.value.rolled_back and "group stack" in err.value.reason
    for cid in cids:
        assert a.docker.containers[cid]["State"]["Running"]
    assert b.docker.find_container("app") is None and b.docker.find_container("cache") is None
    assert {rec.outcome for rec in a.journal.history(10)} == {"rolled_back"}
    assert all(rec.report["decision"] == "rollback" for rec in a.journal.history(10))


def test_already_migrating_says_only_that(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    cid = a.docker.add_running("web")
    # Mid-migration the container is frozen: Docker shows it paused.
    a.docker.containers[cid]["State"]["Paused"] = True
    a.service.active[cid] = "m-first"
    with pytest.raises(MigrationRefused) as err:
        run_async(a.service.migrate("web", "b"))
    assert err.value.reason == "web is already being migrated (m-first)"
    assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)


def _free_disk(monkeypatch: pytest.MonkeyPatch, free: dict[Path, int]) -> None:
    """Free bytes per data root, as statvfs would report them (both sides' checks)."""
    import agent.migration.disk_space as disk_space
    import agent.migration.resources as resources

    def disk_free(path: Path) -> int:
        return free.get(Path(path), 1 << 50)

    monkeypatch.setattr(disk_space, "disk_free", disk_free)
    monkeypatch.setattr(resources, "disk_free", disk_free)


def test_source_without_room_for_its_checkpoint_refuses_before_the_freeze(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    cid = a.docker.add_running("web")
    root = a.docker.root
    _free_disk(monkeypatch, {root: 10 << 20})
    with pytest.raises(MigrationRefused) as err:
        run_async(a.service.migrate("web", "b"))
    # 1 MiB of memory, twice (images + containerd's copy), +10%, +16 MiB.
    need = int(2 * (1 << 20) * 1.1) + (16 << 20)
    assert err.value.reason == (
        f"a: not enough free disk under {root} for the checkpoint: "
        f"needs {need >> 20} MiB ({need} bytes), 10 MiB ({10 << 20} bytes) free"
    )
    assert a.docker.containers[cid]["State"]["Running"]
    assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)
    assert b.journal.history() == []  # the target was never asked


def test_target_without_room_for_state_and_restore_refuses_before_the_freeze(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    a.docker.add_running("web")
    root = b.docker.root
    # Enough for state + writable layer (the old estimate), not for containerd's copy too.
    _free_disk(monkeypatch, {root: 18 << 20})
    with pytest.raises(MigrationRefused) as err:
        run_async(a.service.migrate("web", "b"))
    reason = err.value.reason
    # Said by b's answer to the up-front eligibility check, the same sum its prepare uses.
    assert reason.startswith(f"b: b: not enough free disk under {root}: needs "), reason
    assert reason.endswith(f", 18 MiB ({18 << 20} bytes) free"), reason
    assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)
    assert a.journal.history() == []  # refused before a migration was started


def test_a_group_needs_disk_for_every_member_at_once(
    hosts: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = hosts
    cids = _group(a, "app", "cache")
    one = int(2 * (1 << 20) * 1.1) + (16 << 20)  # each member: 1 MiB of memory
    _free_disk(monkeypatch, {a.docker.root: one + (1 << 20)})  # room for one, not two
    with pytest.raises(MigrationRefused) as err:
        run_async(a.service.migrate("app", "b"))
    reason = err.value.reason
    assert reason.startswith("group stack: a: not enough free disk under "), reason
    assert f"for the checkpoint and the others in flight: needs {(2 * one) >> 20} MiB" in reason
    assert all(a.docker.containers[c]["State"]["Running"] for c in cids)
    assert not any(call[0] in ("checkpoint", "policy") for call in a.docker.calls)
    # Nothing stays claimed: with room for both, the group moves.
    _free_disk(monkeypatch, {a.docker.root: 2 * one + (1 << 20)})
    assert run_async(a.service.migrate("app", "b")).outcome == "succeeded"


def test_a_group_member_that_cannot_move_stops_the_group_before_any_freeze(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    cids = _group(a, "app", "cache")
    a.docker.containers[cids[1]]["HostConfig"]["Init"] = True
    b.docker.add_running("app")  # and the target already has a container named app
    with pytest.raises(MigrationRefused) as err:
        run_async(a.service.migrate("app", "b"))
    reason = err.value.reason
    assert reason.startswith("group stack cannot move as a unit: app: b: a container named app")
    assert "cache: container cache runs with --init" in reason
    assert err.value.eligibility is not None and err.value.eligibility.permanent
    assert all(a.docker.containers[c]["State"]["Running"] for c in cids)
    assert not any(call[0] in ("checkpoint", "policy", "pause") for call in a.docker.calls)
    assert a.journal.history() == []


def test_resolve_keep_source_without_images_says_state_lost_not_resolved(
    hosts: tuple[Host, Host],
) -> None:
    a, _ = hosts
    cid = a.docker.add_running("web")
    a.docker.containers[cid]["State"] = {"Status": "exited", "Running": False}
    mid = "20261201T000000-abcdef"
    a.journal.begin(
        mid,
        container_id=cid,
        container_name="web",
        source="a",
        target="b",
        role="source",
        phase="commit",
        report={"checkpoint": f"ferry-{mid}", "decision": "commit"},
    )
    a.journal.finish(mid, "in_doubt", reason="target silent")
    with pytest.raises(MigrationFailed) as err:
        run_async(a.service.resolve(mid, "source"), timeout=60)
    assert err.value.state_lost and err.value.state_lost.startswith("STATE LOST: web")
    assert not err.value.rolled_back
    rec = a.journal.get(mid)
    assert rec.outcome == "failed" and rec.report["state_lost"] == err.value.state_lost
    assert not a.docker.containers[cid]["State"]["Running"], "never started fresh"


def test_a_late_commit_is_checked_against_the_sources_journal(hosts: tuple[Host, Host]) -> None:
    # A commit held in a cut link's buffers arrives after an operator kept the source.
    a, b = hosts
    a.docker.add_running("web")

    async def scenario() -> None:
        mid = await _stopped_after_the_decision(a)
        rec = a.journal.get(mid)
        a.journal.update_report(mid, rec.report | {"decision": "rollback"})
        with pytest.raises(HandlerError) as err:
            await b.service.handlers.commit("a", mid, {})
        assert err.value.error == "not_held"
        await b.service.handlers.close()

    run_async(scenario())
    _disarm(a)
    assert b.docker.find_container("web") is None, "the held copy must go, never run"
