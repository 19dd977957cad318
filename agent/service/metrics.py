"""Prometheus metrics for the agent.

Everything registers on a `CollectorRegistry` passed in by the caller, never
on prometheus_client's process-wide default: tests (and two agents in one
process, as the e2e tests run them) each get their own numbers.

Policy states and signal values are read at scrape time by custom collectors
from providers the runtime binds, so a scrape always shows the engine's and
the store's current view and nothing goes stale when a policy is removed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from agent.hostport import split_host_port
from agent.model import SignalView

log = structlog.get_logger(__name__)

POLICY_STATES = ("ok", "pending", "firing", "cooling_down")

# Downtime is the frozen window of a live migration: sub-second is the goal,
# tens of seconds is a large container on a slow link.
DOWNTIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

PolicyStateProvider = Callable[[], Mapping[str, str]]


class _PolicyStateCollector(Collector):
    def __init__(self, owner: FerryMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ferry_policy_state",
            "1 for the state each policy is in now, 0 for the others",
            labels=["policy", "state"],
        )
        provider = self._owner.policy_states
        states = _safe_call(provider, "metrics.policy_states_failed") if provider else None
        for policy, current in sorted((states or {}).items()):
            known = POLICY_STATES if current in POLICY_STATES else (*POLICY_STATES, current)
            for state in known:
                family.add_metric([policy, state], 1.0 if state == current else 0.0)
        yield family


class _InDoubtCollector(Collector):
    def __init__(self, owner: FerryMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ferry_migrations_in_doubt",
            "Migrations committed here whose target has not confirmed: the container runs "
            "nowhere until resolved (ferry resolve)",
        )
        provider = self._owner.in_doubt
        count = _safe_call(provider, "metrics.in_doubt_failed") if provider else None
        family.add_metric([], float(count or 0))
        yield family


class _SignalCollector(Collector):
    def __init__(self, owner: FerryMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ferry_signal_value", "Latest value of each signal in the store", labels=["signal"]
        )
        store = self._owner.signals
        if store is not None:
            names = _safe_call(store.names, "metrics.signal_names_failed") or []
            for name in sorted(names):
                value = store.value(name)
                if value is not None and not math.isnan(value):
                    family.add_metric([name], float(value))
        yield family


def _safe_call(fn: Callable[[], Any], event: str) -> Any:
    # A broken provider must not turn every scrape into a 500.
    try:
        return fn()
    except Exception as exc:  # logged; the scrape continues
        log.warning(event, error=repr(exc))
        return None


class FerryMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        signals: SignalView | None = None,
        policy_states: PolicyStateProvider | None = None,
    ) -> None:
        self.registry = registry
        self.signals = signals
        self.policy_states = policy_states
        self.in_doubt: Callable[[], int] | None = None
        self.migrations_started = Counter(
            "ferry_migrations_started",
            "Migrations this agent started as the source",
            registry=registry,
        )
        self.migrations_succeeded = Counter(
            "ferry_migrations_succeeded",
            "Migrations that completed with the container running on the target",
            registry=registry,
        )
        self.migrations_failed = Counter(
            "ferry_migrations_failed",
            "Migrations that did not complete (refused before the freeze or failed after)",
            registry=registry,
        )
        self.migrations_rolled_back = Counter(
            "ferry_migrations_rolled_back",
            "Failed migrations whose container was restored running on this host",
            registry=registry,
        )
        self.migrations_state_lost = Counter(
            "ferry_migrations_state_lost",
            "Migrations after which the container did not keep its state: restarted from "
            "scratch, or left stopped because its checkpoint could not be restored",
            registry=registry,
        )
        self.downtime = Histogram(
            "ferry_migration_downtime_seconds",
            "Time a migrated container was frozen (checkpoint to restore)",
            buckets=DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.all_pages_in = Histogram(
            "ferry_migration_all_pages_in_seconds",
            "Post-copy: freeze start until the target had every memory page "
            "(downtime ends earlier, when it starts running)",
            buckets=DOWNTIME_BUCKETS,
            registry=registry,
        )
        self.bytes_moved = Counter(
            "ferry_migration_bytes",
            "Bytes of checkpoint and filesystem data sent to peers",
            registry=registry,
        )
        registry.register(_PolicyStateCollector(self))
        registry.register(_SignalCollector(self))
        registry.register(_InDoubtCollector(self))

    def bind(
        self,
        signals: SignalView | None = None,
        policy_states: PolicyStateProvider | None = None,
        in_doubt: Callable[[], int] | None = None,
    ) -> None:
        """Attach providers built after the metrics (the runtime wires parts in order)."""
        if in_doubt is not None:
            self.in_doubt = in_doubt
        if signals is not None:
            self.signals = signals
        if policy_states is not None:
            self.policy_states = policy_states

    def migration_started(self) -> None:
        self.migrations_started.inc()

    def migration_succeeded(
        self,
        downtime_s: float | None,
        bytes_moved: int | None,
        all_pages_in_s: float | None = None,
    ) -> None:
        self.migrations_succeeded.inc()
        if downtime_s is not None:
            self.downtime.observe(downtime_s)
        if all_pages_in_s is not None:
            self.all_pages_in.observe(all_pages_in_s)
        if bytes_moved:
            self.bytes_moved.inc(bytes_moved)

    def migration_failed(
        self, rolled_back: bool, bytes_moved: int | None = None, state_lost: bool = False
    ) -> None:
        self.migrations_failed.inc()
        if rolled_back:
            self.migrations_rolled_back.inc()
        if state_lost:
            self.migrations_state_lost.inc()
        if bytes_moved:
            self.bytes_moved.inc(bytes_moved)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics with aiohttp on the agent's own loop (no extra thread)."""

    def __init__(self, metrics: FerryMetrics, listen: str) -> None:
        self._metrics = metrics
        host, self._port = split_host_port(listen)
        self._host = host or "0.0.0.0"  # ":9464" is every interface
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port; differs from the configured one when that was 0."""
        if self._runner is None:
            raise RuntimeError("metrics server is not started")
        for addr in self._runner.addresses:
            return int(addr[1])
        raise RuntimeError("metrics server has no bound address")

    async def _handle(self, request: web.Request) -> web.Response:
        body = self._metrics.render()
        # CONTENT_TYPE_LATEST carries the charset; aiohttp wants it in the header raw.
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        log.info("metrics.serving", host=self._host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
