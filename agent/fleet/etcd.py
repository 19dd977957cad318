"""A small async face over etcd3gw, etcd's own JSON gateway client, with endpoint failover.

etcd3gw is synchronous (requests), so every call runs in a worker thread, one at
a time per client: an agent makes a handful of requests per heartbeat, and a
single lock keeps the requests session from being used by two threads at once.
Every failure, whatever the endpoint said, becomes one `FleetUnavailable` line.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from agent.hostport import split_host_port

T = TypeVar("T")


class FleetUnavailable(Exception):
    """etcd could not answer (no endpoint reachable, or no quorum): one line, why."""


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


# Transaction pieces, in the gateway's JSON form (etcd's rpc.proto, keys base64).
def cmp_create(key: str, result: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "result": result, "create_revision": revision}


def cmp_mod(key: str, result: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "result": result, "mod_revision": revision}


def op_put(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = lease
    return {"request_put": put}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def op_range_prefix(prefix: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(prefix), "range_end": _prefix_end(prefix)}}


def op_range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def kvs_of(raw: Sequence[dict[str, Any]]) -> list[KV]:
    return [
        KV(
            key=base64.b64decode(item["key"]).decode(errors="replace"),
            value=base64.b64decode(item.get("value", "")),
            create_revision=int(item.get("create_revision", 0)),
            mod_revision=int(item.get("mod_revision", 0)),
            lease=int(item.get("lease", 0)),
        )
        for item in raw
    ]


def _why(exc: BaseException) -> str:
    """A few words: what the endpoint did, not the library's chain of wrappers."""
    detail = getattr(exc, "detail_text", None) or " ".join(str(a) for a in exc.args if a)
    text = (detail or type(exc).__name__).replace("\n", " ")
    if isinstance(exc, etcd_errors.ConnectionTimeoutError) or "timed out" in text:
        return "timed out"
    if isinstance(exc, etcd_errors.ConnectionFailedError):
        if "refused" in text:
            return "connection refused"
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            return "TLS handshake failed (check fleet.ca, fleet.cert, fleet.key)"
        if "leader" in text:
            return "no leader (no quorum)"
        return "connection failed"
    if "leader" in text:
        return "no leader (no quorum)"
    return text[:160]


def tls_session(ca: Path | None, cert: Path | None, key: Path | None) -> requests.Session:
    """A requests session that trusts exactly `ca` and presents cert/key.

    trust_env is off: with it, REQUESTS_CA_BUNDLE or a proxy variable in the agent's
    environment would silently replace the etcd CA or route etcd traffic elsewhere.
    """
    session = requests.Session()
    session.trust_env = False
    if ca is not None:
        session.verify = str(ca)
    if cert is not None and key is not None:
        session.cert = (str(cert), str(key))
    return session


class Etcd:
    """Async etcd operations over one of several endpoints; the last good one is tried first."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
        timeout: float,
    ) -> None:
        self.endpoints = list(endpoints)
        self._clients: list[Etcd3Client] = []
        for endpoint in self.endpoints:
            host, port = split_host_port(endpoint)
            self._clients.append(
                etcd3gw.client(
                    host=host,
                    port=port,
                    protocol="https" if ca is not None else "http",
                    timeout=timeout,
                    # No discovery round trip: every supported etcd (3.4+) serves /v3/.
                    api_path="/v3/",
                    session=tls_session(ca, cert, key),
                )
            )
        self._good = 0
        self._lock = threading.Lock()
        self.requests = 0  # every HTTP request sent, for the bench and metrics

    def _call(self, fn: Callable[[Etcd3Client], T]) -> T:
        with self._lock:
            errors = []
            order = [*range(self._good, len(self._clients)), *range(self._good)]
            for i in order:
                self.requests += 1
                try:
                    result = fn(self._clients[i])
                except (etcd_errors.Etcd3Exception, OSError, ValueError, KeyError) as exc:
                    errors.append(f"{self.endpoints[i]}: {_why(exc)}")
                    continue
                self._good = i
                return result
            raise FleetUnavailable("etcd unavailable (" + "; ".join(errors) + ")")

    async def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    # ------------------------------------------------------------------ operations

    async def grant(self, ttl: int) -> int:
        result = await self.call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": ttl}))
        return int(result["ID"])

    async def keepalive(self, lease: int) -> int:
        """The lease's new TTL, or -1 when it has already expired."""
        result = await self.call(
            lambda c: c.post(c.get_url("/lease/keepalive"), json={"ID": lease})
        )
        return int(result.get("result", {}).get("TTL", -1))

    async def revoke(self, lease: int) -> None:
        await self.call(lambda c: c.post(c.get_url("/lease/revoke"), json={"ID": lease}))

    async def put(self, key: str, value: bytes, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        await self.call(lambda c: c.post(c.get_url("/kv/put"), json=body))

    async def delete(self, key: str) -> None:
        body = {"key": _b64(key)}
        await self.call(lambda c: c.post(c.get_url("/kv/deleterange"), json=body))

    async def range_prefix(self, prefix: str) -> tuple[int, list[KV]]:
        """(store revision, every key under prefix)."""
        body = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        result = await self.call(lambda c: c.post(c.get_url("/kv/range"), json=body))
        return int(result.get("header", {}).get("revision", 0)), kvs_of(result.get("kvs", []))

    async def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> tuple[bool, list[list[KV]], int]:
        """(succeeded, the range results of the branch taken, store revision)."""
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        result = await self.call(lambda c: c.transaction(body))
        ranges = [
            kvs_of(r["response_range"].get("kvs", []))
            for r in result.get("responses", [])
            if "response_range" in r
        ]
        revision = int(result.get("header", {}).get("revision", 0))
        return bool(result.get("succeeded", False)), ranges, revision

    def close(self) -> None:
        for client in self._clients:
            client.session.close()
