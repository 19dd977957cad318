"""A PeerDirectory that polls each peer's /v1/health and remembers what it said."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent.model import Clock, PeerHealth, SystemClock
from agent.net_errors import describe, unreachable_line
from agent.peer import protocol
from agent.peer.client import PeerClient, PeerError, PeerTimeouts

if TYPE_CHECKING:
    from agent.config import PeerConfig

log = structlog.get_logger(__name__)


class HealthSource(Protocol):
    """One peer to poll; PeerClient is one."""

    name: str

    async def health(self) -> dict[str, Any]: ...


_NUMERIC = {
    "load1": float,
    "cpu_pressure": float,
    "mem_available_bytes": int,
    "disk_free_bytes": int,
    "running_containers": int,
    "weight": float,
}


def health_from_answer(name: str, answer: Mapping[str, Any]) -> PeerHealth:
    """Build PeerHealth from a health answer; unknown keys are ignored, wrong types refused."""
    values: dict[str, Any] = {}
    for key in ("draining", "overloaded"):
        if key in answer:
            if not isinstance(answer[key], bool):
                raise ValueError(f"{key} must be true or false, not {answer[key]!r}")
            values[key] = answer[key]
    for key, kind in _NUMERIC.items():
        if key in answer:
            value = answer[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, not {value!r}")
            values[key] = kind(value)
    if "tags" in answer:
        tags = answer["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags must be a list of strings")
        values["tags"] = tuple(tags)
    if "spread" in answer:
        spread = answer["spread"]
        if not isinstance(spread, list) or not all(isinstance(t, str) for t in spread):
            raise ValueError("spread must be a list of strings")
        values["spread"] = tuple(spread)
    values["protocol"] = protocol.of(answer)
    values["protocol_oldest"] = protocol.of(answer, protocol.OLDEST_KEY)
    return PeerHealth(name=name, reachable=True, **values)


def short_error(exc: BaseException) -> str:
    """What failed, without who and where: "connection refused", "timed out", ..."""
    if isinstance(exc, PeerError):
        return exc.what
    if isinstance(exc, ValueError):
        return f"bad health answer: {exc}"
    return describe(exc)


class _WithoutTLS:
    """Stands in for a peer's client when this host's TLS files could not be loaded,
    so the peer is listed with the reason instead of vanishing from `ferry status`."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def health(self) -> dict[str, Any]:
        raise RuntimeError("no TLS client (check tls.* files)")


class PeerHealthMonitor:
    """Polls every peer every `interval` seconds; `peers()` is the current view.

    A peer whose last good answer is older than `stale_after` counts as
    unreachable even if the poller itself is stuck, so placement never trusts
    an old "healthy". `weights` and `tags` are this host's configuration for
    the peers they name and win over what those peers answer.
    """

    def __init__(
        self,
        sources: Iterable[HealthSource],
        *,
        interval: float = 5.0,
        timeout: float | None = None,
        stale_after: float | None = None,
        weights: Mapping[str, float] | None = None,
        tags: Mapping[str, Sequence[str]] | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sources = list(sources)
        self.interval = interval
        self.timeout = timeout if timeout is not None else interval
        self.stale_after = stale_after if stale_after is not None else 3 * interval
        self._weights = dict(weights or {})
        self._tags = {name: tuple(t) for name, t in (tags or {}).items()}
        self._clock = clock or SystemClock()
        self._sleep = sleep
        self._state: dict[str, PeerHealth] = {
            s.name: PeerHealth(name=s.name, reachable=False, error="not polled yet")
            for s in self._sources
        }
        self._last_ok: dict[str, float] = {}
        self._owned: list[PeerClient] = []
        self._addresses: dict[str, str] = {
            s.name: str(getattr(s, "address", "")) for s in self._sources
        }

    @classmethod
    def for_peers(
        cls,
        peers: Sequence[PeerConfig],
        ssl_ctx: ssl.SSLContext | None,
        *,
        interval: float = 5.0,
        timeout: float = 3.0,
        clock: Clock | None = None,
    ) -> PeerHealthMonitor:
        """The agent's monitor: one mTLS client per configured peer, closed by `close()`."""
        clients = []
        sources: list[HealthSource] = []
        for peer in peers:
            if ssl_ctx is None:
                sources.append(_WithoutTLS(peer.name))
                continue
            client = PeerClient(
                peer.name, peer.address, ssl_ctx, PeerTimeouts(connect=timeout, request=timeout)
            )
            clients.append(client)
            sources.append(client)
        monitor = cls(
            sources,
            interval=interval,
            timeout=timeout,
            weights={p.name: p.weight for p in peers},
            tags={p.name: p.tags for p in peers},
            clock=clock,
        )
        monitor._owned = clients
        monitor._addresses.update({p.name: p.address for p in peers})
        return monitor

    def _line(self, name: str, reason: str) -> str:
        """The one line `ferry status` and the log both show for an unusable peer."""
        return unreachable_line(f"peer {name}", self._addresses.get(name), reason)

    def peers(self) -> list[PeerHealth]:
        now = self._clock.monotonic()
        out = []
        for source in self._sources:
            health = self._state[source.name]
            last_ok = self._last_ok.get(source.name)
            if health.reachable and last_ok is not None and now - last_ok > self.stale_after:
                health = dataclasses.replace(
                    health,
                    reachable=False,
                    error=self._line(source.name, f"no answer for {now - last_ok:.0f}s"),
                )
            if source.name in self._weights:
                health = dataclasses.replace(health, weight=self._weights[source.name])
            if source.name in self._tags:
                health = dataclasses.replace(health, tags=self._tags[source.name])
            out.append(health)
        return out

    async def poll_once(self) -> list[PeerHealth]:
        await asyncio.gather(*(self._poll(s) for s in self._sources))
        return self.peers()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await self.poll_once()
            await self._sleep(self.interval)

    async def close(self) -> None:
        """Close the clients `for_peers` made; sources passed in belong to the caller."""
        for client in self._owned:
            await client.close()

    async def _poll(self, source: HealthSource) -> None:
        try:
            answer = await asyncio.wait_for(source.health(), self.timeout)
            health = health_from_answer(source.name, answer)
        except Exception as exc:  # any failure means "not usable now", with why
            error = self._line(source.name, short_error(exc))
            previous = self._state[source.name]
            if previous.reachable or previous.error != error:
                log.warning("peer.unreachable", peer=source.name, error=error)
            self._state[source.name] = dataclasses.replace(previous, reachable=False, error=error)
            return
        if not self._state[source.name].reachable:
            log.info("peer.reachable", peer=source.name, draining=health.draining)
        self._state[source.name] = health
        self._last_ok[source.name] = self._clock.monotonic()
