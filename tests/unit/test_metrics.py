"""Metrics on an injected registry, scraped over loopback HTTP."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.migration.errors import MigrationFailed
from agent.migration.report import MigrationReport
from agent.model import ContainerInfo
from agent.service.metrics import FerryMetrics, MetricsServer
from agent.service.migrations import MeteredMigrator
from tests.helpers import run_async


class FakeSignals:
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def value(self, name: str) -> float | None:
        return self.values.get(name)

    def names(self) -> list[str]:
        return list(self.values)

    def event_count(self, action: str, since: float) -> int:
        return 0

    def containers(self) -> list[ContainerInfo]:
        return []


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(metrics: FerryMetrics) -> str:
    async def go() -> str:
        server = MetricsServer(metrics, "127.0.0.1:0")
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{server.port}/metrics"
                async with session.get(url) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/plain")
                    return await resp.text()
        finally:
            await server.stop()

    return run_async(go())


def test_counters_histogram_policies_and_signals_over_http() -> None:
    signals = FakeSignals({"psi.cpu.some.avg10": 12.5, "marker.drain": 1.0})
    m = FerryMetrics(
        CollectorRegistry(),
        signals=signals,
        policy_states=lambda: {"maintenance": "firing", "overload": "ok"},
    )
    m.migration_started()
    m.migration_started()
    m.migration_succeeded(downtime_s=0.3, bytes_moved=1000)
    m.migration_failed(rolled_back=True, bytes_moved=10)

    got = _samples(_scrape(m))
    assert got[("ferry_migrations_started_total", ())] == 2
    assert got[("ferry_migrations_succeeded_total", ())] == 1
    assert got[("ferry_migrations_failed_total", ())] == 1
    assert got[("ferry_migrations_rolled_back_total", ())] == 1
    assert got[("ferry_migration_bytes_total", ())] == 1010
    assert got[("ferry_migration_downtime_seconds_count", ())] == 1
    assert got[("ferry_migration_downtime_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("ferry_migration_downtime_seconds_bucket", (("le", "0.25"),))] == 0
    assert got[("ferry_policy_state", (("policy", "maintenance"), ("state", "firing")))] == 1
    assert got[("ferry_policy_state", (("policy", "maintenance"), ("state", "ok")))] == 0
    assert got[("ferry_policy_state", (("policy", "overload"), ("state", "ok")))] == 1
    assert got[("ferry_signal_value", (("signal", "psi.cpu.some.avg10"),))] == 12.5
    assert got[("ferry_signal_value", (("signal", "marker.drain"),))] == 1.0

    # Read at scrape time: a change in the store shows up on the next scrape.
    signals.values["marker.drain"] = 0.0
    assert (
        _samples(m.render().decode())[("ferry_signal_value", (("signal", "marker.drain"),))] == 0.0
    )


def test_registries_are_independent_and_providers_bind_late() -> None:
    a = FerryMetrics(CollectorRegistry())
    b = FerryMetrics(CollectorRegistry())
    a.migration_started()
    assert _samples(b.render().decode())[("ferry_migrations_started_total", ())] == 0
    assert "ferry_signal_value{" not in a.render().decode()

    a.bind(signals=FakeSignals({"load.1": 3.0}), policy_states=lambda: {"p": "pending"})
    got = _samples(a.render().decode())
    assert got[("ferry_signal_value", (("signal", "load.1"),))] == 3.0
    assert got[("ferry_policy_state", (("policy", "p"), ("state", "pending")))] == 1


def test_broken_provider_does_not_break_scrape() -> None:
    def boom() -> dict[str, str]:
        raise RuntimeError("engine gone")

    m = FerryMetrics(CollectorRegistry(), policy_states=boom)
    assert b"ferry_migrations_started_total" in m.render()


class ReportingEngine:
    def __init__(self, outcome: MigrationReport | Exception) -> None:
        self.outcome = outcome

    async def migrate(self, container: str, target: str, progress: object = None) -> object:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_metered_migrator_reads_the_migration_report() -> None:
    registry = CollectorRegistry()
    metrics = FerryMetrics(registry)
    moved = MigrationReport("m1", "web", "a", "b", "succeeded", downtime_s=0.3, bytes_state=900)
    moved.bytes_image = 100
    lost = MigrationReport("m2", "web", "a", "b", "failed", bytes_state=10)
    failed = MigrationFailed("dump failed", rolled_back=True)
    failed.report = lost

    run_async(MeteredMigrator(ReportingEngine(moved), metrics).migrate("web", "b"))
    try:
        run_async(MeteredMigrator(ReportingEngine(failed), metrics).migrate("web", "b"))
    except MigrationFailed:
        pass
    else:
        raise AssertionError("the failure was swallowed")

    got = _samples(_scrape(metrics))
    assert got[("ferry_migrations_succeeded_total", ())] == 1
    assert got[("ferry_migrations_rolled_back_total", ())] == 1
    assert got[("ferry_migration_bytes_total", ())] == 1010  # bytes_moved of both
    assert got[("ferry_migration_downtime_seconds_sum", ())] == 0.3
