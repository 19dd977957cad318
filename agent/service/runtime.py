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
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from agent.config import FerryConfig, load_config
from agent.errors import InputError
from agent.hostport import split_host_port
from agent.logging import configure_logging
from agent.migration.checkpointers import in_daemon_namespaces
from agent.model import Clock, PeerDirectory, SignalSource, SystemClock
from agent.peer.health import PeerHealthMonitor
from agent.plugin_loader import Plugins, load_plugins
from agent.policy.actions import ActionContext, ActionRegistry, default_action_factories
from agent.policy.engine import EngineLimits, PolicyEngine
from agent.policy.loader import load_policies
from agent.service.control import (
    AlreadyServing,
    ControlServer,
    RouteHook,
    remove_stale_socket,
)
from agent.service.control_service import AgentControl, ControlParts
from agent.service.drain import DrainMarker
from agent.service.evacuation import EvacuateAction, EvacuationHooks, Evacuator, MoveAction
from agent.service.metrics import FerryMetrics, MetricsServer
from agent.service.migrations import MeteredMigrator, MigrationParts, build_migration
from agent.service.movability import Movability
from agent.service.notify import Notifier
from agent.service.peer_endpoint import DrainAwareHandlers, local_health

if TYPE_CHECKING:
    from agent.fleet.runtime import FleetParts
from agent.service.policy_loop import PolicyLoop, shedding_load
from agent.service.prereqs import fatal, run_prereqs
from agent.signals import SignalStore, build_default_sources, default_registry
from agent.signals.command import CommandMonitorSpec
from agent.signals.registry import SourceContext
from agent.signals.runner import run_sources

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3


class StartupRefused(Exception):
    """Fatal prerequisite problems: `ferry run` prints them and exits 3."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


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
    """One running Ferry agent: its parts, how they are started, and how they are stopped."""

    def __init__(
        self, config: FerryConfig, overrides: Overrides | None = None, config_file: str = "config"
    ) -> None:
        self.config = config
        self.config_file = config_file  # how errors name the config (its path, for `ferry run`)
        self._o = overrides or Overrides()
        self.clock: Clock = self._o.clock or SystemClock()
        self.notifier = self._o.notifier or Notifier.from_env()
        self.started_at = time.time()
        self.stopped = asyncio.Event()
        self.exit_code = EXIT_OK
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._closers: list[tuple[str, Callable[[], Awaitable[None] | None]]] = []
        self.drain = DrainMarker(config.marker_paths()["drain"])
        self.docker: Any = None
        self.store: SignalStore | None = None
        self.engine: PolicyEngine | None = None
        self.evacuator: Evacuator | None = None
        self.movability: Movability | None = None
        self.peers: PeerDirectory | None = None
        self.migration: MigrationParts | None = None
        self.migrator: Any = None  # MeteredMigrator, wrapped by the fleet's reservations
        self.metrics: FerryMetrics | None = None
        self.control: ControlServer | None = None
        self.policy_loop: PolicyLoop | None = None
        self.plugins = Plugins()
        self.fleet: FleetParts | None = None  # only with a `fleet:` config section
        # mTLS names the peer server accepts; the fleet adds hosts it discovers.
        self.allowed_peers: set[str] = {p.name for p in config.peers}
        self._fleet_clients: dict[str, Any] = {}  # peer clients for hosts learnt from etcd

    # ------------------------------------------------------------------ drain state

    def draining(self) -> bool:
        # Queued for a fleet drain counts: such a host must not receive containers.
        return self.drain.active() or (self.fleet is not None and self.fleet.drain.requested())

    def drain_reason(self) -> str | None:
        if self.fleet is not None and self.fleet.drain.requested():
            return self.fleet.drain.reason()
        return self.drain.reason()

    def overloaded(self) -> bool:
        return shedding_load(self.engine, self.draining())

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

        # Plugins before policies: their signal and action names are what policies may use.
        self.plugins = self._load_plugins()
        policies = self._load_policies()
        # Before anything touches the journal or Docker: a second agent must not
        # reconcile the first one's migrations.
        if cfg.control_socket.parent.exists():
            remove_stale_socket(cfg.control_socket)

        monitor = self._o.peers or self._build_peer_monitor()
        self.peers = monitor
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
        sources = [*sources, *self.plugins.sources]
        self.store.adopt_hints(sources)
        self._spawn("signal-sources", run_sources(sources, self.store), critical=False)

        self.metrics = FerryMetrics(
            self._o.metrics_registry or CollectorRegistry(),
            signals=self.store,
            policy_states=lambda: {s.name: s.status for s in self._engine().states()},
        )

        self.migration = (self._o.migration or build_migration)(self)
        journal = self.migration.journal
        if journal is not None:
            self.metrics.bind(in_doubt=lambda: len(journal.in_doubt()))
        if self.migration.close is not None:
            self._on_close("migration", self.migration.close)
        if cfg.fleet is not None:
            self._restore_fleet_peers()
        if self.migration.reconcile is not None:
            self.notifier.status("starting: reconciling unfinished migrations")
            await self.migration.reconcile()

        self.migrator = MeteredMigrator(self.migration.migrator, self.metrics)
        if cfg.fleet is not None:
            self.migrator = await self._attach_fleet(monitor)
        check = getattr(self.migration.migrator, "check", None)
        self.movability = (
            Movability(check, self.store.containers, self.peers, self.clock)
            if check is not None
            else None
        )
        self.evacuator = Evacuator(
            self.migrator,
            self.peers,
            cfg.limits.max_concurrent_migrations,
            host=cfg.name,
            clock=self.clock,
            policy_targets=self._policy_targets,
            inventory=self.store.containers,
            gate=self.fleet.drain.gate if self.fleet is not None else None,
            movability=self.movability,
        )
        actions = ActionRegistry.with_builtins()
        actions.register(EvacuateAction(self.evacuator))
        actions.register(MoveAction(self.evacuator))
        for action in self.plugins.actions:
            actions.register(action)
        self.engine = PolicyEngine(
            policies,
            actions,
            self.store,
            self.peers,
            self.clock,
            global_dry_run=cfg.dry_run,
            limits=EngineLimits.from_config(cfg.limits),
            host=cfg.name,
            unmovable=self.movability.known_unmovable if self.movability else None,
        )
        self._on_close("policy engine", self.engine.aclose)
        self.policy_loop = PolicyLoop(
            self.engine, self.store, self.notifier, self.drain, self.evacuator, self.overloaded
        )
        self.evacuator.add_listener(self.policy_loop.update_status)

        if isinstance(monitor, PeerHealthMonitor):
            self._spawn("peers", monitor.run())
            self._on_close("peer clients", monitor.close)
        if self.fleet is not None:
            self._spawn_fleet(self.fleet)
        self._spawn("evacuation-retries", self.evacuator.run_retries())

        await self._start_peer_server()
        self.control = ControlServer(
            cfg.control_socket,
            AgentControl(
                ControlParts(
                    host=cfg.name,
                    dry_run=cfg.dry_run,
                    clock=self.clock,
                    started_at=self.started_at,
                    store=self.store,
                    engine=self.engine,
                    peers=self.peers,
                    evacuator=self.evacuator,
                    policy_loop=self.policy_loop,
                    drain=self.drain,
                    draining=self.draining,
                    drain_reason=self.drain_reason,
                    overloaded=self.overloaded,
                    journal=self.migration.journal,
                    movability=self.movability,
                    fleet=self.fleet,
                    pages=getattr(self.migration.migrator, "page_progress", None),
                )
            ),
            route_hooks=[*self.migration.route_hooks, *self._o.extra_route_hooks],
        )
        await self.control.start()
        self._on_close("control socket", self.control.stop)
        if cfg.metrics.listen:
            server = MetricsServer(self.metrics, cfg.metrics.listen)
            await server.start()
            self._on_close("metrics", server.stop)

        self._spawn("policy-loop", self.policy_loop.run())
        self.policy_loop.update_status()
        self.notifier.ready(self.policy_loop.status_line)
        log.info(
            "agent.ready",
            host=cfg.name,
            policies=[p.name for p in policies],
            peers=[p.name for p in cfg.peers],
            draining=self.draining(),
        )

    def _load_plugins(self) -> Plugins:
        cfg = self.config
        hooks = EvacuationHooks(lambda: self.evacuator)
        plugin_log = structlog.get_logger("ferry.plugins")
        return load_plugins(
            cfg,
            self.config_file,
            default_registry(plugins=bool(cfg.signals.plugins)),
            default_action_factories(plugins=bool(cfg.actions.plugins)),
            SourceContext(
                clock=self.clock,
                proc_root=self._o.proc_root,
                # Plugins are built before Docker is asked for its data root.
                data_root=cfg.docker.data_root or Path("/var/lib/docker"),
                interval=cfg.signals.poll_interval,
                docker_adapter=self.docker,
                host=cfg.name,
            ),
            lambda name: ActionContext(
                name=name,
                host=cfg.name,
                clock=self.clock,
                log=plugin_log.bind(plugin=name),
                migrations=hooks,
            ),
        )

    def _load_policies(self) -> list[Any]:
        cfg = self.config
        if not cfg.policies_dir.is_dir():
            raise InputError.single(
                self.config_file, "policies_dir", f"{cfg.policies_dir} is not a directory"
            )
        return load_policies(
            cfg.policies_dir,
            known_signals=self.plugins.signal_patterns(),
            known_markers=set(cfg.marker_paths()),
            known_peers={p.name for p in cfg.peers},
            known_actions=self.plugins.action_names(),
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
        store = self.store
        handlers = DrainAwareHandlers(
            self.migration.handlers,
            draining=self.draining,
            drain_reason=self.drain_reason,
            base_health=lambda: local_health(
                self.config.name, store, self.draining(), self.overloaded()
            ),
        )
        app = make_peer_app(
            handlers,
            allowed_peers=self.allowed_peers,
            max_body_bytes=int(self.config.limits.max_request_bytes),
            host_name=self.config.name,
        )
        host, port = split_host_port(self.config.listen)
        server = await start_peer_server(
            app,
            host,
            port,
            server_context(*self._tls_files()),
            max_connections=self.config.limits.max_peer_connections,
        )
        self.peer_port = server.port
        self._on_close("peer server", server.close)

    async def _attach_fleet(self, static: PeerDirectory) -> Any:
        """Fleet coordination (`fleet:`): discovery, reservations, the drain budget."""
        from agent import __version__
        from agent.fleet.metrics import FleetCollector
        from agent.fleet.migrator import FleetMigrator
        from agent.fleet.runtime import build_fleet, close_fleet, first_beat, local_record

        store, migration = self.store, self.migration
        assert store is not None and migration is not None and self.metrics is not None
        journal = migration.journal

        def base() -> dict[str, Any]:
            return local_health(self.config.name, store, self.draining(), self.overloaded())

        def in_flight() -> int:
            return len(journal.unfinished()) if journal is not None else 0

        def on_drain_change() -> None:
            if self.policy_loop is not None:
                self.policy_loop.check_drain_transition()
                self.policy_loop.update_status()

        parts = build_fleet(
            self.config,
            static,
            self.drain,
            local_record(base, store.containers, self.draining, in_flight),
            __version__,
            on_drain_change,
            self._fleet_clients,
        )
        self.fleet = parts
        parts.discovered.update(self._fleet_clients)  # restored ones leave when etcd says so
        self.peers = parts.peers
        self._on_close("fleet", lambda: close_fleet(parts))
        self.metrics.registry.register(FleetCollector(parts.fleet))
        await first_beat(parts.fleet)
        parts.migrator = FleetMigrator(self.migrator, parts.fleet, store.containers)
        return parts.migrator

    def _restore_fleet_peers(self) -> None:
        """Before reconcile, and without etcd: clients for hosts learnt from the fleet
        earlier, so an unfinished migration toward one of them can be settled."""
        from agent.fleet.runtime import restore_known

        engine_peers = getattr(self._migration().migrator, "peers", None)
        restored = restore_known(
            self.config.state_dir,
            frozenset(p.name for p in self.config.peers),
            self._fleet_clients,
            engine_peers if isinstance(engine_peers, dict) else None,
            self._peer_client_factory(),
        )
        self.allowed_peers.update(restored)
        if restored:
            log.info("fleet.known_peers_restored", peers=restored)

    def _spawn_fleet(self, parts: FleetParts) -> None:
        from agent.fleet.runtime import sync_peers

        engine_peers = getattr(self._migration().migrator, "peers", None)
        self._spawn("fleet", parts.fleet.run())
        self._spawn("fleet-drain", parts.drain.run())
        self._spawn(
            "fleet-peers",
            sync_peers(
                parts,
                engine_peers if isinstance(engine_peers, dict) else None,
                self.allowed_peers,
                self._peer_client_factory(),
            ),
        )

    def _peer_client_factory(self) -> Callable[[str, str], Any] | None:
        from agent.peer.client import PeerClient, PeerTimeouts
        from agent.peer.tls import client_context

        try:
            ctx = client_context(*self._tls_files())
        except (OSError, ValueError) as exc:
            log.warning("fleet.tls_client_unavailable", error=str(exc))
            return None
        # The same timeouts the engine gives configured peers (agent.migration.factory).
        timeouts = PeerTimeouts(connect=5.0, request=60.0, upload=None, idle=120.0)
        return lambda name, address: PeerClient(name, address, ctx, timeouts)

    def _migration(self) -> MigrationParts:
        if self.migration is None:
            raise RuntimeError("migration engine not built")
        return self.migration

    def _policy_targets(self, policy: str) -> Any:
        for p in self._engine().policies:
            if p.name == policy:
                return p.targets
        return None

    def _engine(self) -> PolicyEngine:
        if self.engine is None:
            raise RuntimeError("policy engine not started")
        return self.engine

    # ------------------------------------------------------------------ tasks

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


async def _default_prereqs(agent: Agent) -> list[str]:
    cfg = agent.config
    runc = None
    if cfg.migration.checkpoint_via == "runc":
        runc = await asyncio.to_thread(_runc_command, agent)
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
        runc_command=runc,
    )
    return [str(p) for p in fatal(problems)]


def _runc_command(agent: Agent) -> list[str]:
    """docker.runc_command as the runc checkpointer runs it (in dockerd's namespaces)."""
    cfg = agent.config
    ask = getattr(agent.docker, "daemon_pid", None)
    pid = ask() if ask is not None and cfg.docker.runc_in_daemon_namespaces else None
    if pid is None:
        return list(cfg.docker.runc_command)
    return in_daemon_namespaces(pid, cfg.docker.runc_command)


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
        return await serve(Agent(config, config_file=str(config_path)))

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


__all__ = ["Agent", "MigrationParts", "Overrides", "StartupRefused", "run_agent", "serve"]
