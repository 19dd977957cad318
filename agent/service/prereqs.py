"""Start-up prerequisite checks, each saying exactly what to change.

`ferry run` runs these before it starts serving; fatal problems stop it with
exit 3 and one line per problem. A down peer is only a warning: the cluster
must be able to restart one agent while another host is in maintenance.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.model import PeerHealth
from agent.peer import protocol
from agent.peer.tls import check_tls_files

log = structlog.get_logger(__name__)

MIN_CRIU = (4, 2)
DEFAULT_CRIU_COMMAND = ("criu", "--version")
DAEMON_JSON = "/etc/docker/daemon.json"


@dataclass(frozen=True)
class PrereqProblem:
    check: str  # docker, criu, data_root, tls, peer:<name>
    message: str
    fix: str
    fatal: bool = True

    def __str__(self) -> str:
        level = "error" if self.fatal else "warning"
        return f"{level}: {self.check}: {self.message}; fix: {self.fix}"


class DockerInfo(Protocol):
    """The part of the Docker adapter these checks need."""

    def info(self) -> dict[str, Any]: ...

    def version(self) -> dict[str, Any]: ...


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def is_experimental(info: dict[str, Any], version: dict[str, Any]) -> bool:
    """Docker reports experimental mode in several places depending on version."""
    if _truthy(info.get("ExperimentalBuild")) or _truthy(version.get("Experimental")):
        return True
    for comp in version.get("Components") or []:
        details = comp.get("Details") or {}
        if comp.get("Name") == "Engine" and _truthy(details.get("Experimental")):
            return True
    return False


def check_docker(docker: DockerInfo, url: str) -> tuple[list[PrereqProblem], dict[str, Any]]:
    """Docker reachable and experimental (checkpoint/restore needs it). Returns info too."""
    try:
        info = docker.info()
        version = docker.version()
    except Exception as exc:  # any adapter error means "not usable"
        return [
            PrereqProblem(
                "docker",
                f"Docker is not reachable at {url}: {exc}",
                "start it (`systemctl start docker`) or set docker.url in the ferry config",
            )
        ], {}
    if is_experimental(info, version):
        return [], info
    return [
        PrereqProblem(
            "docker",
            "the Docker daemon is not in experimental mode, so checkpoint/restore is disabled",
            f'set "experimental": true in {DAEMON_JSON} and restart docker '
            "(`systemctl restart docker`)",
        )
    ], info


_CRIU_VERSION = re.compile(r"Version:\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_criu_version(text: str) -> tuple[int, ...] | None:
    m = _CRIU_VERSION.search(text)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def _fmt(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version)


Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def check_criu(
    argv: Sequence[str] = DEFAULT_CRIU_COMMAND,
    run: Runner | None = None,
    timeout: float = 20.0,
    minimum: tuple[int, int] = MIN_CRIU,
    setting: str = "the CRIU check command in the ferry config",
) -> list[PrereqProblem]:
    """Run the configured CRIU command: a version >= minimum, or `criu check` passing.

    CRIU may live in another mount namespace than the agent (the testbed runs
    it inside each host's dockerd namespace), so the command is configurable,
    e.g. ["nsenter", "-t", "<dockerd pid>", "-m", "criu", "--version"].
    """
    shown = " ".join(argv)
    want = _fmt(minimum)
    install = f"install CRIU >= {want} (or point {setting} at the command that runs it)"
    try:
        proc = (run or _run)(argv, timeout)
    except FileNotFoundError:
        return [PrereqProblem("criu", f"`{shown}`: command not found", install)]
    except subprocess.TimeoutExpired:
        return [PrereqProblem("criu", f"`{shown}` did not finish in {timeout:g}s", install)]
    except OSError as exc:
        return [PrereqProblem("criu", f"`{shown}` could not run: {exc}", install)]
    output = f"{proc.stdout}\n{proc.stderr}".strip()
    last = output.splitlines()[-1] if output else "no output"
    if proc.returncode != 0:
        return [PrereqProblem("criu", f"`{shown}` exited {proc.returncode}: {last}", install)]
    version = parse_criu_version(output)
    if version is None:
        if "looks good" in output.lower():  # `criu check` passes without printing a version
            log.info("prereqs.criu_check_passed", command=shown)
            return []
        return [PrereqProblem("criu", f"`{shown}` printed no CRIU version: {last}", install)]
    if version[:2] < minimum:
        return [PrereqProblem("criu", f"CRIU {_fmt(version)} is too old (need >= {want})", install)]
    log.info("prereqs.criu_ok", version=_fmt(version))
    return []


def check_runc(
    argv: Sequence[str], run: Runner | None = None, timeout: float = 20.0
) -> list[PrereqProblem]:
    """migration.checkpoint_via: runc needs docker.runc_command to answer `--version`."""
    shown = " ".join([*argv, "--version"])
    fix = (
        "point docker.runc_command at dockerd's runc, run in dockerd's mount and PID "
        "namespaces (e.g. [nsenter, -t, <dockerd pid>, -m, -p, runc, --root, "
        "/run/docker/runtime-runc/moby]), or set migration.checkpoint_via: engine"
    )
    try:
        proc = (run or _run)([*argv, "--version"], timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return [PrereqProblem("runc", f"`{shown}` could not run: {exc}", fix)]
    said = f"{proc.stdout}\n{proc.stderr}".strip()
    if proc.returncode != 0 or "runc version" not in said:
        last = said.splitlines()[-1] if said else "no output"
        return [PrereqProblem("runc", f"`{shown}` exited {proc.returncode}: {last}", fix)]
    return []


def check_data_root(info: dict[str, Any], configured: Path | None) -> list[PrereqProblem]:
    """The agent reads container filesystems and volumes under the Docker data root."""
    daemon_root = info.get("DockerRootDir")
    root = configured or (Path(daemon_root) if daemon_root else None)
    if root is None:
        return []  # Docker unreachable: already reported
    problems: list[PrereqProblem] = []
    if configured and daemon_root and Path(daemon_root) != configured:
        # Normal when the agent sees the daemon's files at another path (the daemon
        # in its own mount namespace or container): that is what the key is for.
        log.info("prereqs.data_root_mapped", configured=str(configured), daemon=daemon_root)
    if not root.is_dir():
        problems.append(
            PrereqProblem(
                "data_root",
                f"Docker data root {root} does not exist here",
                "set docker.data_root to the path the agent sees it at "
                "(check `docker info --format '{{.DockerRootDir}}'`)",
            )
        )
    elif not os.access(root, os.R_OK | os.X_OK):
        problems.append(
            PrereqProblem(
                "data_root",
                f"Docker data root {root} is not readable by this user",
                "run ferry as root (the systemd unit does)",
            )
        )
    return problems


def check_tls(ca: Path, cert: Path, key: Path, host: str) -> list[PrereqProblem]:
    fix = (
        f"create them with `ferry certs issue {host}` on the CA host and copy them here, "
        "or set tls.ca / tls.cert / tls.key in the ferry config"
    )
    errors = check_tls_files(ca, cert, key, host_name=host)
    return [PrereqProblem("tls", e, fix) for e in errors]


PeerProbe = Callable[[], Awaitable[list[PeerHealth]]]


async def check_peers(probe: PeerProbe, timeout: float = 10.0) -> list[PrereqProblem]:
    """Warn (never fail) about peers that are down, present bad certificates, or are too old."""
    try:
        peers = await asyncio.wait_for(probe(), timeout)
    except TimeoutError:
        return [
            PrereqProblem(
                "peers", f"probing peers took over {timeout:g}s", "check the network", fatal=False
            )
        ]
    problems = []
    for peer in peers:
        behind = protocol.mismatch(peer.protocol, peer.protocol_oldest)
        if peer.reachable and behind:
            problems.append(
                PrereqProblem(
                    f"peer:{peer.name}",
                    f"{behind.what}, so no container moves between them",
                    f"upgrade the agent on {peer.name if behind.peer_is_older else 'this host'}",
                    fatal=False,
                )
            )
            continue
        if peer.reachable:
            continue
        why = peer.error or "unreachable"
        # The health monitor's errors already say "peer NAME at ADDRESS: ...".
        line = why if why.startswith(f"peer {peer.name} ") else f"peer {peer.name}: {why}"
        problems.append(
            PrereqProblem(
                f"peer:{peer.name}",
                f"not usable: {line}",
                "start ferry there, check the address in peers[], the firewall, and that its "
                "certificate was issued by this cluster's CA for that name",
                fatal=False,
            )
        )
    return problems


def fatal(problems: Sequence[PrereqProblem]) -> list[PrereqProblem]:
    return [p for p in problems if p.fatal]


async def run_prereqs(
    *,
    docker: DockerInfo,
    docker_url: str,
    data_root: Path | None,
    criu_command: Sequence[str],
    tls_files: tuple[Path, Path, Path],
    host: str,
    peer_probe: PeerProbe | None = None,
    runc_command: Sequence[str] | None = None,  # checked when checkpoints go through runc
) -> list[PrereqProblem]:
    """Every check, fatal problems first. Blocking checks run in a worker thread."""
    docker_problems, info = await asyncio.to_thread(check_docker, docker, docker_url)
    problems = [*docker_problems]
    problems += await asyncio.to_thread(check_criu, criu_command)
    if runc_command is not None:
        problems += await asyncio.to_thread(check_runc, runc_command)
    problems += check_data_root(info, data_root)
    problems += check_tls(*tls_files, host=host)
    if peer_probe is not None:
        problems += await check_peers(peer_probe)
    for p in problems:
        (log.error if p.fatal else log.warning)(
            "prereqs.problem", check=p.check, message=p.message, fix=p.fix
        )
    return sorted(problems, key=lambda p: not p.fatal)
