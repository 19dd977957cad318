"""Client side of the peer API: JSON calls and streamed uploads to one peer."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import AsyncIterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from agent.net_errors import describe, unreachable_line
from agent.peer.api import DIGEST_HEADER, HEALTH_PATH, META_HEADER, migration_path
from agent.peer.bulk_upload import BulkUpload, bulk_put

log = structlog.get_logger(__name__)


class PeerError(Exception):
    def __init__(self, peer: str, message: str, address: str | None = None) -> None:
        super().__init__(unreachable_line(f"peer {peer}", address, message))
        self.peer = peer
        self.address = address
        self.what = message  # the reason alone, without who and where


class PeerUnavailable(PeerError):
    """Could not talk to the peer: connection, TLS or timeout failure."""


class PeerRefused(PeerError):
    """The peer answered with an error; `reason` is its explanation."""

    def __init__(self, peer: str, status: int, error: str, reason: str) -> None:
        super().__init__(peer, f"refused ({status} {error}): {reason}")
        self.status = status
        self.error = error
        self.reason = reason


@dataclass(frozen=True)
class PeerTimeouts:
    connect: float = 5.0
    request: float = 30.0  # whole JSON call
    upload: float | None = None  # whole upload; None: bounded only by `idle`
    idle: float = 60.0  # no progress on an upload's socket for this long


def _base_url(address: str) -> str:
    if address.startswith("https://"):
        return address.rstrip("/")
    if "://" in address:
        raise ValueError(f"peer address {address!r} must be host:port or https://host:port")
    return f"https://{address}"


class PeerClient:
    """Talks to one peer over mutual TLS.

    `name` is the peer's certificate name and is enforced on every connection
    (see agent.peer.tls.client_context); `address` is where to dial it,
    "host:port" or "https://host:port".
    """

    def __init__(
        self,
        name: str,
        address: str,
        ssl_ctx: ssl.SSLContext,
        timeouts: PeerTimeouts | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self._base = _base_url(address)
        self._ssl = ssl_ctx
        self.timeouts = timeouts or PeerTimeouts()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=8)
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def health(self) -> dict[str, Any]:
        return await self.request_json("GET", HEALTH_PATH)

    async def get_json(self, path: str, *, timeout: float | None = None) -> dict[str, Any]:
        return await self.request_json("GET", path, timeout=timeout)

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self.request_json("POST", path, body, timeout=timeout)

    async def request_json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        t = aiohttp.ClientTimeout(
            total=timeout or self.timeouts.request, sock_connect=self.timeouts.connect
        )
        return await self._send(method, path, t, json=body)

    async def upload(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """PUT a body produced chunk by chunk (chunked transfer encoding).

        The producer runs as the body is sent, so a source can stream an
        archive it is still building. The body goes out on a blocking TLS
        socket in a worker thread (agent.peer.bulk_upload), at link speed.
        """
        upload = BulkUpload(
            self._base,
            self.name,
            self._ssl,
            connect_timeout=self.timeouts.connect,
            idle_timeout=self.timeouts.idle,
            total_timeout=self.timeouts.upload,
        )
        try:
            status, raw = await bulk_put(upload, path, headers or {}, chunks)
        except (OSError, http.client.HTTPException) as exc:  # TLS errors and timeouts too
            raise PeerUnavailable(self.name, f"{describe(exc)} (PUT {path})", self.address) from exc
        return self._answer("PUT", path, status, raw)

    async def upload_state(
        self, migration_id: str, chunks: AsyncIterable[bytes], digest: str | None = None
    ) -> dict[str, Any]:
        """Stream the state archive.

        Pass `digest` when it is known up front (archive spooled first). For an
        archive packed on the fly it is known only at the end: leave it None
        and send Packer.digest with the restore call instead.
        """
        headers = {DIGEST_HEADER: digest} if digest else {}
        return await self.upload(migration_path(migration_id, "state"), chunks, headers=headers)

    async def upload_image(
        self, migration_id: str, chunks: AsyncIterable[bytes], meta: dict[str, Any]
    ) -> dict[str, Any]:
        return await self.upload(
            migration_path(migration_id, "image"), chunks, headers={META_HEADER: json.dumps(meta)}
        )

    async def _send(
        self,
        method: str,
        path: str,
        timeout: aiohttp.ClientTimeout,
        **kwargs: Any,
    ) -> dict[str, Any]:
        url = self._base + path
        try:
            async with self._client().request(
                method, url, timeout=timeout, server_hostname=self.name, **kwargs
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            # One line: which peer, where, what failed; never aiohttp's repr.
            raise PeerUnavailable(
                self.name, f"{describe(exc)} ({method} {path})", self.address
            ) from exc
        return self._answer(method, path, status, raw)

    def _answer(self, method: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = None
        if status >= 400:
            if isinstance(data, dict):
                raise PeerRefused(
                    self.name,
                    status,
                    str(data.get("error", "error")),
                    str(data.get("reason", "")),
                )
            raise PeerRefused(self.name, status, "error", raw[:200].decode("utf-8", "replace"))
        if not isinstance(data, dict):
            raise PeerUnavailable(
                self.name, f"answer is not a JSON object ({method} {path})", self.address
            )
        return data
