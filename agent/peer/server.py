"""The peer API server: an aiohttp app wired to the migration engine's PeerHandlers."""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from agent.peer.api import (
    DIGEST_HEADER,
    HEALTH_PATH,
    META_HEADER,
    MIGRATIONS_PATH,
    BodyTooLarge,
    HandlerError,
    PeerHandlers,
    valid_migration_id,
)
from agent.peer.tls import PEER_NAME_KEY, peer_identity_middleware

log = structlog.get_logger(__name__)

HANDLERS_KEY = web.AppKey("ferry_peer_handlers", PeerHandlers)
MAX_BODY_KEY = web.AppKey("ferry_peer_max_body", int)

DEFAULT_MAX_JSON_BYTES = 1 << 20
# How much of an upload aiohttp buffers before it stops reading the socket
# (it reads up to twice this). Its default of 64 KiB capped uploads at ~135 MB/s
# on loopback: a wakeup and a small chunk per 64 KiB.
READ_BUFSIZE = 1 << 20
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def _error(status: int, error: str, reason: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status)


class RequestStream:
    """An upload body as async chunks, refusing more than `limit` bytes."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self._content = request.content
        self._limit = limit
        self.bytes_read = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # Whatever has arrived, in one piece (at most about 2 * READ_BUFSIZE).
        async for chunk in self._content.iter_any():
            self.bytes_read += len(chunk)
            if self.bytes_read > self._limit:
                self.exceeded = True
                raise BodyTooLarge(f"upload exceeds the limit of {self._limit} bytes")
            yield chunk


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as {"error", "reason"} JSON, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except HandlerError as exc:
        return _error(exc.status, exc.error, exc.reason)
    except BodyTooLarge as exc:
        resp = _error(413, "too_large", str(exc))
        resp.force_close()  # rather than draining the rest of an oversized upload
        return resp
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, "too_large", exc.text or "request body too large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception as exc:
        log.exception("peer.handler_failed", path=request.path)
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # bounded by client_max_size
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise HandlerError(400, "bad_request", f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HandlerError(400, "bad_request", "body must be a JSON object")
    return body


def _migration_id(request: web.Request) -> str:
    migration_id = request.match_info["migration_id"]
    if not valid_migration_id(migration_id):
        raise HandlerError(400, "bad_request", f"invalid migration id {migration_id!r}")
    return migration_id


def _upload_stream(request: web.Request) -> RequestStream:
    limit = request.app[MAX_BODY_KEY]
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"upload of {length} bytes exceeds the limit of {limit} bytes")
    return RequestStream(request, limit)


async def _run_upload(stream: RequestStream, call: Awaitable[dict[str, Any]]) -> web.Response:
    # A handler may wrap the stream's BodyTooLarge in its own error; the
    # stream's flag still tells us the real cause.
    try:
        result = await call
    except Exception:
        if stream.exceeded:
            raise BodyTooLarge("upload exceeds the size limit") from None
        raise
    return web.json_response(result)


async def _health(request: web.Request) -> web.Response:
    return web.json_response(await request.app[HANDLERS_KEY].health())


async def _prepare(request: web.Request) -> web.Response:
    body = await _json_body(request)
    result = await request.app[HANDLERS_KEY].prepare(request[PEER_NAME_KEY], body)
    return web.json_response(result)


async def _status(request: web.Request) -> web.Response:
    mid = _migration_id(request)
    return web.json_response(await request.app[HANDLERS_KEY].status(request[PEER_NAME_KEY], mid))


def _json_action(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def route(request: web.Request) -> web.Response:
        mid = _migration_id(request)
        body = await _json_body(request)
        method = getattr(request.app[HANDLERS_KEY], name)
        return web.json_response(await method(request[PEER_NAME_KEY], mid, body))

    return route


async def _receive_image(request: web.Request) -> web.Response:
    mid = _migration_id(request)
    try:
        meta = json.loads(request.headers.get(META_HEADER, "{}"))
    except ValueError:
        raise HandlerError(400, "bad_request", f"{META_HEADER} is not JSON") from None
    if not isinstance(meta, dict):
        raise HandlerError(400, "bad_request", f"{META_HEADER} must be a JSON object")
    stream = _upload_stream(request)
    handlers = request.app[HANDLERS_KEY]
    return await _run_upload(
        stream, handlers.receive_image(request[PEER_NAME_KEY], mid, stream, meta)
    )


async def _receive_state(request: web.Request) -> web.Response:
    mid = _migration_id(request)
    digest = request.headers.get(DIGEST_HEADER)
    if digest is not None and not _DIGEST_RE.match(digest):
        raise HandlerError(400, "bad_request", f"{DIGEST_HEADER} must be sha256:<64 hex digits>")
    stream = _upload_stream(request)
    handlers = request.app[HANDLERS_KEY]
    return await _run_upload(
        stream, handlers.receive_state(request[PEER_NAME_KEY], mid, stream, digest)
    )


def make_peer_app(
    handlers: PeerHandlers,
    allowed_peers: Collection[str],
    max_body_bytes: int,
    *,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> web.Application:
    """The peer API. `max_body_bytes` bounds uploads, `max_json_bytes` every JSON body."""
    app = web.Application(
        client_max_size=max_json_bytes,
        middlewares=[peer_identity_middleware(allowed_peers), _json_errors],
    )
    app[HANDLERS_KEY] = handlers
    app[MAX_BODY_KEY] = max_body_bytes
    mig = MIGRATIONS_PATH + "/{migration_id}"
    app.router.add_get(HEALTH_PATH, _health)
    app.router.add_post(MIGRATIONS_PATH, _prepare)
    app.router.add_get(mig, _status)
    app.router.add_post(mig + "/stage", _json_action("stage"))
    app.router.add_put(mig + "/image", _receive_image)
    app.router.add_put(mig + "/state", _receive_state)
    app.router.add_post(mig + "/restore", _json_action("restore"))
    app.router.add_post(mig + "/commit", _json_action("commit"))
    app.router.add_post(mig + "/abort", _json_action("abort"))
    return app


@dataclass
class PeerServer:
    runner: web.AppRunner
    host: str
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_peer_server(
    app: web.Application,
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    *,
    shutdown_timeout: float = 5.0,
) -> PeerServer:
    """Listen with mutual TLS. Port 0 picks a free port; the result says which."""
    if ssl_ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("the peer server needs an SSL context that requires client certificates")
    # lingering_time=0: after refusing a request, close instead of reading
    # (and waiting on) the rest of a body we do not want.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        lingering_time=0,
        read_bufsize=READ_BUFSIZE,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            bound_port = int(addr[1])
            break
    log.info("peer.server_started", host=host, port=bound_port)
    return PeerServer(runner, host, bound_port)
