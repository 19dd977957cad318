"""Real `ferry run` agents on the testbed hosts.

Each agent runs in its host's network namespace (and the root mount
namespace, so it uses this checkout's virtualenv), with a certificate from a
testbed CA and a config that lists every other host as a peer.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.testbed import procs
from tests.testbed.layout import AGENT_PORT, DATA_DIR, Host, load_state, save_state
from tests.testbed.progress import step

REPO = Path(__file__).resolve().parents[2]
CERT_DIR = DATA_DIR / "certs"
DEFAULT_POLICIES = ("maintenance.yaml",)


def _ferry(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def _ensure_certs(hosts: list[Host]) -> None:
    if not (CERT_DIR / "ca.crt").exists():
        subprocess.run(
            _ferry("certs", "init", "--dir", str(CERT_DIR)), check=True, capture_output=True
        )
    for h in hosts:
        if not (CERT_DIR / f"{h.name}.crt").exists():
            subprocess.run(
                _ferry("certs", "issue", h.name, "--dir", str(CERT_DIR), "--ip", h.ip),
                check=True,
                capture_output=True,
            )


def write_config(
    host: Host, hosts: list[Host], policies: dict[str, str] | None = None, **overrides: object
) -> Path:
    """Write the host's agent config and policy dir; `policies` maps file name -> YAML text.

    `overrides` replace top-level keys; a mapping given for a section that has
    one (e.g. ``migration={"checkpoint_via": "runc"}``, ``docker={...}``) is
    merged into it key by key.
    """
    hd = Path(host.host_dir)
    pol_dir = hd / "policies"
    shutil.rmtree(pol_dir, ignore_errors=True)
    pol_dir.mkdir(parents=True)
    if policies is None:
        for name in DEFAULT_POLICIES:
            shutil.copy(REPO / "policies" / name, pol_dir / name)
    else:
        for name, text in policies.items():
            (pol_dir / name).write_text(text)
    config: dict[str, object] = {
        "name": host.name,
        "listen": f"{host.ip}:{AGENT_PORT}",
        "state_dir": host.state_dir,
        "policies_dir": str(pol_dir),
        "control_socket": host.control_socket,
        "docker": {
            "url": host.docker_host,
            "data_root": host.data_root,
            # CRIU lives in the host's rootfs, where its dockerd runs.
            "criu_check": ["nsenter", "-t", str(host.init_pid), "-m", "-r", "criu", "--version"],
            # runc runs in dockerd's namespaces by default (docker.runc_in_daemon_namespaces:
            # nsenter to the PID behind docker.url), as it would under the systemd unit.
            # The local lazy-pages daemon runs beside dockerd, like runc.
            "criu_command": ["nsenter", "-t", str(host.init_pid), "-m", "-p", "-r", "criu"],
            # The host's /tmp, where its containerd leaves a copy of each restored checkpoint.
            "containerd_tmp": str(Path(host.host_dir) / "tmp"),
        },
        "peers": [
            {"name": p.name, "address": f"{p.ip}:{AGENT_PORT}"}
            for p in hosts
            if p.name != host.name
        ],
        "tls": {
            "ca": str(CERT_DIR / "ca.crt"),
            "cert": str(CERT_DIR / f"{host.name}.crt"),
            "key": str(CERT_DIR / f"{host.name}.key"),
        },
        "limits": {"max_concurrent_migrations": 2},
        "logging": {"level": "info", "format": "json"},
        "signals": {"poll_interval": "1s"},
    }
    for key, value in overrides.items():
        current = config.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            config[key] = {**current, **value}
        else:
            config[key] = value
    path = hd / "ferry.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    host.agent_config = str(path)
    return path


def _agent_answers(host: Host) -> bool:
    from agent.service.control import AgentUnreachable, ControlClient

    async def ask() -> bool:
        try:
            await ControlClient(Path(host.control_socket), timeout=3).status()
            return True
        except AgentUnreachable:
            return False

    return asyncio.run(ask())


def start_agent(host: Host, timeout: float = 60.0) -> None:
    if procs.alive(host.agent_pid):
        return
    assert host.agent_config, f"{host.name} has no agent config; call write_config first"
    log = open(host.agent_log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        procs.netns_argv(host, _ferry("run", "--config", host.agent_config)),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    log.close()
    # nsenter execs env, which execs python: the pid stays the agent's.
    host.agent_pid = proc.pid

    def ready() -> bool:
        if proc.poll() is not None:
            tail = Path(host.agent_log).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{host.name}: ferry run exited ({proc.returncode}):\n{tail}")
        return _agent_answers(host)

    procs.wait_until(ready, timeout, f"{host.name} agent to answer on its control socket", 0.2)


def stop_agent(host: Host, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    pid = host.agent_pid
    if procs.alive(pid):
        procs.signal_pid(pid, sig)
        try:
            procs.wait_until(lambda: not procs.alive(pid), timeout, f"{host.name} agent to exit")
        except TimeoutError:
            procs.signal_pid(pid, signal.SIGKILL)
            procs.wait_until(lambda: not procs.alive(pid), 10, f"{host.name} agent to die")
    host.agent_pid = 0


def persist(hosts: list[Host]) -> None:
    _, rootfs = load_state()
    if rootfs is not None:
        save_state(hosts, rootfs)


def agents_up(
    hosts: list[Host],
    policies: dict[str, dict[str, str]] | None = None,
    overrides: dict[str, object] | None = None,
) -> list[Host]:
    """Start an agent on every host; `policies` maps host name -> {file: YAML}.

    `overrides` go to every host's config (see `write_config`), e.g.
    ``{"migration": {"checkpoint_via": "runc"}}``.
    """
    step(f"starting ferry agents on {', '.join(h.name for h in hosts)}")
    _ensure_certs(hosts)
    for h in hosts:
        # Each start is a clean slate: a drain left by an earlier test must not leak in,
        # and the log starts empty (the previous one is kept as agent.log.1).
        (Path(h.state_dir) / "drain").unlink(missing_ok=True)
        log = Path(h.agent_log)
        if log.exists():
            log.replace(log.with_name("agent.log.1"))
        write_config(h, hosts, (policies or {}).get(h.name), **(overrides or {}))
    try:
        for h in hosts:
            start_agent(h)
    finally:
        persist(hosts)
    step("agents up: `python -m tests.testbed exec host1 -- ferry status`")
    return hosts


def agents_down(hosts: list[Host]) -> None:
    for h in hosts:
        stop_agent(h)
    persist(hosts)
    step("agents stopped")
