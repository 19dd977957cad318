"""Real software for the testbed: one image with Redis, PostgreSQL 17, SQLite and Python.

Built from Debian trixie's own packages (debootstrap from the mirror this
machine's apt already uses, no registry), imported once on host1 with
`docker import`, saved to a cached tarball and `docker load`ed on every other
host, so the image ID is the same everywhere. The cache key is a hash of this
recipe and the files under ``services/``; a second `testbed up` only loads.

Built lazily: `ensure_service_image(hosts)` is called by the tests that need
it (and by `python -m tests.testbed up --services`), not by every `up`.

Every service runs as root inside its container: root on the testbed machine
lacks CAP_SYS_RESOURCE, and then CRIU cannot dump a process of another user.
PostgreSQL refuses to run as root, so its processes get ``LD_PRELOAD`` of a
two-function shim (``services/pguid.c``) that reports the ``postgres`` user's
uid to PostgreSQL's own checks; the process really is root, which is what CRIU
needs here. Real hosts do not need any of this.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import docker

from tests.testbed.layout import CACHE_DIR, Host
from tests.testbed.progress import step
from tests.testbed.rootfs import SUITE, debian_mirror

SRC = Path(__file__).with_name("services")
SERVICES = "ferry-test/services:1"
# debootstrap takes these; the server packages go in through apt afterwards with
# service start-up blocked (policy-rc.d) and no default cluster created.
BASE_PACKAGES = ["python3", "sqlite3", "procps", "iproute2"]
SERVER_PACKAGES = ["redis-server", "postgresql-17"]
PGDATA = "/var/lib/pg"
PG_BIN = "/usr/lib/postgresql/17/bin"
PG_SHIM = "/usr/local/lib/pguid.so"
PG_UID = 990  # created before the packages, so the shim knows it without a lookup
# Space, not function: docs, man pages and locales nobody reads in a test container,
# and PostgreSQL's JIT (LLVM, about 150 MB; jit = off below, so it is never loaded).
STRIP = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "usr/lib/postgresql/17/lib/bitcode",
    "usr/lib/postgresql/17/lib/llvmjit.so",
    "usr/lib/postgresql/17/lib/llvmjit_types.bc",
]
STRIP_GLOBS = ["usr/lib/*-linux-gnu/libLLVM*"]


RECIPE_VERSION = 2  # bump when the build steps below change
RECIPE_LABEL = "ferry.test.recipe"  # on the image: which recipe built it


def recipe_hash() -> str:
    """Key of the cached image: the recipe's inputs, not this file's formatting."""
    h = hashlib.sha256(
        repr(
            (RECIPE_VERSION, SUITE, BASE_PACKAGES, SERVER_PACKAGES, PG_UID, STRIP, STRIP_GLOBS)
        ).encode()
    )
    for src in sorted(SRC.iterdir()):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    return CACHE_DIR / f"services-{recipe_hash()}"


def tarball() -> Path:
    return cache_dir() / "services.tar"


def pg_env() -> dict[str, str]:
    """Environment that lets PostgreSQL start as root on the testbed (see module doc)."""
    return {"LD_PRELOAD": PG_SHIM, "PG_FAKE_UID": str(PG_UID)}


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"{cmd[0]} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail)
        )


def build_rootfs(root: Path, log: Path) -> None:
    """debootstrap + apt into `root`, then PostgreSQL's cluster, ready to tar."""
    mirror = debian_mirror()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            SUITE,
            str(root),
            mirror,
        ],
        log,
    )
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the build
    policy.chmod(0o755)
    conf = root / "etc/postgresql-common/createcluster.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("create_main_cluster = false\n")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["chroot", str(root), "apt-get", "-q"]
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        _run(["chroot", str(root), "groupadd", "-r", "-g", str(PG_UID), "postgres"], log)
        _run(
            ["chroot", str(root), "useradd", "-r", "-u", str(PG_UID), "-g", "postgres",
             "-d", "/var/lib/postgresql", "-s", "/bin/sh", "postgres"],
            log,
        )  # fmt: skip
        _run([*apt, "install", "-y", "--no-install-recommends", *SERVER_PACKAGES], log, env)
        _run([*apt, "clean"], log, env)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(root / PG_SHIM.lstrip("/")),
             str(SRC / "pguid.c")],
            check=True,
        )  # fmt: skip
        for script in ("sqlite_writer.py", "conn_client.py"):
            shutil.copy(SRC / script, root / "usr/local/bin" / script)
        pgdata = root / PGDATA.lstrip("/")
        pgdata.mkdir(mode=0o700)
        _run(["chroot", str(root), "chown", "postgres:postgres", PGDATA], log)
        _run(
            [
                "chroot", str(root), "env", *(f"{k}={v}" for k, v in pg_env().items()),
                f"{PG_BIN}/initdb", "-D", PGDATA, "-U", "postgres", "--auth=trust",
                "--no-sync", "--encoding=UTF8", "--locale=C",
            ],
            log,
        )  # fmt: skip
        with (pgdata / "postgresql.conf").open("a") as fh:
            # sysv: dynamic shared memory in the IPC namespace, which CRIU dumps;
            # posix would put it in /dev/shm, which a container does not carry.
            fh.write(
                "listen_addresses = '*'\n"
                "dynamic_shared_memory_type = sysv\n"
                "shared_buffers = 32MB\n"
                "max_connections = 20\n"
                "fsync = off\n"
                "jit = off\n"
            )
        with (pgdata / "pg_hba.conf").open("a") as fh:
            fh.write("host all all 0.0.0.0/0 trust\n")
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    policy.unlink()
    for rel in STRIP:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for pattern in STRIP_GLOBS:
        for path in root.glob(pattern):
            path.unlink(missing_ok=True)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)


def _rootfs_tar(root: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for entry in sorted(root.iterdir()):
            if entry.name in ("proc", "sys", "dev"):
                info = tarfile.TarInfo(entry.name)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            tar.add(str(entry), arcname=entry.name)


def build_tarball(first: Host) -> Path:
    """Build the image on `first` and save it into the cache (once per recipe)."""
    out = tarball()
    if out.exists():
        return out
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    building = cache / "rootfs.building"
    log = cache / "build.log"
    log.write_text("")
    shutil.rmtree(building, ignore_errors=True)
    step(f"building {SERVICES} from Debian packages (about 2 min; log {log})")
    build_rootfs(building, log)
    fs_tar = cache / "rootfs.tar"
    _rootfs_tar(building, fs_tar)
    shutil.rmtree(building, ignore_errors=True)
    api = docker.APIClient(base_url=first.docker_host, timeout=600)
    try:
        repo, tag = SERVICES.rsplit(":", 1)
        with fs_tar.open("rb") as fh:
            api.import_image_from_data(
                fh.read(),
                repository=repo,
                tag=tag,
                changes=[
                    'CMD ["sleep", "infinity"]',
                    "WORKDIR /",
                    "ENV LANG=C.UTF-8",
                    f"LABEL {RECIPE_LABEL}={recipe_hash()}",
                ],
            )
        part = out.with_suffix(".part")
        with part.open("wb") as fh:
            for chunk in api.get_image(SERVICES):
                fh.write(chunk)
        part.replace(out)
    finally:
        api.close()
        fs_tar.unlink(missing_ok=True)
    for old in CACHE_DIR.glob("services-*"):
        if old != cache and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return out


def ensure_service_image(hosts: list[Host]) -> None:
    """The services image on every host, built or loaded from the cache as needed."""
    missing = [h for h in hosts if not _has(h)]
    if not missing:
        return
    out = build_tarball(hosts[0])
    for host in missing:
        if _has(host):  # the build imported it on hosts[0]
            continue
        api = docker.APIClient(base_url=host.docker_host, timeout=600)
        try:
            with out.open("rb") as fh:
                for _ in api.load_image(fh):
                    pass
        finally:
            api.close()
    step(f"{SERVICES} on {len(hosts)} hosts")


def _has(host: Host) -> bool:
    """The host has the image of this recipe (an older recipe's image is replaced)."""
    client = docker.DockerClient(base_url=host.docker_host)
    try:
        return any(
            SERVICES in img.tags and img.labels.get(RECIPE_LABEL) == recipe_hash()
            for img in client.images.list(name=SERVICES)
        )
    finally:
        client.close()


if __name__ == "__main__":
    from tests.testbed.layout import load_hosts

    ensure_service_image(load_hosts())
