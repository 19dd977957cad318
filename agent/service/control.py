"""The local control socket: a small JSON API over a unix socket, and its client.

Access control is the filesystem: the socket is 0600 in a 0700 directory we
create, both owned by the agent's user (root), so only root can drain the host
or start migrations. There is no token to leak and nothing listens on the
network.

Routes (all JSON):
  GET  /v1/status            this host's signals, policies, migrations, evacuation, peers
  POST /v1/drain             {"reason": "..."} -> create the drain marker
  POST /v1/undrain           remove the drain marker
  GET  /v1/history?limit=N   past migrations with their reports

Other parts add their own routes through `route_hooks`, e.g. the migration
engine's `add_migration_routes(app, service)`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web

from agent.errors import one_line
from agent.net_errors import describe, unreachable_line

log = structlog.get_logger(__name__)

RouteHook = Callable[[web.Application], None]
JSON = dict[str, Any]

MAX_REASON_CHARS = 500
MAX_HISTORY = 10_000


class ControlService(Protocol):
    """What the control socket asks of the running agent."""

    async def status(self) -> JSON: ...

    async def drain(self, reason: str) -> JSON: ...

    async def undrain(self) -> JSON: ...

    async def history(self, limit: int) -> list[JSON]: ...


class ControlRefused(Exception):
    """The agent will not do this now; the message says why (answered 503, one line)."""


class AlreadyServing(RuntimeError):
    """Another process answers on the control socket: a second agent must not start."""


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def history_limit(raw: str) -> int | None:
    """`limit` as given in the query, or None when it is not a whole number in range."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_HISTORY)):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_HISTORY else None


@web.middleware
async def _no_exception_text(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A bug behind a route answers 500 with one line; the details go to the log only."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("control.request_failed", method=request.method, path=request.path)
        return _json_error(
            500,
            f"the agent failed to answer {request.method} {one_line(request.path[:100])}; "
            "see its log",
        )


def build_app(service: ControlService, route_hooks: Sequence[RouteHook] = ()) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(await service.status(), dumps=_dumps)

    async def drain(request: web.Request) -> web.Response:
        body = await _read_json(request)
        if body is None:
            return _json_error(400, 'body must be a JSON object, e.g. {"reason": "kernel"}')
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            return _json_error(400, f"reason must be a string of at most {MAX_REASON_CHARS} chars")
        log.info("control.drain", reason=reason)
        try:
            result = await service.drain(reason)
        except ControlRefused as exc:
            return _json_error(503, str(exc))
        return web.json_response(result, dumps=_dumps)

    async def undrain(request: web.Request) -> web.Response:
        log.info("control.undrain")
        return web.json_response(await service.undrain(), dumps=_dumps)

    async def history(request: web.Request) -> web.Response:
        raw = request.query.get("limit", "50")
        limit = history_limit(raw)
        if limit is None:
            return _json_error(
                400,
                f"limit must be a whole number from 1 to {MAX_HISTORY}, got {one_line(raw[:40])!r}",
            )
        items = await service.history(limit)
        return web.json_response({"migrations": items}, dumps=_dumps)

    app = web.Application(middlewares=[_no_exception_text])
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/drain", drain)
    app.router.add_post("/v1/undrain", undrain)
    app.router.add_get("/v1/history", history)
    for hook in route_hooks:
        hook(app)
    return app


def _dumps(obj: Any) -> str:
    # Reports carry paths, datetimes and enums; show them rather than fail the request.
    return json.dumps(obj, default=str)


async def _read_json(request: web.Request) -> JSON | None:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _prepare_directory(directory: Path) -> None:
    """Create the socket's directory 0700; leave an existing one's mode alone.

    An existing directory may be shared (e.g. /run); tightening its mode would
    break other services, so there the 0600 socket mode is what protects us.
    """
    if directory.exists():
        return
    directory.mkdir(mode=0o700, parents=True)
    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket from a crashed agent, but never steal a live one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            f"{path} exists and is not a socket; remove it or change control_socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("control.stale_socket_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AlreadyServing(f"another ferry agent is serving on {path}")


def _bind_private(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from the moment it exists, not after a
    # window in which another user could connect.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


class ControlServer:
    def __init__(
        self,
        path: Path,
        service: ControlService,
        route_hooks: Sequence[RouteHook] = (),
    ) -> None:
        self.path = Path(path)
        self._app = build_app(service, route_hooks)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        _prepare_directory(self.path.parent)
        remove_stale_socket(self.path)
        sock = _bind_private(self.path)
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("control.serving", path=str(self.path))

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --------------------------------------------------------------------------- client


class AgentUnreachable(Exception):
    """No agent answers on the control socket (not running, or no permission)."""


_NOT_RUNNING_HINT = " (is `ferry run` running?)"


def agent_down_line(path: Path, exc: BaseException | None = None) -> str:
    """'agent at /run/ferry/ferry.sock: connection refused (is `ferry run` running?)'."""
    if exc is None:
        reason = "no socket" + _NOT_RUNNING_HINT
    elif isinstance(exc, PermissionError) or (
        isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, PermissionError)
    ):
        reason = "permission denied (run as root)"
    else:
        reason = describe(exc)
        if reason in ("connection refused", "no such socket"):
            reason += _NOT_RUNNING_HINT
    return unreachable_line("agent", str(path), reason)


class ControlRequestFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlClient:
    """Talks to a running agent over its control socket: the CLI's one client.

    Every call goes through `open`, so a missing socket, a refused connection
    or a dropped stream is always the same one-line `AgentUnreachable`.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    @contextlib.asynccontextmanager
    async def open(
        self,
        method: str,
        route: str,
        body: JSON | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The raw response, for callers that read it themselves (a stream, say).

        Connection errors raised while the caller reads it are mapped too.
        """
        if not self.path.exists():
            raise AgentUnreachable(agent_down_line(self.path))
        connector = aiohttp.UnixConnector(path=str(self.path))
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=timeout or self._timeout
                ) as session,
                session.request(method, f"http://ferry{route}", json=body) as resp,
            ):
                yield resp
        except (OSError, aiohttp.ClientError) as exc:  # OSError: PermissionError, TimeoutError
            raise AgentUnreachable(agent_down_line(self.path, exc)) from exc

    async def request(self, method: str, route: str, body: JSON | None = None) -> Any:
        async with self.open(method, route, body) as resp:
            try:
                data = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                data = {"error": (await resp.text())[:200]}
            if resp.status >= 400:
                msg = data.get("error") if isinstance(data, dict) else None
                raise ControlRequestFailed(resp.status, msg or f"HTTP {resp.status}")
            return data

    async def status(self) -> JSON:
        result: JSON = await self.request("GET", "/v1/status")
        return result

    async def drain(self, reason: str) -> JSON:
        result: JSON = await self.request("POST", "/v1/drain", {"reason": reason})
        return result

    async def undrain(self) -> JSON:
        result: JSON = await self.request("POST", "/v1/undrain", {})
        return result

    async def history(self, limit: int) -> list[JSON]:
        result = await self.request("GET", f"/v1/history?limit={int(limit)}")
        items: list[JSON] = result.get("migrations", [])
        return items
