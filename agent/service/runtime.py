"""`ferry run`: assemble the agent from its parts, serve, and shut down cleanly.

Start order: config -> logging -> prerequisites -> journal -> signals -> peers
-> migration engine (+ reconcile) -> actions and policy engine -> peer server
-> control socket -> metrics -> READY. Shutdown runs the same list backwards;
every task is cancelled and awaited and every thread the parts started is
stopped before `run` returns.

While the drain marker exists this host reports `draining: true` on its health
endpoint and refuses incoming migrations; when it is removed it accepts again
and stops retrying containers it could not evacuate.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.config import FerryConfig, load_config
from agent.errors import InputError
from agent.logging import configure_logging
from agent.model import Clock, PeerDirectory, SignalSource, SystemClock
from agent.peer.health import PeerHealthMonitor
from agent.policy.actions import ActionRegistry
from agent.policy.engine import EngineLimits, PolicyEngine
from agent.policy.loader import load_policies
from agent.policy.models import MIGRATING_ACTIONS
from agent.service.control import (
    AlreadyServing,
    ControlServer,
    RouteHook,
    remove_stale_socket,
)
from agent.service.evacuation import EvacuateAction, Evacuator, MoveAction
from agent.service.metrics import FerryMetrics, MetricsServer
from agent.service.notify import Notifier
from agent.service.prereqs import fatal, run_prereqs
from agent.signals import SignalStore, build_default_sources
from agent.signals.command import CommandMonitorSpec
from agent.signals.runner import run_sources

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3
TICK_SECONDS = 1.0


class StartupRefused(Exception):
    """Fatal prerequisite problems: `ferry run` prints them and exits 3."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


# ---------------------------------------------------------------------- glue
# Adapters between parts written separately. Each says which gap it covers.


@dataclass
class MigrationParts:
    """What the runtime needs from the migration engine, however it is built."""

    migrator: Any  # .migrate(container, target, progress=None) -> report
    handlers: Any  # agent.peer.api.PeerHandlers for the target side, or None
    journal: Any = None  # agent.journal.Journal
    route_hooks: list[RouteHook] = field(default_factory=list)
    reconcile: Callable[[], Awaitable[Any]] | None = None
    close: Callable[[], Awaitable[None] | None] | None = None


class MigrationUnavailable(Exception):
    """Raised by the stand-in migrator when no migration engine is installed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoMigrations:
    """Stand-in used when agent.migration is not importable: health works, moves are refused."""

    def migrate(self, container: str, target: str, progress: Any = None) -> Any:
        raise MigrationUnavailable("the migration engine (agent.migration) is not installed")

    async def prepare(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        from agent.peer.api import HandlerError

        raise HandlerError(503, "unavailable", "this agent has no migration engine")

    def __getattr__(self, name: str) -> Any:
        async def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
            from agent.peer.api import HandlerError

            raise HandlerError(503, "unavailable", "this agent has no migration engine")

        return refuse


def build_migration(owner: Agent) -> MigrationParts:
    from agent.journal import Journal

    journal = Journal(owner.config.state_dir)
    if importlib.util.find_spec("agent.migration") is None:
        log.warning("agent.migration_engine_missing")
        stand_in = _NoMigrations()
        return MigrationParts(stand_in, stand_in, journal, close=journal.close)
    return _build_real_migration(owner, journal)


def _build_real_migration(owner: Agent, journal: Any) -> MigrationParts:
    # Not agent.migration.factory.runtime_parts: its control route would call the
    # engine directly, and `ferry migrate` runs must be counted in the metrics too.
    from agent.migration.control_routes import add_migration_routes
    from agent.migration.factory import build_service

    service = build_service(
        owner.config, journal, owner.draining, owner.clock, adapter=owner.docker
    )

    def routes(app: Any) -> None:
        add_migration_routes(app, owner.migrator or service)

    async def close() -> None:
        await service.close()
        journal.close()

    return MigrationParts(
        migrator=service,
        handlers=service.handlers,
        journal=journal,
        route_hooks=[routes],
        reconcile=service.reconcile,
        close=close,
    )


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


def local_health(agent: Agent) -> dict[str, Any]:
    """This host's health document for peers, from the signal store."""
    store = agent.store

    def val(name: str, default: float = 0.0) -> float:
        v = store.value(name) if store is not None else None
        return default if v is None else float(v)

    cpu = store.value("psi.cpu.some.avg10") if store is not None else None
    if cpu is None:
        cpu = val("load.per_core.1")
    return {
        "name": agent.config.name,
        "draining": agent.draining(),
        "overloaded": agent.overloaded(),
        "load1": val("load.1"),
        "cpu_pressure": float(cpu),
        "mem_available_bytes": int(val("mem.available_bytes")),
        "disk_free_bytes": int(val("disk.docker.free_bytes")),
        "running_containers": int(val("containers.running")),
    }


def _report_number(report: Any, *names: str) -> float | None:
    for name in names:
        value = report.get(name) if isinstance(report, dict) else getattr(report, name, None)
        if isinstance(value, int | float):
            return float(value)
    return None


class MeteredMigrator:
    """Counts every migration the evacuator starts, whatever the engine's report looks like."""

    def __init__(self, inner: Any, metrics: FerryMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def migrate(self, container: str, target: str, progress: Any = None) -> Any:
        self._metrics.migration_started()
        try:
            if inspect.iscoroutinefunction(self._inner.migrate):
                report = await self._inner.migrate(container, target, progress=progress)
            else:
                report = await asyncio.to_thread(self._inner.migrate, container, target, progress)
        except asyncio.CancelledError:
            self._metrics.migration_failed(rolled_back=False)
            raise
        except Exception as exc:
            report = getattr(exc, "report", None)
            moved = _report_number(report, "bytes_moved") if report is not None else None
            self._metrics.migration_failed(
                rolled_back=bool(getattr(exc, "rolled_back", False)),
                bytes_moved=int(moved) if moved is not None else None,
            )
            raise
        downtime = _report_number(report, "downtime_s", "downtime_seconds", "downtime")
        moved = _report_number(report, "bytes_sent", "bytes_moved", "bytes_total", "bytes")
        self._metrics.migration_succeeded(downtime, int(moved) if moved is not None else None)
        return report


@dataclass
class Overrides:
    """Parts a test (or an embedder) supplies instead of the real ones."""

    docker: Any = None  # a DockerAdapter-like object
    clock: Clock | None = None
    notifier: Notifier | None = None
    sources: list[SignalSource] | None = None
    peers: PeerDirectory | None = None
    migration: Callable[[Agent], MigrationParts] | None = None
    metrics_registry: CollectorRegistry | None = None
    proc_root: Path = Path("/proc")
    prereqs: Callable[[Agent], Awaitable[list[str]]] | None = None
    extra_route_hooks: list[RouteHook] = field(default_factory=list)


class Agent:
    """One running Ferry agent. Also the `ControlService` the control socket serves."""

    def __init__(self, config: FerryConfig, overrides: Overrides | None = None) -> None:
        self.config = config
        self._o = overrides or Overrides()
        self.clock: Clock = self._o.clock or SystemClock()
        self.notifier = self._o.notifier or Notifier.from_env()
        self.started_at = time.time()
        self.stopped = asyncio.Event()
        self.exit_code = EXIT_OK
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._closers: list[tuple[str, Callable[[], Awaitable[None] | None]]] = []
        self._last_status = ""
        self._was_draining: bool | None = None
        self.docker: Any = None
        self.store: SignalStore | None = None
        self.engine: PolicyEngine | None = None
        self.evacuator: Evacuator | None = None
        self.peers: PeerDirectory | None = None
        self.migration: MigrationParts | None = None
        self.migrator: MeteredMigrator | None = None
        self.metrics: FerryMetrics | None = None
        self.control: ControlServer | None = None

    # ------------------------------------------------------------------ drain state

    @property
    def drain_marker(self) -> Path:
        return self.config.marker_paths()["drain"]

    def draining(self) -> bool:
        # The file is the truth: it may be created by `ferry drain`, by hand, or
        # before the agent started.
        return self.drain_marker.exists()

    def drain_reason(self) -> str | None:
        try:
            return self.drain_marker.read_text(errors="replace").strip() or None
        except OSError:
            return None

    def overloaded(self) -> bool:
        """Shedding load: a migrating policy is active while the host is not draining."""
        if self.engine is None or self.draining():
            return False
        by_name = {p.name: p for p in self.engine.policies}
        # `active` includes cooling down: a host that just shed load should not
        # be handed containers again while its condition still holds.
        return any(
            s.active and (p := by_name.get(s.name)) is not None and p.action in MIGRATING_ACTIONS
            for s in self.engine.states()
        )

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Bring every part up; raises StartupRefused or InputError without serving."""
        cfg = self.config
        log.info("agent.starting", host=cfg.name, config_dry_run=cfg.dry_run)
        self.notifier.status("starting: checking prerequisites")
        self.docker = self._o.docker
        if self.docker is None:
            from agent.docker_adapter import DockerAdapter

            self.docker = DockerAdapter(cfg.docker.url)
        self._on_close("docker", self.docker.close)

        policies = self._load_policies()
        # Before anything touches the journal or Docker: a second agent must not
        # reconcile the first one's migrations.
        if cfg.control_socket.parent.exists():
            remove_stale_socket(cfg.control_socket)

        self.peers = self._o.peers or self._build_peer_monitor()
        problems = await (self._o.prereqs or _default_prereqs)(self)
        if problems:
            raise StartupRefused(problems)

        data_root = cfg.docker.data_root or Path(
            await asyncio.to_thread(lambda: str(self.docker.data_root()))
        )
        self.store = SignalStore(self.clock)
        sources = self._o.sources
        if sources is None:
            sources = build_default_sources(
                proc_root=self._o.proc_root,
                data_root=data_root,
                markers=cfg.marker_paths(),
                command_monitors=[
                    CommandMonitorSpec(c.name, c.command, c.interval, c.timeout)
                    for c in cfg.signals.commands
                ],
                docker_adapter=self.docker,
                clock=self.clock,
                interval=cfg.signals.poll_interval,
            )
        self.store.adopt_hints(sources)
        self._spawn("signal-sources", run_sources(sources, self.store), critical=False)

        self.metrics = FerryMetrics(
            self._o.metrics_registry or CollectorRegistry(),
            signals=self.store,
            policy_states=lambda: {s.name: s.status for s in self._engine().states()},
        )

        self.migration = (self._o.migration or build_migration)(self)
        if self.migration.close is not None:
            self._on_close("migration", self.migration.close)
        if self.migration.reconcile is not None:
            self.notifier.status("starting: reconciling unfinished migrations")
            await self.migration.reconcile()

        self.migrator = MeteredMigrator(self.migration.migrator, self.metrics)
        self.evacuator = Evacuator(
            self.migrator,
            self.peers,
            cfg.limits.max_concurrent_migrations,
            host=cfg.name,
            clock=self.clock,
            policy_targets=self._policy_targets,
            inventory=self.store.containers,
        )
        self.evacuator.add_listener(self._update_status)
        actions = ActionRegistry.with_builtins()
        actions.register(EvacuateAction(self.evacuator))
        actions.register(MoveAction(self.evacuator))
        actions.load_entry_points()
        self.engine = PolicyEngine(
            policies,
            actions,
            self.store,
            self.peers,
            self.clock,
            global_dry_run=cfg.dry_run,
            limits=EngineLimits.from_config(cfg.limits),
            host=cfg.name,
        )
        self._on_close("policy engine", self.engine.aclose)

        if isinstance(self.peers, PeerHealthMonitor):
            self._spawn("peers", self.peers.run())
            self._on_close("peer clients", self.peers.close)
        self._spawn("evacuation-retries", self.evacuator.run_retries())

        await self._start_peer_server()
        self.control = ControlServer(
            cfg.control_socket,
            self,
            route_hooks=[*self.migration.route_hooks, *self._o.extra_route_hooks],
        )
        await self.control.start()
        self._on_close("control socket", self.control.stop)
        if cfg.metrics.listen:
            server = MetricsServer(self.metrics, cfg.metrics.listen)
            await server.start()
            self._on_close("metrics", server.stop)

        self._spawn("policy-loop", self._policy_loop())
        self._update_status()
        self.notifier.ready(self._last_status)
        log.info(
            "agent.ready",
            host=cfg.name,
            policies=[p.name for p in policies],
            peers=[p.name for p in cfg.peers],
            draining=self.draining(),
        )

    def _load_policies(self) -> list[Any]:
        cfg = self.config
        if not cfg.policies_dir.is_dir():
            raise InputError.single(
                "config", "policies_dir", f"{cfg.policies_dir} is not a directory"
            )
        return load_policies(
            cfg.policies_dir,
            known_markers=set(cfg.marker_paths()),
            known_peers={p.name for p in cfg.peers},
        )

    def _tls_files(self) -> tuple[Path, Path, Path]:
        tls = self.config.tls
        assert tls.ca and tls.cert and tls.key  # filled from state_dir by the config
        return tls.ca, tls.cert, tls.key

    def _build_peer_monitor(self) -> PeerHealthMonitor:
        from agent.peer.tls import client_context

        try:
            ctx = client_context(*self._tls_files())
        except (OSError, ValueError) as exc:
            log.warning("agent.tls_client_unavailable", error=str(exc))
            ctx = None
        return PeerHealthMonitor.for_peers(self.config.peers, ctx)

    async def _start_peer_server(self) -> None:
        from agent.peer.server import make_peer_app, start_peer_server
        from agent.peer.tls import server_context

        assert self.migration is not None and self.store is not None
        handlers = DrainAwareHandlers(
            self.migration.handlers,
            draining=self.draining,
            drain_reason=self.drain_reason,
            base_health=lambda: local_health(self),
        )
        app = make_peer_app(
            handlers,
            allowed_peers=[p.name for p in self.config.peers],
            max_body_bytes=int(self.config.limits.max_request_bytes),
        )
        host, _, port = self.config.listen.rpartition(":")
        server = await start_peer_server(
            app, host.strip("[]"), int(port), server_context(*self._tls_files())
        )
        self.peer_port = server.port
        self._on_close("peer server", server.close)

    def _policy_targets(self, policy: str) -> Any:
        for p in self._engine().policies:
            if p.name == policy:
                return p.targets
        return None

    def _engine(self) -> PolicyEngine:
        if self.engine is None:
            raise RuntimeError("policy engine not started")
        return self.engine

    # ------------------------------------------------------------------ loops

    async def _policy_loop(self) -> None:
        """Tick every second and at once on a signal change; ping the watchdog from here.

        The watchdog ping lives in this loop on purpose: if evaluation hangs,
        systemd stops hearing from us and restarts the agent.
        """
        assert self.store is not None
        engine = self._engine()
        interval = self.notifier.watchdog_interval
        last_ping = float("-inf")
        while True:
            version = self.store.version
            await engine.tick()
            self._check_drain_transition()
            self._update_status()
            now = time.monotonic()
            if interval is not None and now - last_ping >= interval:
                self.notifier.watchdog()
                last_ping = now
            await self.store.wait_changed(after=version, timeout=TICK_SECONDS)

    def _check_drain_transition(self) -> None:
        draining = self.draining()
        if self._was_draining and not draining and self.evacuator is not None:
            dropped = self.evacuator.cancel(kind="evacuate")
            log.info("agent.undrained", stopped_retrying=dropped)
        elif draining and not self._was_draining:
            log.info("agent.draining", reason=self.drain_reason())
        self._was_draining = draining

    def _update_status(self) -> None:
        parts = []
        if self.draining():
            parts.append("draining")
        elif self.overloaded():
            parts.append("overloaded")
        else:
            parts.append("serving")
        if self.engine is not None:
            active = [s.name for s in self.engine.states() if s.active]
            if active:
                parts.append(f"active: {', '.join(active)}")
        if self.evacuator is not None and self.evacuator.summary() != "idle":
            parts.append(self.evacuator.summary())
        line = "; ".join(parts)
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _spawn(self, name: str, coro: Awaitable[Any], critical: bool = True) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"ferry-{name}")
        self._tasks[name] = task

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None and not critical:
                return
            if critical:
                log.error("agent.task_died", task=name, error=repr(exc))
                self.exit_code = EXIT_FAILED
                self.stopped.set()
            else:
                log.error("agent.source_died", source=name, error=repr(exc))

        task.add_done_callback(done)

    def _on_close(self, name: str, fn: Callable[[], Awaitable[None] | None]) -> None:
        self._closers.append((name, fn))

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        """Stop serving, cancel and await every task, close every part (reverse order)."""
        self.notifier.stopping("stopping")
        log.info("agent.stopping")
        # Control socket and peer server go first (they are last in _closers) so
        # nothing new starts while the rest winds down.
        for name, fn in reversed(self._closers[self._first_server_index() :]):
            await self._close_one(name, fn)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for name, fn in reversed(self._closers[: self._first_server_index()]):
            await self._close_one(name, fn)
        self._closers.clear()
        self.notifier.close()
        log.info("agent.stopped", exit_code=self.exit_code)

    def _first_server_index(self) -> int:
        for i, (name, _) in enumerate(self._closers):
            if name in ("peer server", "control socket", "metrics"):
                return i
        return len(self._closers)

    async def _close_one(self, name: str, fn: Callable[[], Awaitable[None] | None]) -> None:
        try:
            result = fn()
            if result is not None:
                await result
        except Exception as exc:  # keep closing the rest
            log.warning("agent.close_failed", part=name, error=repr(exc))

    # ------------------------------------------------------------------ ControlService

    async def status(self) -> dict[str, Any]:
        now_mono, now_wall = self.clock.monotonic(), self.clock.time()
        policies = []
        if self.engine is not None:
            for s in self.engine.states():
                d = asdict(s)
                d["since_wall"] = now_wall - (now_mono - s.since)
                policies.append(d)
        migrations = await self._in_flight()
        peers = [asdict(p) for p in self.peers.peers()] if self.peers is not None else []
        return {
            "host": self.config.name,
            "version": _version(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "draining": self.draining(),
            "drain_reason": self.drain_reason(),
            "overloaded": self.overloaded(),
            "dry_run": self.config.dry_run,
            "status_line": self._last_status,
            "signals": self.store.snapshot() if self.store is not None else {},
            "policies": policies,
            "migrations": migrations,
            "evacuation": self.evacuator.status() if self.evacuator is not None else {},
            "peers": peers,
        }

    async def _in_flight(self) -> list[dict[str, Any]]:
        if self.migration is None or self.migration.journal is None:
            return []
        journal = self.migration.journal
        records = await asyncio.to_thread(journal.unfinished)
        return [
            {
                "id": r.id,
                "container": r.container_name,
                "role": r.role,
                "source": r.source,
                "target": r.target,
                "phase": r.phase,
                "started_at": r.started,
            }
            for r in records
        ]

    async def drain(self, reason: str) -> dict[str, Any]:
        marker = self.drain_marker
        await asyncio.to_thread(_write_marker, marker, reason)
        log.info("agent.drain_requested", reason=reason, marker=str(marker))
        self._check_drain_transition()
        self._update_status()
        return {"draining": True, "message": f"drain marker {marker} set; evacuation starts"}

    async def undrain(self) -> dict[str, Any]:
        marker = self.drain_marker
        existed = marker.exists()
        await asyncio.to_thread(marker.unlink, True)
        log.info("agent.undrain_requested", marker=str(marker), was_draining=existed)
        self._check_drain_transition()
        self._update_status()
        what = "removed" if existed else "was not set"
        return {"draining": False, "message": f"drain marker {marker} {what}; accepting again"}

    async def history(self, limit: int) -> list[dict[str, Any]]:
        if self.migration is None or self.migration.journal is None:
            return []
        records = await asyncio.to_thread(self.migration.journal.history, limit)
        return [asdict(r) for r in records]


def _write_marker(path: Path, reason: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(reason + "\n" if reason else "")
    tmp.replace(path)


def _version() -> str:
    from agent import __version__

    return __version__


async def _default_prereqs(agent: Agent) -> list[str]:
    cfg = agent.config
    probe = None
    if isinstance(agent.peers, PeerHealthMonitor) and cfg.peers:
        probe = agent.peers.poll_once
    problems = await run_prereqs(
        docker=agent.docker,
        docker_url=cfg.docker.url,
        data_root=cfg.docker.data_root,
        criu_command=cfg.docker.criu_check,
        tls_files=agent._tls_files(),
        host=cfg.name,
        peer_probe=probe,
    )
    return [str(p) for p in fatal(problems)]


# ---------------------------------------------------------------------- entry point


async def serve(agent: Agent, stop: asyncio.Event | None = None) -> int:
    """Start, run until `stop` (or SIGTERM/SIGINT) or a part dies, then close."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        try:
            await agent.start()
        except BaseException:
            await agent.close()
            raise
        waiter = asyncio.ensure_future(stop.wait())
        died = asyncio.ensure_future(agent.stopped.wait())
        try:
            await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            died.cancel()
            await asyncio.gather(waiter, died, return_exceptions=True)
        await agent.close()
        return agent.exit_code
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_agent(config_path: Path, environ: dict[str, str] | None = None) -> int:
    """`ferry run`: returns the process exit code (0, 1, 2 or 3)."""
    try:
        config = load_config(config_path, environ)
    except InputError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(config.logging.level, config.logging.format)

    async def main() -> int:
        return await serve(Agent(config))

    try:
        return asyncio.run(main())
    except InputError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except StartupRefused as exc:
        print(f"ferry: not starting, {len(exc.lines)} problem(s):", file=sys.stderr)
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (AlreadyServing, OSError) as exc:
        # Another agent on the socket, the peer port taken, a directory not writable.
        print(f"ferry: not starting: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


__all__ = ["Agent", "Overrides", "StartupRefused", "run_agent", "serve"]
