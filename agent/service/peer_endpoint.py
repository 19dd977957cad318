"""What this host tells its peers and what it refuses them: the peer API's runtime layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.model import SPREAD_LABEL, SignalView
from agent.peer import protocol


class DrainAwareHandlers:
    """Wraps the target-side peer handlers: report `draining`, refuse work while draining.

    The migration engine answers the peer API; whether this host is draining
    is the runtime's knowledge (the marker file), so it is added here instead
    of teaching the engine about markers.
    """

    def __init__(
        self,
        inner: Any,
        draining: Callable[[], bool],
        drain_reason: Callable[[], str | None],
        base_health: Callable[[], dict[str, Any]],
    ) -> None:
        self._inner = inner
        self._draining = draining
        self._drain_reason = drain_reason
        self._base_health = base_health

    async def health(self) -> dict[str, Any]:
        health = dict(self._base_health())
        inner = getattr(type(self._inner), "health", None)
        if inner is not None:
            health.update(await self._inner.health())
        # Memory already promised to incoming migrations is not available to placement.
        reserved = health.get("reserved_memory_bytes")
        if isinstance(reserved, int) and reserved > 0 and health.get("mem_available_bytes"):
            health["mem_available_bytes"] = max(int(health["mem_available_bytes"]) - reserved, 0)
        health["draining"] = self._draining()
        return health

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._draining():
            from agent.peer.api import HandlerError

            why = self._drain_reason()
            raise HandlerError(
                503, "draining", f"this host is draining{f' ({why})' if why else ''}"
            )
        result: dict[str, Any] = await self._inner.prepare(peer, body)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def local_health(name: str, store: SignalView, draining: bool, overloaded: bool) -> dict[str, Any]:
    """This host's health document for peers, from the signal store."""

    def val(signal: str, default: float = 0.0) -> float:
        v = store.value(signal)
        return default if v is None else float(v)

    cpu = store.value("psi.cpu.some.avg10")
    if cpu is None:
        cpu = val("load.per_core.1")
    return {
        "name": name,
        "draining": draining,
        "overloaded": overloaded,
        "load1": val("load.1"),
        "cpu_pressure": float(cpu),
        "mem_available_bytes": int(val("mem.available_bytes")),
        "disk_free_bytes": int(val("disk.docker.free_bytes")),
        "running_containers": int(val("containers.running")),
        protocol.KEY: protocol.PROTOCOL,
        protocol.OLDEST_KEY: protocol.OLDEST,
        # Replicas here, so a peer never places a second one of the same service here.
        "spread": sorted(
            {
                c.labels[SPREAD_LABEL]
                for c in store.containers()
                if c.state == "running" and c.labels.get(SPREAD_LABEL)
            }
        ),
    }
