"""Build the test images once and load them on every host with identical IDs.

Images are made with `docker import` on the first host (no registry, no
`docker build`), then saved to a cached tarball: `docker save | docker load`
keeps image IDs, whereas importing the same rootfs twice would not.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import docker

from tests.testbed.layout import CACHE_DIR, Host
from tests.testbed.progress import step

SRC = Path(__file__).with_name("images")
COUNTER = "ferry-test/counter:1"
MEMHOG = "ferry-test/memhog:1"
ONLY_ON_FIRST = "ferry-test/only-on-first:1"
SHARED_IMAGES = (COUNTER, MEMHOG)


def _recipe_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for src in sorted(SRC.glob("*.c")):
        h.update(src.read_bytes())
    return h.hexdigest()[:12]


def _compile(name: str, out_dir: Path) -> Path:
    out = out_dir / name
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(SRC / f"{name}.c")], check=True)
    return out


def _rootfs_tar(binary: Path, extra_dirs: tuple[str, ...] = ("tmp",)) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in extra_dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(binary), arcname=binary.name)
    return buf.getvalue()


def _import(api: docker.APIClient, data: bytes, ref: str, changes: list[str]) -> None:
    repo, tag = ref.rsplit(":", 1)
    api.import_image_from_data(data, repository=repo, tag=tag, changes=changes)


def _tar_name(ref: str) -> str:
    return ref.replace("/", "_").replace(":", "_") + ".tar"


def _build(first: Host, cache: Path) -> None:
    step("building test images (static C programs, docker import on host1)")
    api = docker.APIClient(base_url=first.docker_host, timeout=120)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            counter = _compile("counter", Path(tmp))
            memhog = _compile("memhog", Path(tmp))
            counter_changes = ['CMD ["/counter"]', "EXPOSE 8080/tcp", "WORKDIR /"]
            _import(api, _rootfs_tar(counter), COUNTER, counter_changes)
            _import(api, _rootfs_tar(memhog), MEMHOG, ['CMD ["/memhog"]', "ENV MEMHOG_MIB=64"])
            _import(
                api,
                _rootfs_tar(counter, ("tmp", "srv")),
                ONLY_ON_FIRST,
                [*counter_changes, "LABEL ferry.test=only-on-first"],
            )
        for ref in (*SHARED_IMAGES, ONLY_ON_FIRST):
            out = cache / _tar_name(ref)
            tmp_out = out.with_suffix(".part")
            with tmp_out.open("wb") as fh:
                for chunk in api.get_image(ref):
                    fh.write(chunk)
            tmp_out.replace(out)
    finally:
        api.close()


def _load(host: Host, tarball: Path) -> None:
    api = docker.APIClient(base_url=host.docker_host, timeout=300)
    try:
        with tarball.open("rb") as fh:
            for _ in api.load_image(fh):
                pass
    finally:
        api.close()


def ensure_images(hosts: list[Host]) -> None:
    cache = CACHE_DIR / f"images-{_recipe_hash()}"
    refs = (*SHARED_IMAGES, ONLY_ON_FIRST)
    if not all((cache / _tar_name(r)).exists() for r in refs):
        cache.mkdir(parents=True, exist_ok=True)
        _build(hosts[0], cache)
    for i, host in enumerate(hosts):
        client = docker.DockerClient(base_url=host.docker_host)
        try:
            have = {t for img in client.images.list() for t in img.tags}
        finally:
            client.close()
        wanted = refs if i == 0 else SHARED_IMAGES
        for ref in wanted:
            if ref not in have:
                _load(host, cache / _tar_name(ref))
    step(
        f"test images loaded on {len(hosts)} hosts "
        f"({', '.join(SHARED_IMAGES)}; {ONLY_ON_FIRST} on host1)"
    )
