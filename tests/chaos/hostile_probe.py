"""A hostile peer: speaks the peer API with a real peer certificate, and misbehaves.

Run inside a testbed host's network namespace:
`python -m tests.chaos.hostile_probe REQUEST.json` prints one JSON object.

Every mode talks to `address` as the peer whose certificate it holds. Modes:
  stage     prepare, then stage `spec` (e.g. privileged); the stage answer or refusal
  image     prepare (image not there), upload the docker-save archive at `archive`
            declaring `image_id`, then stage `spec` if given, then abort
  states    for each archive file in `archives`: prepare, stage `spec`, upload it
  shapes    POST each (path, body) of `posts`; statuses and reasons
  slow      open `raw` connections that never handshake and `half` that send half a
            header; report how many were closed within 1 s and when the last closed
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.peer.api import MIGRATIONS_PATH, migration_path
from agent.peer.client import PeerClient, PeerError, PeerRefused, PeerTimeouts
from agent.peer.tls import client_context

CHUNK = 1 << 20


def _ctx(req: dict[str, Any]) -> ssl.SSLContext:
    return client_context(Path(req["ca"]), Path(req["cert"]), Path(req["key"]))


def _peer(req: dict[str, Any]) -> PeerClient:
    return PeerClient(
        req["target_name"], req["address"], _ctx(req), PeerTimeouts(connect=5, request=30)
    )


async def _file(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


async def _call(coro: Any) -> dict[str, Any]:
    """The answer, or the refusal as {"status", "error", "reason"}."""
    try:
        answer: dict[str, Any] = await coro
        return {"ok": answer}
    except PeerRefused as exc:
        return {"status": exc.status, "error": exc.error, "reason": exc.reason}
    except PeerError as exc:
        return {"broken": str(exc)}


def _prepare_body(req: dict[str, Any], mid: str, **extra: Any) -> dict[str, Any]:
    spec = req["spec"]
    return {
        "migration_id": mid,
        "container_id": spec["id"],
        "name": spec["name"],
        "image_id": spec["image_id"],
        "memory_bytes": 1 << 20,
        "state_bytes_estimate": 1 << 20,
        **extra,
    }


async def stage(req: dict[str, Any]) -> dict[str, Any]:
    mid = req["migration_id"]
    async with _peer(req) as peer:
        out = {"prepare": await _call(peer.post_json(MIGRATIONS_PATH, _prepare_body(req, mid)))}
        out["stage"] = await _call(
            peer.post_json(migration_path(mid, "stage"), {"spec": req["spec"]})
        )
        out["abort"] = await _call(peer.post_json(migration_path(mid, "abort"), {}))
        out["status"] = await _call(peer.get_json(migration_path(mid)))
    return out


async def image(req: dict[str, Any]) -> dict[str, Any]:
    mid = req["migration_id"]
    size = Path(req["archive"]).stat().st_size
    async with _peer(req) as peer:
        body = _prepare_body(req, mid, image_id=req["image_id"], image_bytes=size)
        out = {"prepare": await _call(peer.post_json(MIGRATIONS_PATH, body))}
        meta = {"image_id": req["image_id"], "image": req.get("image_ref", "")}
        out["image"] = await _call(peer.upload_image(mid, _file(req["archive"]), meta))
        if req.get("stage") and "ok" in out["image"]:
            spec = req["spec"]
            out["stage"] = await _call(peer.post_json(migration_path(mid, "stage"), {"spec": spec}))
        out["abort"] = await _call(peer.post_json(migration_path(mid, "abort"), {}))
    return out


async def states(req: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with _peer(req) as peer:
        for i, archive in enumerate(req["archives"]):
            mid = f"{req['migration_id']}-{i}"
            one = {"prepare": await _call(peer.post_json(MIGRATIONS_PATH, _prepare_body(req, mid)))}
            stage_body = {"spec": req["spec"]}
            one["stage"] = await _call(peer.post_json(migration_path(mid, "stage"), stage_body))
            t0 = time.monotonic()
            one["state"] = await _call(peer.upload_state(mid, _file(archive)))
            one["state_s"] = round(time.monotonic() - t0, 3)
            one["status"] = await _call(peer.get_json(migration_path(mid)))
            out[Path(archive).name] = one
    return out


async def shapes(req: dict[str, Any]) -> dict[str, Any]:
    out = []
    async with _peer(req) as peer:
        for path, body in req["posts"]:
            out.append(await _call(peer.post_json(path, body)))
    return {"answers": out}


async def slow(req: dict[str, Any]) -> dict[str, Any]:
    host, _, port = req["address"].rpartition(":")
    ctx = _ctx(req)
    t0 = time.monotonic()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    # Half a header first, while there is room; then connections that never handshake.
    half_ok = 0
    for _ in range(req["half"]):
        try:
            r, w = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname=req["target_name"]
            )
        except (OSError, ssl.SSLError):
            continue  # refused over the cap; the test compares half_ok with what it asked
        w.write(b"POST /v1/migrations HTTP/1.1\r\nHost: x\r\nContent-Le")
        await w.drain()
        conns.append((r, w))
        half_ok += 1
    for _ in range(req["raw"]):
        conns.append(await asyncio.open_connection(host, int(port)))

    async def closed_at(r: asyncio.StreamReader) -> float | None:
        try:
            async with asyncio.timeout(req["wait_s"]):
                while await r.read(65536):
                    pass
        except TimeoutError:
            return None
        except (OSError, ssl.SSLError):
            pass
        return time.monotonic() - t0

    times = await asyncio.gather(*(closed_at(r) for r, _ in conns))
    for _, w in conns:
        w.close()
    closed = [t for t in times if t is not None]
    return {
        "opened": len(conns),
        "half_ok": half_ok,
        "closed": len(closed),
        "closed_within_1s": sum(1 for t in closed if t <= 1.0),
        "last_closed_s": max(closed) if closed else None,
    }


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    modes = {"stage": stage, "image": image, "states": states, "shapes": shapes, "slow": slow}
    print(json.dumps(asyncio.run(modes[req["mode"]](req))))


if __name__ == "__main__":
    main()
