"""Talks to a peer agent's API as a (possibly hostile) client; run inside a testbed host's netns.

`python -m tests.e2e.peer_probe REQUEST.json` prints one JSON object with what happened.
Modes:
  health      GET /v1/health with the given cert (or none), report status or the TLS error
  bad-archive prepare + stage a real spec, upload an archive with a `../` entry, ask restore
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import ssl
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import zstandard

from agent.peer.api import HEALTH_PATH, MIGRATIONS_PATH, migration_path
from agent.peer.client import PeerClient, PeerError, PeerRefused
from agent.peer.tls import client_context


def _raw_context(ca: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.check_hostname = False
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def health(req: dict[str, Any]) -> dict[str, Any]:
    ctx = _raw_context(req["ca"], req.get("cert"), req.get("key"))
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
            session.get(
                f"https://{req['address']}{HEALTH_PATH}", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp,
        ):
            return {"status": resp.status, "body": (await resp.text())[:300]}
    except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
        return {"status": None, "error": repr(exc)[:300]}


def hostile_archive(escape_name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("checkpoint", "upper"):
            d = tarfile.TarInfo(name)
            d.type = tarfile.DIRTYPE
            d.mode = 0o755
            tar.addfile(d)
        data = b"written outside\n"
        evil = tarfile.TarInfo(f"checkpoint/../../../../../../{escape_name}")
        evil.size = len(data)
        tar.addfile(evil, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(buf.getvalue())


async def bad_archive(req: dict[str, Any]) -> dict[str, Any]:
    ctx = client_context(Path(req["ca"]), Path(req["cert"]), Path(req["key"]))
    mid = req["migration_id"]
    spec = req["spec"]
    out: dict[str, Any] = {}
    async with PeerClient(req["target_name"], req["address"], ctx) as peer:
        out["prepare"] = await peer.post_json(
            MIGRATIONS_PATH,
            {
                "migration_id": mid,
                "container_id": spec["id"],
                "name": spec["name"],
                "image_id": spec["image_id"],
                "memory_bytes": 1 << 20,
                "state_bytes_estimate": 1 << 20,
            },
        )
        out["stage"] = await peer.post_json(migration_path(mid, "stage"), {"spec": spec})
        archive = hostile_archive(req["escape_name"])
        digest = f"sha256:{hashlib.sha256(archive).hexdigest()}"

        async def chunks() -> Any:
            yield archive

        try:
            out["state"] = await peer.upload_state(mid, chunks(), digest)
        except PeerRefused as exc:
            # Refused while it arrived: the target ended the migration at once.
            out["state_refused"] = {"status": exc.status, "error": exc.error, "reason": exc.reason}
            out["status"] = await peer.get_json(migration_path(mid))
            return out
        try:
            out["restore"] = await peer.post_json(
                migration_path(mid, "restore"), {"digest": digest, "checkpoint": f"ferry-{mid}"}
            )
        except PeerRefused as exc:
            out["restore_refused"] = {
                "status": exc.status,
                "error": exc.error,
                "reason": exc.reason,
            }
        except PeerError as exc:
            out["restore_error"] = str(exc)
        out["status"] = await peer.get_json(migration_path(mid))
    return out


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    fn = {"health": health, "bad-archive": bad_archive}[req["mode"]]
    print(json.dumps(asyncio.run(fn(req))))


if __name__ == "__main__":
    main()
