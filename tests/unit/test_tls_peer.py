"""The peer channel on loopback: mutual TLS, peer names, limits and streamed uploads."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import archive
from agent.peer import certs
from agent.peer.api import BodyTooLarge, ByteStream, HandlerError, migration_path
from agent.peer.client import PeerClient, PeerRefused, PeerTimeouts, PeerUnavailable
from agent.peer.health import PeerHealthMonitor
from agent.peer.server import PeerServer, make_peer_app, start_peer_server
from agent.peer.tls import client_context, server_context
from tests.helpers import run_async

DIGEST = "sha256:" + "ab" * 32


@dataclass
class Pki:
    ca: Path
    other_ca: Path

    def client(self, name: str, *, ca: Path | None = None) -> ssl.SSLContext:
        d = ca or self.ca
        return client_context(d / "ca.crt", d / f"{name}.crt", d / f"{name}.key")

    def server(self, name: str, *, ca: Path | None = None) -> ssl.SSLContext:
        d = ca or self.ca
        return server_context(d / "ca.crt", d / f"{name}.crt", d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = root / "ca", root / "other"
    certs.init_ca(ca)
    certs.init_ca(other, name="some other CA")
    for host in ("alpha", "beta", "mallory"):
        certs.issue_host_cert(ca, host, ips=("127.0.0.1",))
    for host in ("alpha", "beta"):
        certs.issue_host_cert(other, host, ips=("127.0.0.1",))
    return Pki(ca, other)


PREPARE = {"migration_id": "m1", "name": "web"}
META = {"image": "r:7", "image_id": "sha256:" + "7" * 64}


@dataclass
class FakeHandlers:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    on_chunk: Callable[[int], Awaitable[None]] | None = None
    upload_error: BaseException | None = None

    async def health(self) -> dict[str, Any]:
        self.calls.append(("health", None))
        return {"draining": False, "load1": 0.5}

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("prepare", (peer, body)))
        if body.get("too_big"):
            raise HandlerError(409, "no_room", "not enough memory for 64 GiB")
        return {"accepted": True, "peer": peer}

    async def status(self, peer: str, migration_id: str) -> dict[str, Any]:
        self.calls.append(("status", (peer, migration_id)))
        return {"id": migration_id, "phase": "staged"}

    async def stage(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("stage", (peer, migration_id, body)))
        return {"staged": True}

    async def receive_image(
        self, peer: str, migration_id: str, stream: ByteStream, meta: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("receive_image", (peer, migration_id, meta)))
        n = 0
        async for chunk in stream:
            n += len(chunk)
        return {"bytes": n}

    async def receive_state(
        self, peer: str, migration_id: str, stream: ByteStream, digest: str | None
    ) -> dict[str, Any]:
        self.calls.append(("receive_state", (peer, migration_id, digest)))
        try:
            async for chunk in stream:
                self.received += chunk
                if self.on_chunk:
                    await self.on_chunk(len(self.received))
        except BodyTooLarge as exc:
            self.upload_error = exc
            raise
        return {"bytes": stream.bytes_read}

    async def restore(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("restore", (peer, migration_id, body)))
        raise RuntimeError("criu exploded")

    async def abort(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("abort", (peer, migration_id, body)))
        return {"aborted": True}


async def _serve(
    pki: Pki,
    handlers: FakeHandlers,
    *,
    name: str = "alpha",
    ca: Path | None = None,
    max_body: int = 1 << 20,
    max_json: int = 4096,
) -> PeerServer:
    app = make_peer_app(handlers, {"beta"}, max_body, max_json_bytes=max_json, host_name=name)
    return await start_peer_server(app, "127.0.0.1", 0, pki.server(name, ca=ca))


def _client(server: PeerServer, ctx: ssl.SSLContext, name: str = "alpha") -> PeerClient:
    return PeerClient(name, f"127.0.0.1:{server.port}", ctx, PeerTimeouts(connect=5, request=10))


def test_configured_peer_gets_through(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers)
        try:
            async with _client(server, pki.client("beta")) as c:
                assert await c.health() == {"draining": False, "load1": 0.5}
                assert await c.post_json("/v1/migrations", PREPARE) == {
                    "accepted": True,
                    "peer": "beta",
                }
                assert await c.get_json(migration_path("m1")) == {"id": "m1", "phase": "staged"}
                await c.post_json(migration_path("m1", "stage"), {"spec": {"x": 1}})
                with pytest.raises(PeerRefused) as refused:
                    await c.post_json("/v1/migrations", {**PREPARE, "too_big": True})
                assert (refused.value.status, refused.value.error) == (409, "no_room")
                assert refused.value.reason == "not enough memory for 64 GiB"
                with pytest.raises(PeerRefused) as crashed:
                    await c.post_json(migration_path("m1", "restore"), {})
                assert crashed.value.status == 500
                # The exception's text stays in this agent's log.
                assert crashed.value.reason == "internal error, see alpha's log"
                with pytest.raises(PeerRefused) as missing:
                    await c.get_json("/v1/nothing")
                assert missing.value.status == 404
                with pytest.raises(PeerRefused) as bad_digest:
                    await c.upload_state("m1", _chunks(b"x"), "md5:abc")
                assert bad_digest.value.status == 400
                assert "X-Ferry-Digest" in bad_digest.value.reason
                assert await c.upload_state("m1", _chunks(b"ab", b"c")) == {"bytes": 3}
        finally:
            await server.close()

    run_async(go())
    assert [c[0] for c in handlers.calls] == [
        "health",
        "prepare",
        "status",
        "stage",
        "prepare",
        "restore",
        "receive_state",
    ]
    assert handlers.calls[-1] == ("receive_state", ("beta", "m1", None))
    assert handlers.calls[3] == ("stage", ("beta", "m1", {"spec": {"x": 1}}))


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _refused_before_handlers(pki: Pki, ctx: ssl.SSLContext, expect: type[Exception]) -> str:
    handlers = FakeHandlers()

    async def go() -> str:
        server = await _serve(pki, handlers)
        try:
            async with _client(server, ctx) as c:
                with pytest.raises(expect) as err:
                    await c.post_json("/v1/migrations", {"id": "m1"})
                with pytest.raises(expect):
                    await c.upload_state("m1", _chunks(b"secret" * 1000), DIGEST)
                return str(err.value)
        finally:
            await server.close()

    message = run_async(go())
    assert handlers.calls == []
    assert handlers.received == b""
    return message


def test_client_without_certificate_fails_the_handshake(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca / "ca.crt"))
    ctx.check_hostname = False
    _refused_before_handlers(pki, ctx, PeerUnavailable)


def test_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    # Trusts the right CA (so the client side is happy) but presents a "beta"
    # certificate signed by another CA: the server must refuse the handshake.
    o = pki.other_ca
    ctx = client_context(pki.ca / "ca.crt", o / "beta.crt", o / "beta.key")
    message = _refused_before_handlers(pki, ctx, PeerUnavailable)
    assert "TLS verification failed" not in message  # not the client refusing the server


def test_valid_certificate_for_unconfigured_peer_gets_403(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers)
        try:
            async with _client(server, pki.client("mallory")) as c:
                with pytest.raises(PeerRefused) as err:
                    await c.post_json("/v1/migrations", {"id": "m1"})
                assert err.value.status == 403
                assert err.value.reason == "certificate name mallory is not a configured peer"
                with pytest.raises((PeerRefused, PeerUnavailable)) as up:
                    await c.upload_state("m1", _chunks(b"secret" * 1000), DIGEST)
                if isinstance(up.value, PeerRefused):
                    assert up.value.status == 403
                with pytest.raises(PeerRefused):
                    await c.health()
        finally:
            await server.close()

    run_async(go())
    assert handlers.calls == []
    assert handlers.received == b""


def test_client_refuses_server_with_another_name(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers, name="mallory")
        try:
            async with _client(server, pki.client("beta"), name="alpha") as c:
                with pytest.raises(PeerUnavailable, match="expected 'alpha'"):
                    await c.post_json("/v1/migrations", {"id": "m1"})
        finally:
            await server.close()

    run_async(go())
    assert handlers.calls == []


def test_client_refuses_server_from_another_ca(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers, ca=pki.other_ca)
        try:
            async with _client(server, pki.client("beta")) as c:
                with pytest.raises(PeerUnavailable, match="TLS verification failed"):
                    await c.health()
        finally:
            await server.close()

    run_async(go())
    assert handlers.calls == []


def test_unreachable_peer(pki: Pki) -> None:
    async def go() -> None:
        server = await _serve(pki, FakeHandlers())
        port = server.port
        await server.close()
        async with PeerClient("alpha", f"127.0.0.1:{port}", pki.client("beta")) as c:
            with pytest.raises(PeerUnavailable):
                await c.health()

    run_async(go())


def test_json_body_limit(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers, max_json=4096)
        try:
            async with _client(server, pki.client("beta")) as c:
                with pytest.raises(PeerRefused) as err:
                    await c.post_json("/v1/migrations", {**PREPARE, "pad": "x" * 5000})
                assert err.value.status == 413
                assert await c.post_json("/v1/migrations", {**PREPARE, "pad": "x" * 100})
        finally:
            await server.close()

    run_async(go())
    assert [c[0] for c in handlers.calls] == ["prepare"]


def test_streamed_upload_limit(pki: Pki) -> None:
    handlers = FakeHandlers()
    chunk = b"z" * 65536

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(64):  # 4 MiB against a 256 KiB limit
            yield chunk

    async def go() -> None:
        server = await _serve(pki, handlers, max_body=256 * 1024)
        try:
            async with _client(server, pki.client("beta")) as c:
                with pytest.raises((PeerRefused, PeerUnavailable)) as err:
                    await c.upload_state("m1", endless(), DIGEST)
                if isinstance(err.value, PeerRefused):
                    assert err.value.status == 413
        finally:
            await server.close()

    run_async(go())
    assert isinstance(handlers.upload_error, BodyTooLarge)
    assert len(handlers.received) <= 256 * 1024


def test_upload_is_streamed_while_being_produced(pki: Pki) -> None:
    """The producer only makes chunk 2 after the server has received chunk 1."""
    handlers = FakeHandlers()
    got_first = asyncio.Event()

    async def on_chunk(total: int) -> None:
        got_first.set()

    handlers.on_chunk = on_chunk

    async def producer() -> AsyncIterator[bytes]:
        yield b"first-" * 10000
        await got_first.wait()
        for i in range(20):
            yield bytes([i]) * 50000

    async def go() -> dict[str, Any]:
        server = await _serve(pki, handlers, max_body=8 << 20)
        try:
            async with _client(server, pki.client("beta")) as c:
                return await c.upload_state("m1", producer(), DIGEST)
        finally:
            await server.close()

    result = run_async(go())
    expected = b"first-" * 10000 + b"".join(bytes([i]) * 50000 for i in range(20))
    assert result == {"bytes": len(expected)}
    assert bytes(handlers.received) == expected
    assert handlers.calls == [("receive_state", ("beta", "m1", DIGEST))]


def test_image_upload_meta(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> dict[str, Any]:
        server = await _serve(pki, handlers)
        try:
            async with _client(server, pki.client("beta")) as c:
                return await c.upload_image("m1", _chunks(b"a" * 10, b"b" * 5), META)
        finally:
            await server.close()

    assert run_async(go()) == {"bytes": 15}
    assert handlers.calls == [("receive_image", ("beta", "m1", META))]


def test_health_monitor_over_the_channel(pki: Pki) -> None:
    handlers = FakeHandlers()

    async def go() -> None:
        server = await _serve(pki, handlers)
        port = server.port
        try:
            async with (
                _client(server, pki.client("beta")) as good,
                PeerClient("alpha", f"127.0.0.1:{port}", pki.client("mallory")) as refused,
            ):
                mon = PeerHealthMonitor([good], interval=5)
                await mon.poll_once()
                (peer,) = mon.peers()
                assert (peer.name, peer.reachable, peer.load1) == ("alpha", True, 0.5)
                stranger = PeerHealthMonitor([refused], interval=5)
                await stranger.poll_once()
                (peer,) = stranger.peers()
                assert not peer.reachable and peer.error is not None and "403" in peer.error
        finally:
            await server.close()

    run_async(go())


@dataclass
class StagingHandlers(FakeHandlers):
    """The target's way: unpack while receiving, publish at restore once the digest matches."""

    dests: dict[str, Path] = field(default_factory=dict)
    staged: archive.StagedUnpack | None = None

    async def receive_state(
        self, peer: str, migration_id: str, stream: ByteStream, digest: str | None
    ) -> dict[str, Any]:
        self.staged = archive.StagedUnpack(self.dests)
        res = await self.staged.receive(stream, expected_digest=digest)
        return {"digest": res.digest, "bytes": res.size}

    async def restore(self, peer: str, migration_id: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.staged is not None
        try:
            stats = await asyncio.to_thread(self.staged.commit, body["digest"])
        except archive.ArchiveError as exc:
            raise HandlerError(422, "bad_state", str(exc)) from exc
        return {"entries": stats.entries}


def test_state_unpacked_while_streaming_appears_only_with_the_right_digest(
    pki: Pki, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "upper" / "etc").mkdir(parents=True)
    (src / "ckpt").mkdir()
    (src / "upper" / "etc" / "motd").write_text("hello")
    (src / "ckpt" / "pages-1.img").write_bytes(os.urandom(2 << 20))
    dests = {"checkpoint": tmp_path / "dst" / "ckpt", "upper": tmp_path / "dst" / "upper"}
    handlers = StagingHandlers(dests=dests)

    async def send(c: PeerClient) -> archive.Packer:
        packer = archive.Packer({"checkpoint": src / "ckpt", "upper": src / "upper"})
        sent = await c.upload_state("m1", packer.aiter())
        assert sent == {"digest": packer.digest, "bytes": packer.stats.compressed_bytes}
        return packer

    async def go() -> None:
        server = await _serve(pki, handlers, max_body=16 << 20)
        try:
            async with _client(server, pki.client("beta")) as c:
                await send(c)
                with pytest.raises(PeerRefused) as bad:
                    await c.post_json(migration_path("m1", "restore"), {"digest": DIGEST})
                assert bad.value.status == 422 and "expected " + DIGEST in bad.value.reason
                assert not (tmp_path / "dst").exists()  # neither state nor staging left
                packer = await send(c)
                done = await c.post_json(migration_path("m1", "restore"), {"digest": packer.digest})
                assert done == {"entries": packer.stats.entries}
        finally:
            await server.close()

    run_async(go())
    assert (dests["upper"] / "etc" / "motd").read_text() == "hello"
    assert (dests["checkpoint"] / "pages-1.img").read_bytes() == (
        src / "ckpt" / "pages-1.img"
    ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["ckpt", "upper"]
