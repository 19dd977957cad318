"""Testbed hosts that boot a real systemd as PID 1, with docker.service inside.

`python -m tests.testbed up --systemd` uses these instead of the plain hosts
(which run dockerd under a tiny init). Each host gets its own network, mount,
PID, UTS, IPC and cgroup namespaces, a child cgroup in every hierarchy of the
machine (hybrid layout: cgroup v1 controllers, name=systemd, cgroup2 at
unified), and an overlay of the systemd rootfs. From outside, its Docker
socket is /proc/<pid 1>/root/run/docker.sock and its files are under
/proc/<pid 1>/root. See SYSTEMD-NOTES.md for why each step is there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

from tests.testbed import procs
from tests.testbed.layout import INSTANCE, Host

INIT_SCRIPT = Path(__file__).with_name("systemd-init.sh")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# v1 controllers mounted inside each host; name=systemd and unified come on top.
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
HOST_SUBDIRS = ("upper", "work", "root", "docker", "containerd", "state")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0


def cgroup_name(host: Host) -> str:
    # The same name the plain hosts give dockerd's cgroup-parent: `down` removes both.
    return f"ferry-testbed{INSTANCE}-{host.name}"


def _hierarchies() -> list[Path]:
    present = [CGROUP_ROOT / c for c in (*V1_CONTROLLERS, "systemd", "unified")]
    missing = [p for p in present if not p.is_dir()]
    if missing:
        raise RuntimeError(
            f"systemd hosts need the hybrid cgroup layout; missing {', '.join(map(str, missing))}"
        )
    return present


def _make_cgroups(host: Host) -> list[Path]:
    """A child cgroup per hierarchy; the future PID 1 joins them all before unsharing."""
    made = []
    for top in _hierarchies():
        cg = top / cgroup_name(host)
        cg.mkdir(exist_ok=True)
        if top.name == "cpuset":
            # A new v1 cpuset starts empty, and joining it then fails with an I/O error.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (cg / knob).write_text((top / knob).read_text())
        made.append(cg)
    return made


def host_argv(host: Host, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Argv that runs `cmd` inside the host, as a login there would (all its namespaces)."""
    pid = str(host.init_pid)
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return [
        *("nsenter", "-t", pid, "-m", "-p", "-u", "-i", "-C", "-n", "-r", "-w", "--"),
        *("env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", *extra, *cmd),
    ]


def run_in(
    host: Host, cmd: list[str], timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(host_argv(host, cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{host.name}: `{' '.join(cmd)}` exited {proc.returncode}:\n"
            f"{(proc.stdout + proc.stderr).strip()[-3000:]}"
        )
    return proc


def root_path(host: Host, path: str) -> Path:
    """Where a path inside the host is reachable from the root mount namespace."""
    return Path(f"/proc/{host.init_pid}/root") / path.lstrip("/")


def prepare(host: Host) -> None:
    hd = Path(host.host_dir)
    for sub in HOST_SUBDIRS:
        (hd / sub).mkdir(parents=True, exist_ok=True)
    # Written into the overlay's upper dir before it is mounted: each host is
    # its own machine to systemd and journald.
    etc = hd / "upper" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (etc / "hostname").write_text(host.name + "\n")


def boot(host: Host, rootfs: Path) -> None:
    """Start the host's systemd and wait until the system is up and dockerd answers."""
    prepare(host)
    cgroups = _make_cgroups(host)

    def join_cgroups() -> None:
        # Runs in the child before exec: `unshare --cgroup` roots the namespace here.
        for cg in cgroups:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    master, console = os.openpty()
    log = open(Path(host.host_dir) / "init.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [
                "nsenter", f"--net={host.netns_path}",
                "unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "--cgroup",
                "--propagation", "private",
                "/bin/bash", str(INIT_SCRIPT), host.host_dir, str(rootfs), host.name,
                str(console), str(master), *V1_CONTROLLERS,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(console, master), preexec_fn=join_cgroups, start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
        os.close(master)
        os.close(console)

    def init_pid() -> int:
        if proc.poll() is not None:
            raise RuntimeError(f"{host.name}: systemd host init exited:\n{_init_log(host)}")
        kids = procs.children(proc.pid)
        if not kids:
            return 0
        # PID 1 has exec'd systemd once its comm says so.
        comm = Path(f"/proc/{kids[0]}/comm").read_text().strip()
        return kids[0] if comm == "systemd" else 0

    host.init_pid = procs.wait_until(init_pid, 20, f"{host.name} systemd to start")
    host.docker_host = f"unix://{root_path(host, '/run/docker.sock')}"
    host.data_root = str(Path(host.host_dir) / "docker")
    host.state_dir = str(Path(host.host_dir) / "state")
    wait_running(host)


def wait_running(host: Host, timeout: float = BOOT_TIMEOUT) -> None:
    """Wait for `systemctl is-system-running` to settle; a degraded system is an error."""

    def bus_up() -> bool:
        if not procs.alive(host.init_pid):
            raise RuntimeError(f"{host.name}: systemd died:\n{_init_log(host)}")
        return root_path(host, "/run/systemd/private").exists()

    procs.wait_until(bus_up, timeout, f"{host.name} systemd's manager socket", 0.1)
    state = run_in(
        host, ["systemctl", "is-system-running", "--wait"], timeout=timeout
    ).stdout.strip()
    if state != "running":
        failed = run_in(host, ["systemctl", "--failed", "--no-legend", "--plain"]).stdout
        raise RuntimeError(f"{host.name}: systemd reports {state!r}; failed units:\n{failed}")
    from tests.testbed.hosts import pings

    procs.wait_until(lambda: pings(host), timeout, f"{host.name} docker.service to answer", 0.1)


def poweroff(host: Host, timeout: float = 30.0) -> None:
    """Clean shutdown (SIGRTMIN+4 is systemd's poweroff request), SIGKILL after `timeout`."""
    pid = host.init_pid
    if not procs.alive(pid):
        return
    procs.signal_pid(pid, signal.SIGRTMIN + 4)
    try:
        procs.wait_until(lambda: not procs.alive(pid), timeout, f"{host.name} to power off")
    except TimeoutError:
        procs.signal_pid(pid, signal.SIGKILL)


def _init_log(host: Host) -> str:
    parts = []
    for name in ("init.log", "upper/var/log/console.log"):
        try:
            text = (Path(host.host_dir) / name).read_text(errors="replace")
        except FileNotFoundError:
            continue
        parts.append(f"--- {name}\n{text[-2000:]}")
    return "\n".join(parts) or "(no log)"
