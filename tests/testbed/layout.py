"""Where the testbed keeps things, and the description of one host.

Everything the testbed creates lives under three roots so `down` can find
and remove it: the rootfs cache, per-host data, and per-host runtime dirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# FERRY_TESTBED_ID (a small number) runs a second, independent testbed beside
# the default one, e.g. to try `.ci/run` from a clone while developing.
INSTANCE = os.environ.get("FERRY_TESTBED_ID", "")
CACHE_DIR = Path(os.environ.get("FERRY_TESTBED_CACHE", "/var/cache/ferry-testbed"))
DATA_DIR = Path(f"/var/lib/ferry-testbed{INSTANCE}")
# Unix socket paths are limited to 108 bytes, so runtime dirs stay short and on tmpfs.
RUN_DIR = Path(f"/run/ferry-testbed{INSTANCE}")
STATE_FILE = RUN_DIR / "state.json"

SUBNET_PREFIX = f"10.231.{INSTANCE or 0}"  # the private bridge all hosts share; /24
SUBNET_BITS = 24
NETNS_PREFIX = f"ferry-tb{INSTANCE}-"
SWITCH_NETNS = f"{NETNS_PREFIX}switch"
BRIDGE = "ftb-br0"
MAX_HOSTS = 4
AGENT_PORT = 7443


def host_name(index: int) -> str:
    return f"host{index}"


def host_ip(index: int) -> str:
    return f"{SUBNET_PREFIX}.{10 + index}"


@dataclass
class Host:
    """One namespaced Docker host, as `status` reports it."""

    name: str
    ip: str
    netns: str
    docker_host: str
    data_root: str
    state_dir: str
    host_dir: str
    run_dir: str
    init_pid: int = 0
    dockerd_pid: int = 0
    agent_config: str | None = None
    agent_pid: int = 0
    # True: systemd is PID 1 and runs docker.service (`up --systemd`, systemd_hosts.py).
    systemd: bool = False

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def veth(self) -> str:
        # The switch-side end of this host's link; cutting it isolates the host.
        return f"ftb-{self.name}"

    @property
    def agent_log(self) -> str:
        return f"{self.host_dir}/agent.log"

    @property
    def control_socket(self) -> str:
        return f"{self.run_dir}/ferry.sock"

    @property
    def socket_path(self) -> str:
        return self.docker_host.removeprefix("unix://")

    def public(self) -> dict[str, object]:
        data = asdict(self)
        for private in ("host_dir", "run_dir", "init_pid", "dockerd_pid", "agent_pid"):
            data.pop(private)
        if data["agent_config"] is None:
            data.pop("agent_config")
        return data


def make_host(index: int) -> Host:
    name = host_name(index)
    host_dir = DATA_DIR / name
    run_dir = RUN_DIR / name
    return Host(
        name=name,
        ip=host_ip(index),
        netns=NETNS_PREFIX + name,
        docker_host=f"unix://{run_dir}/run/docker.sock",
        data_root=str(host_dir / "docker"),
        state_dir=str(host_dir / "state"),
        host_dir=str(host_dir),
        run_dir=str(run_dir),
    )


def save_state(hosts: list[Host], rootfs: Path) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"rootfs": str(rootfs), "hosts": [asdict(h) for h in hosts]}, indent=2)
    )
    tmp.replace(STATE_FILE)


def load_state() -> tuple[list[Host], Path | None]:
    if not STATE_FILE.exists():
        return [], None
    data = json.loads(STATE_FILE.read_text())
    return [Host(**h) for h in data["hosts"]], Path(data["rootfs"])


def load_hosts() -> list[Host]:
    """The running testbed's hosts (empty when it is down)."""
    return load_state()[0]
