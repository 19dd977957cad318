"""Bring the namespaced Docker hosts up and down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from tests.testbed import procs
from tests.testbed.layout import (
    BRIDGE,
    DATA_DIR,
    INSTANCE,
    MAX_HOSTS,
    NETNS_PREFIX,
    RUN_DIR,
    STATE_FILE,
    SUBNET_BITS,
    SWITCH_NETNS,
    Host,
    load_state,
    make_host,
    save_state,
)
from tests.testbed.progress import step

INIT_SCRIPT = Path(__file__).with_name("host-init.sh")
HOST_SUBDIRS = (
    "upper",
    "work",
    "root",
    "docker",
    "containerd",
    "etc-docker",
    "tmp",
    "state",
    "log",
)
DAEMON_JSON = {
    "experimental": True,
    "storage-driver": "overlay2",
    "log-driver": "json-file",
    # Per-host cgroup parent keeps the hosts' containers apart and lets `down` clean up.
    "cgroup-parent": "/ferry-testbed{instance}-{name}",
}


def preflight() -> str | None:
    """Why this machine cannot run the testbed, or None if it can."""
    if os.geteuid() != 0:
        return "the testbed needs root (namespaces, mounts, dockerd); run as root: `sudo make test`"
    for tool in ("ip", "nsenter", "unshare", "debootstrap"):
        if shutil.which(tool) is None:
            return (
                f"`{tool}` is missing; run `make deps` (installs debootstrap, iproute2, util-linux)"
            )
    for ns in ("net", "mnt", "pid"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"this kernel has no {ns} namespaces"
    probe = subprocess.run(["unshare", "-m", "-p", "-f", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create mount/PID namespaces here: {probe.stderr.strip()}"
    return None


def _setup_switch() -> None:
    if procs.netns_inode(f"/run/netns/{SWITCH_NETNS}") is None:
        procs.run(["ip", "netns", "add", SWITCH_NETNS])
    sw = ["ip", "-n", SWITCH_NETNS]
    if procs.run([*sw, "link", "show", BRIDGE], check=False).returncode != 0:
        procs.run([*sw, "link", "add", BRIDGE, "type", "bridge"])
    procs.run([*sw, "link", "set", BRIDGE, "up"])


def _setup_network(host: Host) -> None:
    if procs.netns_inode(host.netns_path) is None:
        procs.run(["ip", "netns", "add", host.netns])
    sw = ["ip", "-n", SWITCH_NETNS]
    if procs.run([*sw, "link", "show", host.veth], check=False).returncode != 0:
        procs.run(
            [
                *sw,
                "link",
                "add",
                host.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            ]
        )
    procs.run([*sw, "link", "set", host.veth, "master", BRIDGE, "up"])
    hn = ["ip", "-n", host.netns]
    procs.run([*hn, "link", "set", "lo", "up"])
    procs.run([*hn, "addr", "replace", f"{host.ip}/{SUBNET_BITS}", "dev", "eth0"])
    procs.run([*hn, "link", "set", "eth0", "up"])


def _prepare_dirs(host: Host) -> None:
    hd = Path(host.host_dir)
    for sub in HOST_SUBDIRS:
        (hd / sub).mkdir(parents=True, exist_ok=True)
    (Path(host.run_dir) / "run").mkdir(parents=True, exist_ok=True)
    daemon = {
        k: (v.format(name=host.name, instance=INSTANCE) if isinstance(v, str) else v)
        for k, v in DAEMON_JSON.items()
    }
    (hd / "etc-docker" / "daemon.json").write_text(json.dumps(daemon, indent=2) + "\n")


def _start_init(host: Host, rootfs: Path) -> None:
    ready = Path(host.run_dir) / "run" / "testbed-init.ready"
    ready.unlink(missing_ok=True)
    log = open(Path(host.host_dir) / "init.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            "nsenter", f"--net={host.netns_path}",
            "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
            "/bin/sh", str(INIT_SCRIPT), host.host_dir, host.run_dir, str(rootfs),
        ],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()

    def init_ready() -> bool:
        if proc.poll() is not None:
            text = (Path(host.host_dir) / "init.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{host.name}: namespace init exited ({proc.returncode}):\n{text}")
        return ready.exists()

    procs.wait_until(init_ready, 20, f"{host.name} namespace init")
    # unshare forks: the child is PID 1 of the host's PID namespace.
    host.init_pid = procs.wait_until(lambda: (procs.children(proc.pid) or [0])[0], 5, "init pid")


def start_dockerd(host: Host, timeout: float = 60.0) -> None:
    """Start this host's dockerd inside its namespaces and wait until it answers."""
    if procs.alive(host.dockerd_pid):
        return
    Path(host.socket_path).unlink(missing_ok=True)
    # Redirections happen inside the host's mount namespace so dockerd and its
    # children hold no file from the root namespace.
    cmd = procs.nsenter_host(
        host, ["/bin/sh", "-c", "exec /usr/sbin/dockerd </dev/null >>/var/log/dockerd.log 2>&1"]
    )
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    host.dockerd_pid = procs.wait_until(
        lambda: (procs.children(proc.pid) or [0])[0], 5, "dockerd pid"
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{host.name}: dockerd exited; see {dockerd_log(host)}:\n{log_tail(host)}"
            )
        return pings(host)

    procs.wait_until(answers, timeout, f"{host.name} dockerd to answer", interval=0.1)


def dockerd_log(host: Host) -> Path:
    return Path(host.host_dir) / "log" / "dockerd.log"


def log_tail(host: Host, lines: int = 20) -> str:
    try:
        return "\n".join(dockerd_log(host).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def stop_dockerd(host: Host, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    pid = host.dockerd_pid
    if not procs.alive(pid):
        return
    procs.signal_pid(pid, sig)
    procs.wait_until(lambda: not procs.alive(pid), timeout, f"{host.name} dockerd to exit")
    host.dockerd_pid = 0


def pings(host: Host) -> bool:
    """Does the host's dockerd answer on its socket?"""
    try:
        client = docker.APIClient(base_url=host.docker_host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # not up (yet): no socket, refused, timeout
        return False


def healthy(host: Host) -> bool:
    # On a systemd host docker.service owns dockerd; its answer is what counts.
    daemon = host.systemd or procs.alive(host.dockerd_pid)
    return procs.alive(host.init_pid) and daemon and pings(host)


def up(count: int, rootfs: Path, systemd: bool = False) -> list[Host]:
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"hosts must be between 1 and {MAX_HOSTS}, not {count}")
    existing, old_rootfs = load_state()
    same_kind = all(h.systemd == systemd for h in existing)
    if existing and old_rootfs == rootfs and same_kind and all(healthy(h) for h in existing):
        if len(existing) >= count:
            step(f"{len(existing)} hosts already up")
            return existing
        # Growing a healthy testbed keeps the running hosts (and whatever runs on them).
        new = [make_host(i) for i in range(len(existing) + 1, count + 1)]
    else:
        if existing or _leftovers():
            step("tearing down a previous or broken testbed first")
            down()
        existing, new = [], [make_host(i) for i in range(1, count + 1)]
    step(f"creating network: bridge {BRIDGE} in netns {SWITCH_NETNS}, {len(new)} new host(s)")
    _setup_switch()
    for host in new:
        _setup_network(host)
    if systemd:
        _boot_systemd(new, rootfs)
    else:
        for host in new:
            _prepare_dirs(host)
            _start_init(host, rootfs)
        step("starting dockerd on the new hosts")
        with ThreadPoolExecutor(max_workers=len(new)) as pool:
            list(pool.map(start_dockerd, new))
    hosts = existing + new
    save_state(hosts, rootfs)
    for host in new:
        step(f"{host.name} up: {host.ip}, {host.docker_host}")
    return hosts


def _boot_systemd(new: list[Host], rootfs: Path) -> None:
    from tests.testbed import systemd_hosts

    step("booting systemd (PID 1) with docker.service on the new hosts")
    for host in new:
        host.systemd = True
    try:
        with ThreadPoolExecutor(max_workers=len(new)) as pool:
            list(pool.map(lambda h: systemd_hosts.boot(h, rootfs), new))
    finally:
        # Even a half-booted host must be in state.json, so `down` finds its PID 1.
        existing, _ = load_state()
        save_state([*existing, *new], rootfs)


def _leftovers() -> bool:
    return bool(leftovers())


def down() -> None:
    """Stop everything the testbed started and remove its namespaces, links and data."""
    hosts, _ = load_state()
    names = {h.netns for h in hosts}
    listing = procs.run(["ip", "netns", "list"], check=False).stdout
    names |= {
        line.split()[0]
        for line in listing.splitlines()
        if line.strip() and line.startswith(NETNS_PREFIX)
    }
    names.discard(SWITCH_NETNS)
    inodes = {i for n in names if (i := procs.netns_inode(f"/run/netns/{n}")) is not None}
    for host in hosts:
        # A clean dockerd stop lets containerd unmount container rootfs first.
        try:
            stop_dockerd(host, timeout=20)
        except TimeoutError:
            procs.signal_pid(host.dockerd_pid, signal.SIGKILL)
        procs.signal_pid(host.init_pid, signal.SIGKILL)
    for name in sorted(names):
        path = f"/run/netns/{name}"
        # Agents and clients started with `exec` live in the netns but not the PID ns.
        for pid in procs.pids_in_netns(path):
            procs.signal_pid(pid, signal.SIGKILL)
        procs.wait_until(
            lambda p=path: not procs.pids_in_netns(p), 20, f"processes in {name} to exit"
        )
        procs.run(["ip", "netns", "delete", name], check=False)
    procs.run(["ip", "netns", "delete", SWITCH_NETNS], check=False)
    _remove_cgroups()
    _unmount_under(DATA_DIR)
    _unmount_under(RUN_DIR)
    STATE_FILE.unlink(missing_ok=True)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    problems = leftovers(inodes)
    if problems:
        raise RuntimeError("down left things behind: " + "; ".join(problems))
    step("testbed down: no namespaces, links, mounts or daemons left")


def leftovers(netns_inodes: set[int] | None = None) -> list[str]:
    """What a previous testbed left on this machine (empty when clean)."""
    found = []
    listing = procs.run(["ip", "netns", "list"], check=False).stdout.split()
    if any(n.startswith(NETNS_PREFIX) for n in listing):
        found.append(f"network namespaces: {[n for n in listing if n.startswith(NETNS_PREFIX)]}")
    links = procs.run(["ip", "-o", "link", "show"], check=False).stdout
    if "ftb-" in links:
        found.append("veth/bridge links named ftb-*")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4]
        if mnt.startswith((str(DATA_DIR), str(RUN_DIR))):
            found.append(f"mount {mnt}")
    cgroups = _testbed_cgroups()
    if cgroups:
        found.append(f"cgroups: {[str(c) for c in cgroups]}")
    # A process left in a deleted netns keeps it alive, unseen by `ip netns list`.
    stray = procs.pids_in_netns_inodes(netns_inodes or set())
    if stray:
        found.append(f"processes still in the hosts' network namespaces: {stray}")
    return found


def _unmount_under(path: Path) -> None:
    prefix = str(path)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mnt = line.split()[4]
        if mnt == prefix or mnt.startswith(prefix + "/"):
            procs.run(["umount", "-l", mnt], check=False)


def _remove_cgroups(timeout: float = 15.0) -> None:
    # Killing a host's PID 1 kills its processes (containers too) asynchronously,
    # and a cgroup with tasks cannot be removed: retry until the deadline.
    deadline = time.monotonic() + timeout
    while True:
        for cg in _testbed_cgroups():
            # Deepest first: a cgroup can only be removed once it has no children.
            for sub in sorted(
                (p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                _rmdir(sub)
            _rmdir(cg)
        if not _testbed_cgroups() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _testbed_cgroups() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    if not root.exists():
        return []
    return [
        cg
        for top in [root, *[p for p in root.iterdir() if p.is_dir()]]
        for cg in top.glob(f"ferry-testbed{INSTANCE}-*")
    ]


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
