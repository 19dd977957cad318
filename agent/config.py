"""Ferry's host configuration: one YAML file, checked strictly, then overridable from the env.

``load_config(path)`` returns a `FerryConfig` or raises `InputError` listing
every problem, one line each, naming file and key. Unknown keys are errors
(a misspelt key silently ignored is a policy that silently never fires).

Relative paths in the file resolve against the directory holding the file,
so ``policies_dir: policies`` next to ``/etc/ferry/config.yaml`` means
``/etc/ferry/policies``.

Environment overrides
---------------------
Any key can be overridden with ``FERRY__<SECTION>__<KEY>=value``: the name is
upper-case, double underscores nest, list items are numbered from 0, and the
value is parsed as a YAML scalar (``true``, ``3``, ``30s``, ``null``)::

    FERRY__NAME=node-b
    FERRY__DRY_RUN=true
    FERRY__LIMITS__MAX_CONCURRENT_MIGRATIONS=2
    FERRY__MIGRATION__RESTORE_TIMEOUT=5m
    FERRY__PEERS__0__ADDRESS=10.0.0.7:7443
    FERRY__MARKERS__EXTRA__KERNEL_UPGRADE=/run/kernel-upgrade

Overrides apply after the file is read and before validation; an invalid
override is reported under the variable's name. Relative paths, wherever they
were written, resolve against the config file's directory.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.durations import Duration
from agent.errors import InputError, Problem, problems_from_validation
from agent.hostport import check_host_port, split_host_port
from agent.input_bounds import (
    DAY,
    GIB,
    HOUR,
    MIB,
    PIB,
    check_path_text,
    check_socket_path,
    count_in,
    duration_in,
    expand_user,
    refuse_system_root,
    size_in,
)
from agent.yaml_input import parse_yaml, read_yaml

ENV_PREFIX = "FERRY__"
_BASE_DIR = "base_dir"
_ENV_BASE = "env_paths"


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    value = expand_user(check_path_text(value))
    ctx = info.context or {}
    if value.is_absolute() or _BASE_DIR not in ctx:
        return Path(os.path.normpath(value))
    base: Path = ctx[_BASE_DIR]
    return Path(os.path.normpath(base / value))


# A filesystem path; relative ones resolve against the config file's directory.
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
# A directory Ferry writes into: never `/`, /etc, /usr, ... or below /proc, /sys, /dev.
OwnDir = Annotated[ConfigPath, AfterValidator(refuse_system_root)]
# The control socket: absolute as written, since it is what `ferry status` dials.
SocketPath = Annotated[Path, AfterValidator(check_socket_path)]


HostPort = Annotated[str, AfterValidator(check_host_port)]

# Host and peer names end up in certificates (CN at most 64 characters) and log lines.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Marker names become signal names ("marker.<name>"), so they follow signal naming.
_MARKER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_default=True, frozen=True, allow_inf_nan=False
    )


# One argv word; an empty one is never meant (and `exec` of "" fails late, at runtime).
_Word = Annotated[str, Field(min_length=1)]


class PeerConfig(_Model):
    name: str = Field(pattern=_NAME)
    address: HostPort
    weight: float = Field(default=1.0, gt=0, le=1000)
    tags: list[_Word] = []


def _docker_url(value: str) -> str:
    if value != value.strip() or not value:
        raise ValueError(f"{value!r}: no leading or trailing whitespace, not empty")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("unix", "tcp", "http", "https", "ssh") or not rest:
        raise ValueError(f"{value!r}: expected unix:///path, tcp://host:port or ssh://host")
    return value


class DockerConfig(_Model):
    url: Annotated[str, AfterValidator(_docker_url)] = "unix:///var/run/docker.sock"
    data_root: OwnDir | None = None  # None: ask the daemon (docker info)
    # Start-up check that dockerd's CRIU is >= 4.2 (`criu check` also accepted). CRIU
    # runs where dockerd runs, e.g. ["nsenter", "-t", "<dockerd pid>", "-m", "criu", "--version"].
    criu_check: list[_Word] = Field(default=["criu", "--version"], min_length=1)
    # How to run dockerd's runc when migration.checkpoint_via is "runc": an argv prefix
    # that `checkpoint ...` is appended to. It must run in dockerd's mount and PID
    # namespaces with dockerd's runc state root (moby's default shown).
    runc_command: list[_Word] = Field(
        default=["runc", "--root", "/run/docker/runtime-runc/moby"], min_length=1
    )
    # Run runc_command inside dockerd's namespaces (`nsenter -t <pid> -m -p -r`), with
    # dockerd's PID taken from the socket's peer credentials at each checkpoint. The
    # agent usually runs elsewhere: the shipped systemd unit gives it a private /tmp,
    # a read-only /usr and cgroup tree, and CRIU needs dockerd's view. false: the
    # runc_command given enters them itself (or needs not).
    runc_in_daemon_namespaces: bool = True
    # How to run CRIU where dockerd runs (its mount and PID namespaces), for the local
    # lazy-pages daemon of migration.restore_via: lazy; an argv prefix.
    criu_command: list[_Word] = Field(default=["criu"], min_length=1)
    # containerd's /tmp as this agent sees it: every restore leaves a copy of the
    # checkpoint there (ctrd-checkpoint*), which Ferry removes. None: leave them.
    containerd_tmp: ConfigPath | None = Path("/tmp")


class TLSConfig(_Model):
    # None: <state_dir>/tls/{ca.pem,cert.pem,key.pem}, where `ferry certs` writes them.
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


class LimitsConfig(_Model):
    max_concurrent_migrations: Annotated[int, count_in(1, 64)] = 1
    max_migrations: Annotated[int, count_in(1, 100_000)] = 10
    window: Annotated[Duration, duration_in(0, 366 * DAY, lo_open=True)] = 3600.0
    max_request_bytes: Annotated[ByteSize, size_in(MIB, PIB)] = ByteSize(16 * GIB)
    # Peer API connections held at once (handshaking ones included); more are closed at once.
    max_peer_connections: Annotated[int, count_in(1, 100_000)] = 64


_HOST_NAMESPACE = Literal["pid", "ipc", "uts", "network", "userns", "cgroup"]


def _absolute_prefix(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError(f"bind prefix {str(value)!r} must be an absolute path")
    return value


class AcceptConfig(_Model):
    """What this host creates for a peer (agent/migration/accept.py); all off by default."""

    privileged: bool = False
    host_namespaces: list[_HOST_NAMESPACE] = []
    capabilities: list[str] = []  # beyond Docker's defaults, e.g. NET_ADMIN; ALL for any
    devices: list[str] = []  # host device paths, e.g. /dev/fuse
    device_requests: bool = False  # GPUs and other --gpus style requests
    device_cgroup_rules: list[str] = []  # exact rules, e.g. "c 10:229 rwm"
    bind_prefixes: list[Annotated[Path, AfterValidator(_absolute_prefix)]] = []
    security_opts: list[str] = []  # exact values, e.g. seccomp=unconfined
    sysctls: list[str] = []  # exact names, e.g. net.core.somaxconn
    unmask_system_paths: bool = False  # MaskedPaths / ReadonlyPaths overrides
    log_drivers: list[str] = ["json-file", "local", "journald", "none"]
    annotations: list[str] = []  # exact keys; org.criu.config names a file CRIU obeys


class MigrationConfig(_Model):
    allow_image_shipping: bool = True
    max_image_bytes: Annotated[ByteSize, size_in(MIB, PIB)] = ByteSize(4 * GIB)
    copy_named_volumes: bool = True
    keep_source_copy_for: Annotated[Duration, duration_in(0, 30 * DAY)] = 0.0
    # "runc": pause, then run dockerd's runc directly with --tcp-established and
    # --file-locks, leaving the container frozen in place (agent/migration/checkpointers.py).
    # "engine": Docker's checkpoint API: no CRIU options, so no connections, no locks.
    checkpoint_via: Annotated[Literal["engine", "runc"], BeforeValidator(_lower)] = "runc"
    checkpoint_timeout: Annotated[Duration, duration_in(0, DAY, lo_open=True)] = 120.0
    restore_timeout: Annotated[Duration, duration_in(0, DAY, lo_open=True)] = 120.0
    health_timeout: Annotated[Duration, duration_in(0, DAY, lo_open=True)] = 60.0
    # "lazy": Docker gets the checkpoint without its memory pages and a local CRIU
    # lazy-pages daemon fills them in from the full copy on this host (downtime no
    # longer grows with containerd copying every page).
    # "docker": plain `docker start --checkpoint` of the full images.
    restore_via: Annotated[Literal["lazy", "docker"], BeforeValidator(_lower)] = "lazy"
    # Lazy restore only pays for checkpoints with at least this much memory in them:
    # below it, starting the lazy-pages daemon costs more (0.07-0.2 s) than Docker
    # copying the few pages, and the plain restore is used. 0: always lazy.
    lazy_min_bytes: Annotated[ByteSize, size_in(0, PIB)] = ByteSize(8 * MIB)
    # checkpoint_via runc: stream CRIU's page images to the target while the dump
    # still writes them, instead of after it (the dump's own time leaves the downtime).
    stream_during_dump: bool = True
    # Lazy restore only. false: the copy may run once committed while its pages are
    # still filled in from local disk (the lower downtime). If the daemon then dies,
    # the copy is killed and restored again from the checkpoint: its memory is right,
    # but files it wrote since the commit stay as written. true: hold the copy stopped
    # until every page is in, so a daemon failure never meets a running copy.
    lazy_hold_until_pages_in: bool = False
    # A state upload with no progress for this long aborts, and the source rolls back.
    stall_timeout: Annotated[Duration, duration_in(0, HOUR, lo_open=True)] = 30.0
    # How long the source retries its commit before it reports the migration in doubt
    # (it keeps retrying in the background after that).
    commit_timeout: Annotated[Duration, duration_in(0, DAY, lo_open=True)] = 30.0
    accept: AcceptConfig = AcceptConfig()
    # Post-copy: the target runs at once and pulls memory pages from the paused source.
    # off: never; opt_in: for containers labelled ferry.postcopy=true and
    # `ferry migrate --postcopy`; always: every migration this host starts.
    postcopy: Annotated[Literal["off", "opt_in", "always"], BeforeValidator(_lower)] = "opt_in"
    # No page moved for this long, on either side: the target copy is killed and the
    # source resumes.
    postcopy_stall_timeout: Annotated[Duration, duration_in(0, HOUR, lo_open=True)] = 30.0
    # First TCP port tried for the source's page server (the next 15 are tried too).
    postcopy_port: int = Field(default=7444, ge=1024, le=65000)


class LoggingConfig(_Model):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"


# A marker is a file; a system directory always "exists", so the marker would be
# set for good (a host draining forever).
MarkerPath = Annotated[ConfigPath, AfterValidator(refuse_system_root)]


class MarkersConfig(_Model):
    drain: MarkerPath | None = None  # None: <state_dir>/drain
    extra: dict[str, MarkerPath] = {}

    @field_validator("extra")
    @classmethod
    def _names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if name == "drain":
                raise ValueError("'drain' is set with markers.drain, not in markers.extra")
            if not _MARKER_NAME.match(name):
                raise ValueError(f"marker name {name!r}: use lower-case letters, digits, _ and -")
        return value


class MetricsConfig(_Model):
    listen: HostPort | None = None  # None: no metrics endpoint


class CommandMonitor(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    command: list[_Word] = Field(min_length=1)
    interval: Annotated[Duration, duration_in(1.0, DAY)] = 30.0
    timeout: Annotated[Duration, duration_in(0, HOUR, lo_open=True)] = 10.0

    @model_validator(mode="after")
    def _timeout_fits(self) -> CommandMonitor:
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


def _refuse_duplicates(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate {what} name(s): {', '.join(dupes)}")


class PluginSpec(_Model):
    """One configured plugin instance: `type` picks the factory registered under that
    entry-point name, `name` names this instance (a policy's `action:`, a source's
    signal prefix). Every other key belongs to the plugin; its own pydantic model
    checks them when the agent (or `ferry check-config`) loads the plugin."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _unique_plugins(value: list[PluginSpec], what: str) -> list[PluginSpec]:
    _refuse_duplicates([p.name for p in value], what)
    return value


class SignalsConfig(_Model):
    # Below 100ms the agent would spend its time reading /proc.
    poll_interval: Annotated[Duration, duration_in(0.1, HOUR)] = 2.0
    commands: list[CommandMonitor] = []
    plugins: list[PluginSpec] = []  # third-party sources (`ferry.signals` entry points)

    @field_validator("commands")
    @classmethod
    def _unique(cls, value: list[CommandMonitor]) -> list[CommandMonitor]:
        _refuse_duplicates([c.name for c in value], "command monitor")
        return value

    @field_validator("plugins")
    @classmethod
    def _unique_plugins(cls, value: list[PluginSpec]) -> list[PluginSpec]:
        return _unique_plugins(value, "signal plugin")


class ActionsConfig(_Model):
    plugins: list[PluginSpec] = []  # third-party actions (`ferry.actions` entry points)

    @field_validator("plugins")
    @classmethod
    def _unique_plugins(cls, value: list[PluginSpec]) -> list[PluginSpec]:
        return _unique_plugins(value, "action plugin")


_LABEL_KEY = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
# etcd keys are bytes; a prefix is a path-like string that ends in "/".
_KEY_PREFIX = r"^/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/$"


class FleetConfig(_Model):
    """Optional etcd coordination: discovery, reservations and the fleet's drain budget.

    Without this section nothing changes: static `peers`, local reservations only.
    """

    endpoints: list[HostPort] = Field(min_length=1, max_length=16)
    # None: the agent's own tls.* files (the etcd cluster may share Ferry's CA).
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    prefix: str = Field(default="/ferry/", pattern=_KEY_PREFIX, max_length=200)
    # A host whose agent stops renewing is gone from the fleet this long after.
    lease_ttl: Annotated[Duration, duration_in(2.0, 300.0)] = 10.0
    max_draining_hosts: Annotated[int, count_in(1, 10_000)] = 1
    # The peer address others dial; None: `listen`, which must then not be a wildcard.
    advertise: HostPort | None = None
    labels: dict[
        Annotated[str, Field(pattern=_LABEL_KEY)], Annotated[str, Field(max_length=200)]
    ] = {}
    # A single etcd request fails over to the next endpoint after this long.
    request_timeout: Annotated[Duration, duration_in(0.1, 60.0)] = 2.0

    @field_validator("endpoints")
    @classmethod
    def _unique_endpoints(cls, value: list[str]) -> list[str]:
        _refuse_duplicates(value, "endpoint")
        return value


class FerryConfig(_Model):
    name: str = Field(default_factory=socket.gethostname, pattern=_NAME)
    listen: HostPort = "0.0.0.0:7443"
    state_dir: OwnDir = Path("/var/lib/ferry")
    policies_dir: ConfigPath = Path("policies")
    control_socket: SocketPath = Path("/run/ferry/ferry.sock")
    dry_run: bool = False
    docker: DockerConfig = DockerConfig()
    peers: list[PeerConfig] = []
    tls: TLSConfig = TLSConfig()
    limits: LimitsConfig = LimitsConfig()
    migration: MigrationConfig = MigrationConfig()
    logging: LoggingConfig = LoggingConfig()
    markers: MarkersConfig = MarkersConfig()
    metrics: MetricsConfig = MetricsConfig()
    signals: SignalsConfig = SignalsConfig()
    actions: ActionsConfig = ActionsConfig()
    fleet: FleetConfig | None = None

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: list[PeerConfig]) -> list[PeerConfig]:
        _refuse_duplicates([p.name for p in value], "peer")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> FerryConfig:
        # Defaults that hang off state_dir are filled here so they follow a changed state_dir.
        if any(p.name == self.name for p in self.peers):
            raise ValueError(f"peer {self.name!r} has this host's own name")
        if self.metrics.listen is not None and self.metrics.listen == self.listen:
            raise ValueError(f"metrics.listen and listen are both {self.listen}; pick two ports")
        tls = self.tls.model_copy(
            update={
                "ca": self.tls.ca or self.state_dir / "tls" / "ca.pem",
                "cert": self.tls.cert or self.state_dir / "tls" / "cert.pem",
                "key": self.tls.key or self.state_dir / "tls" / "key.pem",
            }
        )
        markers = self.markers.model_copy(
            update={"drain": self.markers.drain or self.state_dir / "drain"}
        )
        object.__setattr__(self, "tls", tls)
        object.__setattr__(self, "markers", markers)
        if self.fleet is not None:
            object.__setattr__(self, "fleet", self._fleet_defaults(self.fleet, tls))
        return self

    def _fleet_defaults(self, fleet: FleetConfig, tls: TLSConfig) -> FleetConfig:
        advertise = fleet.advertise
        if advertise is None:
            host = split_host_port(self.listen)[0]
            if host in ("0.0.0.0", "::", ""):
                raise ValueError(
                    "fleet.advertise: required when listen is a wildcard address "
                    f"({self.listen}); give the address peers dial, e.g. 10.0.0.7:7443"
                )
            advertise = self.listen
        return fleet.model_copy(
            update={
                "ca": fleet.ca or tls.ca,
                "cert": fleet.cert or tls.cert,
                "key": fleet.key or tls.key,
                "advertise": advertise,
            }
        )

    def marker_paths(self) -> dict[str, Path]:
        """Every marker by name (drain included); the signal is ``marker.<name>``."""
        assert self.markers.drain is not None  # filled by _fill_defaults
        return {"drain": self.markers.drain, **self.markers.extra}


def apply_env(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str | int, ...], str], list[Problem]]:
    """Overlay FERRY__* variables onto `data`.

    Returns the new data, which variable set which key path (so validation
    errors can name the variable), and problems with the variables themselves.
    """
    origin: dict[tuple[str | int, ...], str] = {}
    problems: list[Problem] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            problems.append(Problem(f"${var}", "", "empty key part (use FERRY__SECTION__KEY)"))
            continue
        try:
            value = parse_yaml(environ[var], max_nodes=1000)
        except (yaml.YAMLError, ValueError):
            value = environ[var]
        path: list[str | int] = []
        node: Any = data
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if isinstance(node, list):
                    if not part.isdigit() or int(part) > len(node):
                        raise ValueError(f"list index {part!r} out of range (0-{len(node)})")
                    idx = int(part)
                    path.append(idx)
                    if idx == len(node):
                        node.append({})
                        origin.setdefault(tuple(path), var)
                    if last:
                        node[idx] = value
                    else:
                        node = node[idx]
                    continue
                if not isinstance(node, dict):
                    raise ValueError(f"{'.'.join(map(str, path))} is not a section")
                path.append(part)
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = [] if part in ("peers", "commands", "plugins") else {}
                        origin.setdefault(tuple(path), var)
                    node = node[part]
        except ValueError as exc:
            problems.append(Problem(f"${var}", "", str(exc)))
            continue
        origin[tuple(path)] = var
    return data, origin, problems


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> FerryConfig:
    """Read, override from the environment, and validate a config file."""
    shown = str(path)
    file = Path(path)
    raw = read_yaml(file, shown)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError.single(shown, "", "expected a mapping of keys at the top level")
    env = os.environ if environ is None else environ
    data, origin, problems = apply_env(raw, env)
    if problems:
        raise InputError(problems)

    def rename(loc: tuple[int | str, ...]) -> tuple[str, tuple[int | str, ...]]:
        for n in range(len(loc), 0, -1):
            var = origin.get(loc[:n])
            if var is not None:
                return f"${var}", loc
        return shown, loc

    base = file.resolve().parent
    try:
        return FerryConfig.model_validate(data, context={_BASE_DIR: base})
    except ValidationError as exc:
        raise InputError(problems_from_validation(shown, exc, rename=rename)) from None
