"""What a target agrees to run: the staged spec checked against `migration.accept`.

A peer certificate lets a host ask another to create a container. Without this
check that container could be privileged, share the host's namespaces, bind
`/` or open `/dev/mem`: a peer certificate would be root on every host that
trusts it. So the target checks every create body a peer stages against its
own config and refuses, one reason per field, whatever the config does not
allow. Keys it does not know are refused too: the allow-lists below name every
key `agent.migration.spec` produces, so a new Docker key that grants privilege
cannot slip through unnoticed.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.config import AcceptConfig
from agent.migration.spec import ContainerSpec
from agent.peer.bodies import one_line

# Top-level create-body keys: the process's own settings, none reaches the host.
_BODY_KEYS = frozenset(
    {
        "Hostname", "Domainname", "User", "Env", "Cmd", "Entrypoint", "WorkingDir", "Labels",
        "ExposedPorts", "Healthcheck", "StopSignal", "StopTimeout", "Tty", "OpenStdin",
        "StdinOnce", "AttachStdin", "AttachStdout", "AttachStderr", "ArgsEscaped", "Shell",
        "Image", "HostConfig", "NetworkingConfig",
    }
)  # fmt: skip

# HostConfig keys that are limits or in-container settings: safe whatever their value.
_SAFE_HOST_KEYS = frozenset(
    {
        "PortBindings", "PublishAllPorts", "Memory", "MemorySwap", "MemoryReservation",
        "MemorySwappiness", "NanoCpus", "CpuShares", "CpuPeriod", "CpuQuota", "CpusetCpus",
        "CpusetMems", "PidsLimit", "BlkioWeight", "Ulimits", "OomKillDisable", "OomScoreAdj",
        "CapDrop", "ReadonlyRootfs", "Tmpfs", "ShmSize", "ExtraHosts", "Dns", "DnsOptions",
        "DnsSearch", "Init", "GroupAdd", "RestartPolicy",
    }
)  # fmt: skip

# HostConfig keys checked one by one below.
_CHECKED_HOST_KEYS = frozenset(
    {
        "Privileged", "CapAdd", "SecurityOpt", "Sysctls", "IpcMode", "PidMode", "UTSMode",
        "UsernsMode", "CgroupnsMode", "NetworkMode", "Mounts", "Devices", "DeviceRequests",
        "DeviceCgroupRules", "MaskedPaths", "ReadonlyPaths", "LogConfig", "Annotations",
    }
)  # fmt: skip

# Docker's default capability set (moby oci/caps/defaults.go): adding one of these is a no-op.
DOCKER_DEFAULT_CAPS = frozenset(
    {
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
    }
)  # fmt: skip

# Namespace modes: HostConfig key -> the name used in accept.host_namespaces.
_NAMESPACE_KEYS = {
    "PidMode": "pid",
    "IpcMode": "ipc",
    "UTSMode": "uts",
    "NetworkMode": "network",
    "UsernsMode": "userns",
    "CgroupnsMode": "cgroup",
}

_ENDPOINT_KEYS = frozenset({"Aliases", "IPAMConfig", "MacAddress"})
_MOUNT_KEYS = frozenset({"Type", "Source", "Target", "ReadOnly", "BindOptions", "VolumeOptions",
                         "TmpfsOptions", "Consistency"})  # fmt: skip
_BIND_OPTION_KEYS = frozenset({"Propagation"})
_VOLUME_OPTION_KEYS = frozenset({"NoCopy", "Labels"})  # no DriverConfig: a volume can be a bind
_NO_NEW_PRIVILEGES = frozenset({"no-new-privileges", "no-new-privileges:true",
                                "no-new-privileges=true"})  # fmt: skip


@dataclass(frozen=True)
class DaemonFacts:
    """What about the target's own daemon changes what is a privilege."""

    # On cgroup v1 Docker gives every container the host's cgroup namespace.
    cgroup_version: str = "2"


def check_spec(spec: ContainerSpec, accept: AcceptConfig, daemon: DaemonFacts) -> list[str]:
    """Every reason this host refuses to create `spec`, one line each; empty: accepted."""
    body = spec.body
    reasons: list[str] = []
    for key in sorted(set(body) - _BODY_KEYS):
        reasons.append(f"{key}: unknown create-body key, not accepted")
    host = body.get("HostConfig") or {}
    if not isinstance(host, dict):
        return [*reasons, "HostConfig: must be an object"]
    for key in sorted(set(host) - _SAFE_HOST_KEYS - _CHECKED_HOST_KEYS):
        reasons.append(f"HostConfig.{key}: unknown key that may grant privilege, not accepted")
    checks = (
        _privileged, _namespaces, _capabilities, _security_opts, _sysctls, _devices,
        _system_paths, _log_config, _annotations,
    )  # fmt: skip
    for check in checks:
        reasons.extend(check(host, accept, daemon))
    reasons.extend(_mounts(host.get("Mounts"), spec, accept))
    reasons.extend(_endpoints(body.get("NetworkingConfig")))
    return reasons


def _hint(field: str) -> str:
    return f"allow with migration.accept.{field}"


def _privileged(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    if host.get("Privileged") and not accept.privileged:
        why = "a privileged container is root on the host"
        return [f"HostConfig.Privileged: {why} ({_hint('privileged')})"]
    return []


def _namespaces(host: dict[str, Any], accept: AcceptConfig, daemon: DaemonFacts) -> list[str]:
    out = []
    for key, ns in _NAMESPACE_KEYS.items():
        value = host.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            out.append(f"HostConfig.{key}: must be a string")
        elif value.startswith("container:"):
            # The source refuses these too: another container's namespace is not portable.
            out.append(f"HostConfig.{key} {value!r}: joins another container's namespace")
        elif value == "host":
            if ns == "cgroup" and daemon.cgroup_version == "1":
                continue  # Docker's default on cgroup v1, what every container here gets
            if ns not in accept.host_namespaces:
                out.append(
                    f"HostConfig.{key} 'host': shares the host's {ns} namespace "
                    f"({_hint('host_namespaces')}: [{ns}])"
                )
    return out


def _norm_cap(cap: str) -> str:
    cap = cap.strip().upper()
    return cap.removeprefix("CAP_")


def _capabilities(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    caps = host.get("CapAdd") or []
    if not _is_str_list(caps):
        return ["HostConfig.CapAdd: must be a list of capability names"]
    allowed = {_norm_cap(c) for c in accept.capabilities}
    extra = sorted({_norm_cap(c) for c in caps} - DOCKER_DEFAULT_CAPS - allowed)
    if "ALL" in allowed:
        extra = []
    if extra:
        return [
            f"HostConfig.CapAdd: {', '.join(extra)} beyond Docker's default capabilities "
            f"({_hint('capabilities')})"
        ]
    return []


def _security_opts(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    opts = host.get("SecurityOpt") or []
    if not _is_str_list(opts):
        return ["HostConfig.SecurityOpt: must be a list of strings"]
    out = []
    for opt in opts:
        if opt in _NO_NEW_PRIVILEGES or opt in accept.security_opts:
            continue
        # Docker itself adds label=disable to privileged containers.
        privileged = bool(host.get("Privileged")) and accept.privileged
        if opt in ("label=disable", "label:disable") and privileged:
            continue
        out.append(
            f"HostConfig.SecurityOpt {opt[:80]!r}: may disable the container's confinement "
            f"({_hint('security_opts')})"
        )
    return out


def _sysctls(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    sysctls = host.get("Sysctls") or {}
    if not isinstance(sysctls, dict):
        return ["HostConfig.Sysctls: must be an object"]
    refused = sorted(str(k) for k in sysctls if k not in accept.sysctls)
    if refused:
        return [f"HostConfig.Sysctls: {', '.join(refused)} not accepted ({_hint('sysctls')})"]
    return []


def _devices(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    out = []
    devices = host.get("Devices") or []
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        out.append("HostConfig.Devices: must be a list of objects")
    else:
        allowed = {posixpath.normpath(d) for d in accept.devices}
        for dev in devices:
            path = str(dev.get("PathOnHost") or "")
            if posixpath.normpath(path) not in allowed:
                out.append(f"HostConfig.Devices: host device {path!r} ({_hint('devices')})")
    if host.get("DeviceRequests") and not accept.device_requests:
        out.append(
            "HostConfig.DeviceRequests: device requests (GPUs) reach host hardware "
            f"({_hint('device_requests')})"
        )
    rules = host.get("DeviceCgroupRules") or []
    if not _is_str_list(rules):
        out.append("HostConfig.DeviceCgroupRules: must be a list of strings")
    else:
        for rule in rules:
            if rule not in accept.device_cgroup_rules:
                out.append(
                    f"HostConfig.DeviceCgroupRules {rule[:40]!r}: opens host devices "
                    f"({_hint('device_cgroup_rules')})"
                )
    return out


def _system_paths(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    if accept.unmask_system_paths:
        return []
    return [
        f"HostConfig.{key}: overrides Docker's masking of /proc and /sys "
        f"({_hint('unmask_system_paths')})"
        for key in ("MaskedPaths", "ReadonlyPaths")
        if key in host
    ]


def _log_config(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    cfg = host.get("LogConfig")
    if cfg is None:
        return []
    if not isinstance(cfg, dict):
        return ["HostConfig.LogConfig: must be an object"]
    kind = str(cfg.get("Type") or "")
    if kind and kind not in accept.log_drivers:
        return [f"HostConfig.LogConfig: log driver {kind[:40]!r} ({_hint('log_drivers')})"]
    return []


def _annotations(host: dict[str, Any], accept: AcceptConfig, _: DaemonFacts) -> list[str]:
    # org.criu.config names a CRIU config file on this host, which can run scripts.
    notes = host.get("Annotations") or {}
    if not isinstance(notes, dict):
        return ["HostConfig.Annotations: must be an object"]
    refused = sorted(str(k) for k in notes if k not in accept.annotations)
    if refused:
        return [f"HostConfig.Annotations: {', '.join(refused)} ({_hint('annotations')})"]
    return []


def _mounts(mounts: Any, spec: ContainerSpec, accept: AcceptConfig) -> list[str]:
    if mounts is None:
        return []
    if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
        return ["HostConfig.Mounts: must be a list of objects"]
    out = []
    volumes = {v.name for v in spec.volumes}
    for m in mounts:
        target = str(m.get("Target") or "")
        where = f"HostConfig.Mounts {target[:80]!r}"
        unknown = sorted(set(m) - _MOUNT_KEYS)
        if unknown:
            out.append(f"{where}: unknown mount key(s) {', '.join(unknown)}")
            continue
        kind = m.get("Type")
        if kind == "bind":
            out.extend(_bind(where, m, accept))
        elif kind == "volume":
            opts = m.get("VolumeOptions") or {}
            bad = sorted(set(opts) - _VOLUME_OPTION_KEYS) if isinstance(opts, dict) else ["?"]
            if bad:
                out.append(f"{where}: volume options {', '.join(bad)} not accepted")
            if m.get("Source") not in volumes:
                out.append(f"{where}: volume {str(m.get('Source'))[:80]!r} is not in the spec")
        elif kind != "tmpfs":
            out.append(f"{where}: mount type {str(kind)[:20]!r} not accepted")
    return out


def _bind(where: str, m: dict[str, Any], accept: AcceptConfig) -> list[str]:
    opts = m.get("BindOptions") or {}
    if not isinstance(opts, dict) or set(opts) - _BIND_OPTION_KEYS:
        return [f"{where}: bind options other than Propagation not accepted"]
    source = m.get("Source")
    if not isinstance(source, str) or not source.startswith("/"):
        return [f"{where}: bind source must be an absolute path"]
    if not bind_allowed(source, accept.bind_prefixes):
        return [
            f"{where}: bind of host path {source[:80]!r} is outside the accepted prefixes "
            f"({_hint('bind_prefixes')})"
        ]
    return []


def bind_allowed(source: str, prefixes: Iterable[Path]) -> bool:
    """Is `source` (and where its symlinks lead, as far as this host can see) under a prefix?"""
    if ".." in source.split("/"):
        return False
    lexical = posixpath.normpath(source)
    candidates = {lexical, os.path.realpath(lexical)}
    return all(any(_under(path, str(p)) for p in prefixes) for path in candidates)


def _under(path: str, prefix: str) -> bool:
    prefix = posixpath.normpath(prefix)
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def _endpoints(networking: Any) -> list[str]:
    if networking is None:
        return []
    if not isinstance(networking, dict) or set(networking) - {"EndpointsConfig"}:
        return ["NetworkingConfig: only EndpointsConfig is accepted"]
    endpoints = networking.get("EndpointsConfig") or {}
    if not isinstance(endpoints, dict):
        return ["NetworkingConfig.EndpointsConfig: must be an object"]
    out = []
    for net, ep in endpoints.items():
        if ep is not None and (not isinstance(ep, dict) or set(ep) - _ENDPOINT_KEYS):
            out.append(f"NetworkingConfig.EndpointsConfig.{net}: only {sorted(_ENDPOINT_KEYS)}")
    return out


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# ------------------------------------------------------------------ the spec's shape


class _Loose(BaseModel):
    # Extra keys are dropped, not refused: a newer source may send more than we read.
    model_config = ConfigDict(extra="ignore", strict=True)


class _Bind(_Loose):
    source: str
    destination: str
    read_only: bool = False


class _Volume(_Loose):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=255)
    destination: str
    driver: str = "local"
    read_only: bool = False
    anonymous: bool = False
    daemon_path: str = ""


class _Port(_Loose):
    container_port: str
    host_ip: str
    host_port: int = Field(ge=0, le=65535)


class _Spec(_Loose):
    id: str
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=255)
    image_ref: str = ""
    image_id: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    body: dict[str, Any]
    restart_policy: dict[str, Any] = {}
    networks: list[str] = []
    binds: list[_Bind] = []
    volumes: list[_Volume] = []
    ports: list[_Port] = []
    has_healthcheck: bool = False
    upper_dir: str | None = None
    graph_driver: str = ""
    memory_limit: int = 0
    # Never dropped: restore options follow from these, and file-lock images
    # restored without file-locks silently lose their locks.
    dump_options: list[Annotated[str, Field(pattern=r"^[a-z][a-z-]*$", max_length=40)]] = Field(
        default=[], max_length=8
    )
    addresses: dict[str, dict[str, str]] = {}
    mac_address: str = ""

    @field_validator("restart_policy")
    @classmethod
    def _policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("Name", "no"), str):
            raise ValueError("Name must be a string")
        return value


class SpecShapeError(ValueError):
    """The staged spec is not the shape of a ContainerSpec; the message is one line."""


def parse_spec(data: Any) -> ContainerSpec:
    """A ContainerSpec from a peer's JSON, or SpecShapeError naming the first bad field."""
    try:
        model = _Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecShapeError(one_line(exc, "spec")) from None
    return ContainerSpec.from_dict(model.model_dump())
