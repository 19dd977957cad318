"""Translate a source container's inspect data into a create body for the target.

The target container must look like the source one to the process CRIU
restores into it: same command, env, user, working dir, mounts, ports,
limits. What cannot be carried (anonymous host paths, other containers'
namespaces, --rm) is refused here, before anything is frozen.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Config keys copied as they are: they describe the process, not the host.
_CONFIG_KEYS = (
    "Hostname",
    "Domainname",
    "User",
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "Labels",
    "ExposedPorts",
    "Healthcheck",
    "StopSignal",
    "StopTimeout",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ArgsEscaped",
    "Shell",
)

# HostConfig keys copied as they are: limits and process settings.
_HOST_KEYS = (
    "PortBindings",
    "PublishAllPorts",
    "Memory",
    "MemorySwap",
    "MemoryReservation",
    "MemorySwappiness",
    "NanoCpus",
    "CpuShares",
    "CpuPeriod",
    "CpuQuota",
    "CpusetCpus",
    "CpusetMems",
    "PidsLimit",
    "BlkioWeight",
    "Ulimits",
    "OomKillDisable",
    "OomScoreAdj",
    "CapAdd",
    "CapDrop",
    "Privileged",
    "SecurityOpt",
    "ReadonlyRootfs",
    "Tmpfs",
    "ShmSize",
    "ExtraHosts",
    "Dns",
    "DnsOptions",
    "DnsSearch",
    "Init",
    "LogConfig",
    "Sysctls",
    "GroupAdd",
    "IpcMode",
    "PidMode",
    "UTSMode",
    "UsernsMode",
    "CgroupnsMode",
    "Annotations",
)

_ANONYMOUS_VOLUME = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_NETWORKS = frozenset({"bridge", "default"})


@dataclass
class VolumeMount:
    name: str
    destination: str
    driver: str = "local"
    read_only: bool = False
    anonymous: bool = False
    daemon_path: str = ""  # the volume's mountpoint on the source daemon


@dataclass
class BindMount:
    source: str
    destination: str
    read_only: bool = False


@dataclass
class PublishedPort:
    container_port: str  # "8080/tcp"
    host_ip: str
    host_port: int


@dataclass
class ContainerSpec:
    """Everything the target needs to recreate the container, JSON-able for the peer API."""

    id: str
    name: str
    image_ref: str  # as the user named it, e.g. "ferry-test/counter:1"
    image_id: str  # "sha256:..."
    body: dict[str, Any]  # Engine API create body, restart policy forced to "no"
    restart_policy: dict[str, Any]
    networks: list[str]
    binds: list[BindMount] = field(default_factory=list)
    volumes: list[VolumeMount] = field(default_factory=list)
    ports: list[PublishedPort] = field(default_factory=list)
    has_healthcheck: bool = False
    upper_dir: str | None = None  # overlay2 upper dir, daemon-side path
    graph_driver: str = ""
    memory_limit: int = 0
    # CRIU options the source dumps with (checkpointers.DUMP_OPTIONS, or none for
    # Docker's API); the target derives its restore options from them.
    dump_options: list[str] = field(default_factory=list)
    # Static addresses given at `docker run --ip/--ip6`, per network: the target must give them.
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)
    mac_address: str = ""  # `--mac-address`; Docker generates one otherwise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContainerSpec:
        d = dict(data)
        d["binds"] = [BindMount(**b) for b in d.get("binds", [])]
        d["volumes"] = [VolumeMount(**v) for v in d.get("volumes", [])]
        d["ports"] = [PublishedPort(**p) for p in d.get("ports", [])]
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class SpecError(ValueError):
    """The container cannot be recreated elsewhere; the message says why."""


def container_name(inspect: dict[str, Any]) -> str:
    return str(inspect.get("Name") or "").lstrip("/")


def spec_from_inspect(inspect: dict[str, Any]) -> ContainerSpec:
    """Build the target's create body from the source's inspect data."""
    cfg: dict[str, Any] = inspect.get("Config") or {}
    host: dict[str, Any] = inspect.get("HostConfig") or {}
    name = container_name(inspect)
    body: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        if cfg.get(key) is not None:
            body[key] = copy.deepcopy(cfg[key])
    body["Image"] = str(cfg.get("Image") or inspect.get("Image"))

    host_body: dict[str, Any] = {}
    for key in _HOST_KEYS:
        value = host.get(key)
        if value not in (None, "", [], {}):
            host_body[key] = copy.deepcopy(value)
    # Docker would restart an exited "always" container behind our back while
    # it is being restored; the real policy is set once it runs (see notes).
    host_body["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
    network_mode = str(host.get("NetworkMode") or "default")
    host_body["NetworkMode"] = network_mode

    binds: list[BindMount] = []
    volumes: list[VolumeMount] = []
    mounts: list[dict[str, Any]] = []
    # `Mounts` in inspect drops a tmpfs mount's size and mode; the create request kept them.
    tmpfs_options = {
        str(m.get("Target")): m["TmpfsOptions"]
        for m in host.get("Mounts") or []
        if m.get("Type") == "tmpfs" and m.get("TmpfsOptions")
    }
    for m in inspect.get("Mounts") or []:
        kind = m.get("Type")
        dest = str(m.get("Destination"))
        ro = not m.get("RW", True)
        if kind == "bind":
            binds.append(BindMount(str(m.get("Source")), dest, ro))
            mount: dict[str, Any] = {
                "Type": "bind",
                "Source": m.get("Source"),
                "Target": dest,
                "ReadOnly": ro,
            }
            if m.get("Propagation"):
                mount["BindOptions"] = {"Propagation": m["Propagation"]}
            mounts.append(mount)
        elif kind == "volume":
            vol_name = str(m.get("Name"))
            volumes.append(
                VolumeMount(
                    name=vol_name,
                    destination=dest,
                    driver=str(m.get("Driver") or "local"),
                    read_only=ro,
                    anonymous=bool(_ANONYMOUS_VOLUME.match(vol_name)),
                    daemon_path=str(m.get("Source") or ""),
                )
            )
            mounts.append({"Type": "volume", "Source": vol_name, "Target": dest, "ReadOnly": ro})
        elif kind == "tmpfs":
            tmpfs: dict[str, Any] = {"Type": "tmpfs", "Target": dest, "ReadOnly": ro}
            if dest in tmpfs_options:
                tmpfs["TmpfsOptions"] = copy.deepcopy(tmpfs_options[dest])
            mounts.append(tmpfs)
        else:
            raise SpecError(f"mount {dest} of type {kind!r} cannot be migrated")
    # Mounts (not Binds): the daemon then refuses a missing bind source at
    # create time instead of quietly creating an empty directory.
    host_body["Mounts"] = mounts
    body["HostConfig"] = host_body

    networks: list[str] = []
    endpoints: dict[str, Any] = {}
    addresses: dict[str, dict[str, str]] = {}
    short_id = str(inspect.get("Id", ""))[:12]
    mac = str(cfg.get("MacAddress") or "")
    for net_name, ep in ((inspect.get("NetworkSettings") or {}).get("Networks") or {}).items():
        networks.append(net_name)
        endpoint: dict[str, Any] = {}
        if net_name not in DEFAULT_NETWORKS:
            aliases = [a for a in (ep or {}).get("Aliases") or [] if a != short_id]
            if aliases:
                endpoint["Aliases"] = aliases
        # Only addresses the user pinned (IPAMConfig); Docker's own choice is not carried.
        pinned = {
            k: str(v)
            for k, v in ((ep or {}).get("IPAMConfig") or {}).items()
            if k in ("IPv4Address", "IPv6Address") and v
        }
        if pinned:
            endpoint["IPAMConfig"] = pinned
            addresses[net_name] = pinned
        # Docker keeps a user-given MAC in Config.MacAddress, for the container's network mode.
        if mac and net_name in (network_mode, "bridge" if network_mode == "default" else ""):
            endpoint["MacAddress"] = mac
        endpoints[net_name] = endpoint
    if endpoints and network_mode not in ("host", "none"):
        body["NetworkingConfig"] = {"EndpointsConfig": endpoints}

    ports: list[PublishedPort] = []
    for cport, bindings in (host.get("PortBindings") or {}).items():
        for b in bindings or []:
            hp = str(b.get("HostPort") or "")
            if hp.isdigit():
                ports.append(PublishedPort(cport, str(b.get("HostIp") or ""), int(hp)))

    graph = inspect.get("GraphDriver") or {}
    return ContainerSpec(
        id=str(inspect.get("Id")),
        name=name,
        image_ref=str(cfg.get("Image") or ""),
        image_id=str(inspect.get("Image")),
        body=body,
        restart_policy=dict(host.get("RestartPolicy") or {"Name": "no"}),
        networks=networks,
        binds=binds,
        volumes=volumes,
        ports=ports,
        has_healthcheck=_has_healthcheck(cfg.get("Healthcheck")),
        upper_dir=(graph.get("Data") or {}).get("UpperDir"),
        graph_driver=str(graph.get("Name") or ""),
        memory_limit=int(host.get("Memory") or 0),
        addresses=addresses,
        mac_address=mac,
    )


def _has_healthcheck(hc: dict[str, Any] | None) -> bool:
    test = (hc or {}).get("Test") or []
    return bool(test) and test[0] != "NONE"


def source_problems(
    inspect: dict[str, Any], spec: ContainerSpec, copy_named_volumes: bool
) -> list[str]:
    """Why this container cannot leave this host, checked before anything is touched."""
    problems: list[str] = []
    state = inspect.get("State") or {}
    host = inspect.get("HostConfig") or {}
    if not state.get("Running"):
        problems.append(f"container {spec.name} is not running (state {state.get('Status')})")
    if state.get("Paused"):
        problems.append(f"container {spec.name} is paused")
    if host.get("AutoRemove"):
        problems.append(
            f"container {spec.name} was started with --rm: Docker would delete it, "
            "and its checkpoint, the moment it is frozen"
        )
    mode = str(host.get("NetworkMode") or "")
    if mode.startswith("container:") or mode == "host":
        problems.append(f"network mode {mode!r} ties the container to this host")
    for key in ("PidMode", "IpcMode"):
        value = str(host.get(key) or "")
        if value.startswith("container:") or value == "host":
            problems.append(f"{key} {value!r} ties the container to this host")
    if host.get("Devices"):
        problems.append("containers with host devices cannot be migrated")
    if host.get("Init"):
        problems.append(
            f"container {spec.name} runs with --init: docker-init as PID 1 does not restore "
            "here (its state would be lost); recreate it without --init to make it movable"
        )
    links = [str(link).split(":")[0].lstrip("/") for link in host.get("Links") or []]
    if links:
        problems.append(
            f"container {spec.name} uses --link to {', '.join(links)}: links point at "
            "containers on this host; use a user-defined network instead"
        )
    if spec.graph_driver != "overlay2" or not spec.upper_dir:
        problems.append(
            f"storage driver {spec.graph_driver or 'unknown'!r}: only overlay2 writable layers "
            "can be carried"
        )
    for vol in spec.volumes:
        if vol.driver != "local":
            problems.append(f"volume {vol.name} uses driver {vol.driver!r}; only local volumes")
        elif not copy_named_volumes:
            problems.append(
                f"volume {vol.name} at {vol.destination} would have to be copied and "
                "migration.copy_named_volumes is off"
            )
    return problems
