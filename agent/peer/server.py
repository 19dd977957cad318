"""The peer API server: an aiohttp app wired to the migration engine's PeerHandlers.

Hardened against peers that misbehave, on purpose or not:
- at most `max_connections` connections at once, TLS handshakes in progress
  included; one more is dropped the moment it is accepted;
- a connection must complete its TLS handshake and send a whole request header
  within `header_timeout` seconds of being accepted, or it is closed; a
  keep-alive connection gets KEEPALIVE_TIMEOUT for its next whole header;
- an upload or JSON body that stops arriving for `idle_timeout` seconds is cut;
- a JSON body of the wrong shape gets 400 and one line naming the field
  (agent/peer/bodies.py); an unexpected failure gets 500 without its text,
  which goes to this agent's log.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agent.peer.api import (
    CHECK_PATH,
    DIGEST_HEADER,
    HEALTH_PATH,
    META_HEADER,
    MIGRATIONS_PATH,
    BodyTooLarge,
    HandlerError,
    PeerHandlers,
    valid_migration_id,
)
from agent.peer.bodies import (
    AbortBody,
    BodyShapeError,
    CheckBody,
    ImageMeta,
    PrepareBody,
    RestoreBody,
    StageBody,
    checked,
)
from agent.peer.tls import PEER_NAME_KEY, peer_identity_middleware

log = structlog.get_logger(__name__)

HANDLERS_KEY = web.AppKey("ferry_peer_handlers", PeerHandlers)
MAX_BODY_KEY = web.AppKey("ferry_peer_max_body", int)
IDLE_TIMEOUT_KEY = web.AppKey("ferry_peer_idle_timeout", float)
HOST_NAME_KEY = web.AppKey("ferry_peer_host_name", str)
# Connections accepted that have not yet sent a whole request header.
AWAITING_KEY = web.AppKey("ferry_peer_awaiting_header", set)

DEFAULT_MAX_JSON_BYTES = 1 << 20
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HEADER_TIMEOUT = 5.0
DEFAULT_IDLE_TIMEOUT = 60.0
KEEPALIVE_TIMEOUT = 30.0
# How much of an upload aiohttp buffers before it stops reading the socket
# (it reads up to twice this). Its default of 64 KiB capped uploads at ~135 MB/s
# on loopback: a wakeup and a small chunk per 64 KiB.
READ_BUFSIZE = 1 << 20
# blake3 for state streams (agent.archive_frames), sha256 for older agents' streams.
_DIGEST_RE = re.compile(r"^(sha256|blake3):[0-9a-f]{64}$")


def _error(status: int, error: str, reason: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status)


class UploadStalled(Exception):
    """Nothing arrived on an upload for the idle timeout."""


class RequestStream:
    """An upload body as async chunks, refusing more than `limit` bytes or a stalled sender."""

    def __init__(self, request: web.Request, limit: int, idle_timeout: float) -> None:
        self._content = request.content
        self._limit = limit
        self._idle = idle_timeout
        self.bytes_read = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            # Whatever has arrived, in one piece (at most about 2 * READ_BUFSIZE).
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                raise UploadStalled(f"upload stalled: nothing for {self._idle:g} s") from None
            if not chunk:
                return
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
    request.app[AWAITING_KEY].discard(request.protocol)  # a whole header arrived in time
    try:
        return await handler(request)
    except HandlerError as exc:
        return _error(exc.status, exc.error, exc.reason)
    except BodyShapeError as exc:
        return _error(400, "bad_request", str(exc))
    except UploadStalled as exc:
        resp = _error(408, "stalled", str(exc))
        resp.force_close()
        return resp
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
    except Exception:
        # The text may hold paths and internals: it goes to the log, not to the peer.
        log.exception("peer.handler_failed", path=request.path)
        return _error(500, "internal", f"internal error, see {request.app[HOST_NAME_KEY]}'s log")


async def _json_body(request: web.Request) -> dict[str, Any]:
    idle = request.app[IDLE_TIMEOUT_KEY]
    try:
        async with asyncio.timeout(idle):
            raw = await request.read()  # bounded by client_max_size
    except TimeoutError:
        raise UploadStalled(f"request body stalled: not whole after {idle:g} s") from None
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
    return RequestStream(request, limit, request.app[IDLE_TIMEOUT_KEY])


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
    body = checked(PrepareBody, await _json_body(request), "body")
    result = await request.app[HANDLERS_KEY].prepare(request[PEER_NAME_KEY], body)
    return web.json_response(result)


async def _check(request: web.Request) -> web.Response:
    body = checked(CheckBody, await _json_body(request), "body")
    result = await request.app[HANDLERS_KEY].check(request[PEER_NAME_KEY], body)
    return web.json_response(result)


async def _status(request: web.Request) -> web.Response:
    mid = _migration_id(request)
    return web.json_response(await request.app[HANDLERS_KEY].status(request[PEER_NAME_KEY], mid))


# Body shapes of the JSON actions; an action not listed only needs a JSON object.
_ACTION_BODIES: dict[str, Any] = {"stage": StageBody, "restore": RestoreBody, "abort": AbortBody}


def _json_action(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    shape = _ACTION_BODIES.get(name)

    async def route(request: web.Request) -> web.Response:
        mid = _migration_id(request)
        body = await _json_body(request)
        if shape is not None:
            body = checked(shape, body, "body")
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
    meta = checked(ImageMeta, meta, META_HEADER)
    stream = _upload_stream(request)
    handlers = request.app[HANDLERS_KEY]
    return await _run_upload(
        stream, handlers.receive_image(request[PEER_NAME_KEY], mid, stream, meta)
    )


async def _receive_state(request: web.Request) -> web.Response:
    mid = _migration_id(request)
    digest = request.headers.get(DIGEST_HEADER)
    if digest is not None and not _DIGEST_RE.match(digest):
        raise HandlerError(
            400,
            "bad_request",
            f"{DIGEST_HEADER} must be sha256:<64 hex digits> or blake3:<64 hex digits>",
        )
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
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    host_name: str = "this agent",
) -> web.Application:
    """The peer API. `max_body_bytes` bounds uploads, `max_json_bytes` every JSON body;
    a body with nothing new for `idle_timeout` seconds is cut."""
    app = web.Application(
        client_max_size=max_json_bytes,
        middlewares=[peer_identity_middleware(allowed_peers), _json_errors],
    )
    app[HANDLERS_KEY] = handlers
    app[MAX_BODY_KEY] = max_body_bytes
    app[IDLE_TIMEOUT_KEY] = idle_timeout
    app[HOST_NAME_KEY] = host_name
    app[AWAITING_KEY] = set()
    mig = MIGRATIONS_PATH + "/{migration_id}"
    app.router.add_get(HEALTH_PATH, _health)
    app.router.add_post(MIGRATIONS_PATH, _prepare)
    app.router.add_post(CHECK_PATH, _check)
    app.router.add_get(mig, _status)
    app.router.add_post(mig + "/stage", _json_action("stage"))
    app.router.add_put(mig + "/image", _receive_image)
    app.router.add_put(mig + "/state", _receive_state)
    app.router.add_post(mig + "/restore", _json_action("restore"))
    app.router.add_post(mig + "/commit", _json_action("commit"))
    app.router.add_post(mig + "/abort", _json_action("abort"))
    return app


class _ConnectionGate:
    """The listening socket's protocol factory: caps connections and bounds their first header.

    asyncio calls the factory for each accepted socket, before the TLS handshake;
    raising there makes it drop the socket at once, which is how one connection
    over the cap is refused. A connection counts from then until it closes, or,
    if its handshake never completes, until the header deadline passes.
    """

    def __init__(
        self, app: web.Application, server: web.Server, limit: int, header_timeout: float
    ) -> None:
        self._app = app
        self._server = server
        self.limit = limit
        self.header_timeout = header_timeout
        self.refused = 0
        # Accepted, handshake not done yet -> deadline. Strong references, held at most
        # until the deadline (aiohttp's handlers cannot be weakly referenced).
        self._pending: dict[RequestHandler, float] = {}

    def live(self, now: float) -> int:
        for handler, deadline in list(self._pending.items()):
            if handler.transport is not None or now >= deadline:
                self._pending.pop(handler, None)  # now in server.connections, or never will be
        return len(self._server.connections) + len(self._pending)

    def __call__(self) -> RequestHandler:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.live(now) >= self.limit:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("peer.connections_capped", limit=self.limit, refused=self.refused)
            raise ConnectionRefusedError(f"more than {self.limit} peer connections")
        handler = self._server()
        self._pending[handler] = now + self.header_timeout
        self._app[AWAITING_KEY].add(handler)
        loop.call_at(now + self.header_timeout, self._header_due, handler)
        return handler

    def _header_due(self, handler: RequestHandler) -> None:
        awaiting = self._app[AWAITING_KEY]
        if handler not in awaiting:
            return
        awaiting.discard(handler)
        transport = handler.transport
        if transport is not None:
            log.info("peer.header_timeout", timeout=self.header_timeout)
            transport.abort()  # no whole request header in time: slow or half-open client


@dataclass
class PeerServer:
    runner: web.AppRunner
    host: str
    port: int
    listener: asyncio.AbstractServer | None = None
    gate: _ConnectionGate | None = field(default=None, repr=False)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()  # no new connections
        # Shut the open connections down before waiting for them: from Python 3.12
        # wait_closed() waits for every connection, and peers keep theirs alive
        # with health polls, so waiting first hung `systemctl stop` until SIGKILL.
        await self.runner.cleanup()
        if self.listener is not None:
            close_clients = getattr(self.listener, "close_clients", None)  # Python >= 3.13
            if close_clients is not None:
                close_clients()  # any the runner did not own (refused by the gate)
            await self.listener.wait_closed()


async def start_peer_server(
    app: web.Application,
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    *,
    shutdown_timeout: float = 5.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> PeerServer:
    """Listen with mutual TLS. Port 0 picks a free port; the result says which."""
    if ssl_ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("the peer server needs an SSL context that requires client certificates")
    # lingering_time=0: after refusing a request, close instead of reading
    # (and waiting on) the rest of a body we do not want.
    # keepalive_timeout: an idle keep-alive connection, or one that sent only part
    # of its next request header, is closed after this; longer than aiohttp clients'
    # own 15 s, so a client never reuses a connection the server is just closing.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        lingering_time=0,
        read_bufsize=READ_BUFSIZE,
        keepalive_timeout=max(header_timeout, KEEPALIVE_TIMEOUT),
    )
    await runner.setup()
    assert runner.server is not None
    gate = _ConnectionGate(app, runner.server, max_connections, header_timeout)
    try:
        listener = await asyncio.get_running_loop().create_server(
            gate,
            host,
            port,
            ssl=ssl_ctx,
            ssl_handshake_timeout=header_timeout,
            reuse_address=True,
        )
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for sock in listener.sockets:
        bound_port = int(sock.getsockname()[1])
        break
    log.info("peer.server_started", host=host, port=bound_port, max_connections=max_connections)
    return PeerServer(runner, host, bound_port, listener, gate)
