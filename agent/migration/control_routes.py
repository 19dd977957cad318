"""`POST /v1/migrate` on the local control socket: progress as NDJSON, then the result.

Request: {"container": "...", "target": "peer-name"}; without "target" the
agent picks a peer that accepts the container through the normal placement.
Response lines, one JSON object each:
  {"type": "progress", "phase": ..., "message": ..., "bytes_done": ..., ...}
  {"type": "result", "ok": true, "report": {...}}
  {"type": "result", "ok": false, "kind": "refused"|"failed"|"error",
   "reason": "...", "rolled_back": bool, "in_doubt": bool, "bad_input": bool,
   "state_lost": "STATE LOST: ..."|null, "report": {...}|null}
A migration whose container runs on the target but was restarted there from
scratch ends with "ok": false and "state_lost" set.

`POST /v1/resolve` {"migration": id, "keep": "source"|"target"} ends an in-doubt
migration as an operator decided: {"ok": true, "result": "..."} or
{"ok": false, "reason": "..."} with status 409 (or 400 for bad input).

`POST /v1/check` {"container": ..., "target": optional} runs the eligibility
check and moves nothing: {"ok": true, "eligibility": {...}, "pick": peer or null}
(400 for an unknown container or peer).

The migration is not tied to the HTTP request: if the client goes away it
carries on (stopping midway would mean a rollback nobody asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from agent.migration.eligibility import Eligibility, refusal
from agent.migration.errors import MigrationFailed, MigrationRefused
from agent.migration.report import ProgressEvent

log = structlog.get_logger(__name__)

MIGRATE_PATH = "/v1/migrate"
RESOLVE_PATH = "/v1/resolve"
CHECK_PATH = "/v1/check"
_TASKS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("ferry_migrate_tasks")


class Migrates(Protocol):
    async def migrate(
        self, container: str, target: str, progress: Any = None, postcopy: bool = False
    ) -> Any: ...

    async def resolve(self, migration_id: str, keep: str) -> str: ...


Check = Callable[[str, str | None], Awaitable[Eligibility]]
Pick = Callable[[Eligibility], str | None]


async def choose_target(check: Check, pick: Pick, container: str) -> str:
    """The peer a migration without --to goes to; MigrationRefused when there is none."""
    verdict = await check(container, None)
    if not verdict.movable:
        raise refusal(verdict)
    target = pick(verdict)
    if target is None:
        accepting = ", ".join(verdict.accepting())
        raise MigrationRefused(f"placement chose none of the peers that accept it ({accepting})")
    return target


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    to_dict = getattr(report, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        return result if isinstance(result, dict) else None
    return report if isinstance(report, dict) else None


def result_line(outcome: Any) -> dict[str, Any]:
    """The final NDJSON line for a migration's result or exception."""
    if not isinstance(outcome, BaseException):
        report = _report_dict(outcome)
        lost = (report or {}).get("state_lost")
        # It runs on the target, restarted from scratch: not a success to report as one.
        return {"type": "result", "ok": not lost, "state_lost": lost, "report": report}
    reason = str(getattr(outcome, "reason", "") or outcome) or type(outcome).__name__
    if isinstance(outcome, MigrationRefused):
        kind = "refused"
    elif isinstance(outcome, MigrationFailed):
        kind = "failed"
    else:
        kind = "error"
        reason = f"{type(outcome).__name__}: {reason}"
    return {
        "type": "result",
        "ok": False,
        "kind": kind,
        "reason": reason,
        "rolled_back": bool(getattr(outcome, "rolled_back", False)),
        "in_doubt": bool(getattr(outcome, "in_doubt", False)),
        "state_lost": getattr(outcome, "state_lost", None),
        "bad_input": bool(getattr(outcome, "bad_input", False)),
        "report": _report_dict(getattr(outcome, "report", None)),
    }


async def _container_and_target(request: web.Request) -> tuple[str, str | None] | web.Response:
    """The {"container", "target" (optional)} body of /v1/migrate and /v1/check, or its 400."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    container, target = body.get("container"), body.get("target")
    if not isinstance(container, str) or not container:
        return web.json_response({"error": "container must be a non-empty string"}, status=400)
    if target is not None and (not isinstance(target, str) or not target):
        return web.json_response({"error": "target must be a non-empty string"}, status=400)
    return container, target


def add_migration_routes(
    app: web.Application,
    service: Migrates,
    check: Check | None = None,
    pick: Pick | None = None,
) -> None:
    app[_TASKS_KEY] = set()

    async def migrate(request: web.Request) -> web.StreamResponse:
        asked = await _container_and_target(request)
        if isinstance(asked, web.Response):
            return asked
        container, target = asked
        if target is None and check is not None and pick is not None:
            try:
                target = await choose_target(check, pick, container)
            except MigrationRefused as refused:
                status = 400 if refused.bad_input else 409
                return web.json_response({"error": refused.reason}, status=status)
        if not isinstance(target, str) or not target:
            return web.json_response({"error": "target must be a non-empty string"}, status=400)
        body = await request.json()  # aiohttp keeps the body: already read and checked above
        postcopy = body.get("postcopy", False)
        if not isinstance(postcopy, bool):
            return web.json_response({"error": "postcopy must be true or false"}, status=400)

        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def progress(event: ProgressEvent) -> None:
            queue.put_nowait({"type": "progress", **event.to_dict()})

        log.info("migration.requested", container=container, target=target, via="control")
        task = asyncio.get_running_loop().create_task(
            # Only when asked: an engine without post-copy keeps working.
            service.migrate(
                container, target, progress=progress, **({"postcopy": True} if postcopy else {})
            )
        )
        tasks: set[asyncio.Task[Any]] = request.app[_TASKS_KEY]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        connected = True

        async def send(line: dict[str, Any]) -> None:
            nonlocal connected
            if not connected:
                return
            try:
                await resp.write(json.dumps(line, default=str).encode() + b"\n")
            except (ConnectionError, RuntimeError):
                connected = False  # the migration goes on; only the watcher left

        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                await send(getter.result())
            else:
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
        while not queue.empty():
            await send(queue.get_nowait())
        if task.cancelled():
            await send(result_line(RuntimeError("the migration was cancelled (agent stopping)")))
        else:
            exc = task.exception()
            await send(result_line(exc if exc is not None else task.result()))
        if connected:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        return resp

    async def on_shutdown(app: web.Application) -> None:
        # A migration keeps running only as long as the agent does. On shutdown,
        # not cleanup: aiohttp waits for in-flight handlers (up to its shutdown
        # timeout, twice) between the two, and a migrate handler only returns when
        # its migration does, so a stop mid-migration outlasted TimeoutStopSec.
        running: set[asyncio.Task[Any]] = app[_TASKS_KEY]
        pending = list(running)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def resolve(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return web.json_response(
                {"ok": False, "reason": "body must be a JSON object"}, status=400
            )
        mid, keep = body.get("migration"), body.get("keep")
        if not isinstance(mid, str) or not mid or keep not in ("source", "target"):
            return web.json_response(
                {"ok": False, "reason": "need migration (string) and keep (source or target)"},
                status=400,
            )
        log.warning("migration.resolve_requested", migration=mid, keep=keep)
        try:
            result = await service.resolve(mid, keep)
        except MigrationRefused as exc:
            status = 400 if exc.bad_input else 409
            return web.json_response({"ok": False, "reason": exc.reason}, status=status)
        except MigrationFailed as exc:
            return web.json_response({"ok": False, "reason": exc.reason}, status=409)
        return web.json_response({"ok": True, "result": result})

    async def check_route(request: web.Request) -> web.Response:
        assert check is not None
        asked = await _container_and_target(request)
        if isinstance(asked, web.Response):
            return asked
        container, target = asked
        try:
            verdict = await check(container, target)
        except MigrationRefused as exc:
            return web.json_response({"error": exc.reason}, status=400 if exc.bad_input else 409)
        chosen = (
            target if target is not None else (pick(verdict) if pick and verdict.movable else None)
        )
        return web.json_response({"ok": True, "eligibility": verdict.to_dict(), "pick": chosen})

    if check is not None:
        app.router.add_post(CHECK_PATH, check_route)
    app.router.add_post(MIGRATE_PATH, migrate)
    app.router.add_post(RESOLVE_PATH, resolve)
    app.on_shutdown.append(on_shutdown)
