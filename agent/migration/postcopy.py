"""Post-copy, opt-in: the target runs at once and pulls memory pages from the frozen source.

Source: `runc checkpoint --lazy-pages --page-server` dumps everything but memory,
then serves pages until the target has them all (POSTCOPY-NOTES.md). Target: a
`criu lazy-pages` daemon pulls them over CRIU's own TLS with the cluster's
certificates, so a stray connection cannot end the dump (without TLS a
connect-and-close makes CRIU think every page was sent and kill the source).

Until the last page has arrived the frozen source is the only complete copy.
Whoever sees a failure first makes the target copy die: the target kills its
own copy the moment its daemon exits non-zero, and the source tells it to
before it lets its own copy resume.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.migration.criu_config import CRIU_DIR
from agent.migration.lazy_daemon import DaemonError, LazyPagesDaemon, is_error, with_env
from agent.migration.paths import DataRoot

log = structlog.get_logger(__name__)

PIPE_MIN = 4 << 20  # CRIU's page server grows its pipe to 4 MiB
CAP_SYS_RESOURCE = 24
TLS_DIR = ("ferry", "tls")


class PostcopyError(Exception):
    pass


def preflight(proc: Path = Path("/proc")) -> str | None:
    """Why this host cannot serve pages (None: it can). Never changes a sysctl."""
    try:
        pipe_max = int((proc / "sys/fs/pipe-max-size").read_text())
        status = (proc / "self/status").read_text()
    except (OSError, ValueError) as exc:
        return f"cannot read the pipe limit: {exc}"
    cap_eff = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), "0")
    if int(cap_eff, 16) >> CAP_SYS_RESOURCE & 1 or pipe_max >= PIPE_MIN:
        return None
    return (
        f"post-copy needs fs.pipe-max-size >= {PIPE_MIN} (it is {pipe_max}) or CAP_SYS_RESOURCE: "
        f"run `sysctl -w fs.pipe-max-size={PIPE_MIN}` (and persist it in /etc/sysctl.d); "
        "stop-and-copy works without it"
    )


@dataclass(frozen=True)
class TlsFiles:
    """The cluster's CA, certificate and key, where CRIU (beside dockerd) can read them."""

    root: DataRoot

    def daemon(self, name: str) -> str:
        return self.root.daemon_path(*TLS_DIR, name)

    def install(self, ca: Path, cert: Path, key: Path) -> None:
        local = self.root.local_root.joinpath(*TLS_DIR)
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(local, 0o700)
        for src, name in ((ca, "ca.pem"), (cert, "cert.pem"), (key, "key.pem")):
            tmp = local / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(src.read_bytes())
            os.replace(tmp, local / name)

    def criu_options(self) -> list[str]:
        return [
            "tls",
            f"tls-cacert {self.daemon('ca.pem')}",
            f"tls-cert {self.daemon('cert.pem')}",
            f"tls-key {self.daemon('key.pem')}",
        ]

    def criu_flags(self) -> list[str]:
        return [
            "--tls",
            "--tls-cacert",
            self.daemon("ca.pem"),
            "--tls-cert",
            self.daemon("cert.pem"),
            "--tls-key",
            self.daemon("key.pem"),
        ]


def free_port(host: str, first: int, count: int = 16) -> int:
    for port in range(first, first + count):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise PostcopyError(f"no free page-server port in {first}..{first + count - 1}")


@dataclass
class PageServerDump:
    """Source side: a lazy dump that serves pages until the target has them all."""

    root: DataRoot
    runc_command: Sequence[str]
    container_id: str
    checkpoint: str
    migration_id: str
    port: int
    tls: TlsFiles
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _path(self, suffix: str) -> tuple[str, ...]:
        return (*CRIU_DIR, f"{self.migration_id}.{suffix}")

    @property
    def work(self) -> Path:
        return self.root.local_root.joinpath(*self._path("dump-work"))

    @property
    def conf(self) -> Path:
        return self.root.local_root.joinpath(*self._path("dump.conf"))

    def start(self, timeout: float) -> None:
        """Blocking: dump all but memory; return once the page server listens."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("".join(f"{line}\n" for line in self.tls.criu_options()))
        config_file = self.root.daemon_path(*self._path("dump.conf"))
        argv = [
            *with_env(self.runc_command, "CRIU_CONFIG_FILE", config_file),
            "checkpoint",
            "--lazy-pages",
            "--leave-running",
            "--page-server",
            f"0.0.0.0:{self.port}",
            # runc's stdout: systemd-run (--pipe) hands only stdin/stdout/stderr to the
            # program it starts, so a status pipe on another fd would not get there.
            "--status-fd",
            "1",
            "--image-path",
            self.root.daemon_checkpoint_dir(self.container_id, self.checkpoint),
            "--work-path",
            self.root.daemon_path(*self._path("dump-work")),
            self.container_id,
        ]
        # runc takes no TLS flags, but CRIU reads this file in swrk mode too. The
        # environment reaches CRIU through nsenter; systemd-run is told (with_env).
        env = dict(os.environ)
        env["CRIU_CONFIG_FILE"] = config_file
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            # Kept open (never read past the status byte) for runc's whole life: a
            # closed pipe would kill it with SIGPIPE while it serves pages.
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # outlives this agent: pages keep flowing
        )
        assert self.proc.stdout is not None
        status = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([status], [], [], 0.1)
            if ready:
                if os.read(status, 1) == b"\0":
                    return
                raise PostcopyError(f"the lazy dump failed: {self.error_words()}")
            if self.proc.poll() is not None:
                raise PostcopyError(
                    f"the lazy dump exited {self.proc.returncode}: {self.error_words()}"
                )
            if time.monotonic() > deadline:
                raise PostcopyError(f"the lazy dump did not finish in {timeout:.0f}s")

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.conf.unlink(missing_ok=True)

    def error_words(self) -> str:
        lines: list[str] = []
        with contextlib.suppress(OSError):
            text = (self.work / "dump.log").read_text(errors="replace")
            lines = [ln.strip() for ln in text.splitlines() if is_error(ln)][:2]
        if not lines and self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace")
                    lines = err.strip().splitlines()[-2:]
        return "; ".join(lines) or "no error line"


def end_page_stream(port: int) -> None:
    """Make the source's CRIU give up serving pages, without killing it.

    A connected client's socket is destroyed (`ss -K`): CRIU's next receive fails
    and it reports the transfer FAILED. With nobody connected yet, a failed TLS
    handshake does the same. Either way CRIU hands the frozen tasks back as it found
    them (paused); killing CRIU instead can leave the source unusable.
    """
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["ss", "-K", "sport", "=", f":{port}"], capture_output=True, timeout=10, check=False
        )
    refuse_pages("127.0.0.1", port)


def cleanup_source(root: DataRoot, migration_id: str) -> None:
    """The source's dump config and work dir, whichever way the migration ended."""
    base = root.local_root.joinpath(*CRIU_DIR)
    shutil.rmtree(base / f"{migration_id}.dump-work", ignore_errors=True)
    (base / f"{migration_id}.dump.conf").unlink(missing_ok=True)


def refuse_pages(host: str, port: int, timeout: float = 5.0) -> bool:
    """A handshake no TLS server accepts: CRIU gives up and the source is handed back."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"\x16\x03\x01\x00\x05ferry")  # not a ClientHello anyone accepts
            s.settimeout(timeout)
            with contextlib.suppress(OSError):
                s.recv(1)
        return True
    except OSError:
        return False


@dataclass
class PageClient:
    """Target side: the lazy-pages daemon pulling pages from the source's page server."""

    root: DataRoot
    criu_command: Sequence[str]
    migration_id: str
    images_daemon: str  # Docker's checkpoint dir, as dockerd sees it
    address: str
    port: int
    tls: TlsFiles
    container_id: str  # the copy its guard kills when the pages stop
    stall: float  # migration.postcopy_stall_timeout
    daemon: LazyPagesDaemon = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.daemon = LazyPagesDaemon(
            self.criu_command,
            self.work,
            self.root.daemon_path(*self._rel()),
            self.container_id,
            self.stall,
        )

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.daemon.proc

    def _rel(self) -> tuple[str, ...]:
        return (*CRIU_DIR, f"{self.migration_id}.work")

    @property
    def work(self) -> Path:
        return self.root.local_root.joinpath(*self._rel())

    def criu_options(self) -> list[str]:
        return ["lazy-pages", f"work-dir {self.root.daemon_path(*self._rel())}"]

    def start(self, timeout: float = 10.0) -> None:
        args = [
            "--page-server",
            "--address",
            self.address,
            "--port",
            str(self.port),
            *self.tls.criu_flags(),
            "-D",
            self.images_daemon,
        ]
        try:
            self.daemon.start(args, timeout)
        except DaemonError as exc:
            raise PostcopyError(str(exc)) from exc

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def pulled(self) -> int:
        return self.daemon.pulled()

    def kill(self) -> None:
        self.daemon.stop()

    def cleanup(self) -> None:
        self.kill()
        self.daemon.kill_orphan()
        shutil.rmtree(self.work, ignore_errors=True)

    def error_words(self) -> str:
        return self.daemon.error_words()
