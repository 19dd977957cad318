"""An uploaded `docker save` archive, rewritten on its way to `docker load` so it can move no tag.

`docker load` names what it loads after the archive's manifest.json RepoTags
(or, in archives without a manifest, its `repositories` file), and takes a tag
that already exists away from the image it pointed to. A peer could repoint
`app:1` on the target to any image it likes. So the archive is passed through
with its RepoTags emptied and `repositories` and the OCI index's name
annotations dropped: the load can only add an untagged image. The tags it
asked for are remembered, and the target adds each one only where it is absent.

The rewrite streams: each entry's header is re-emitted and its data copied in
chunks, so nothing but the small JSON files is held in memory.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.archive import ArchiveError, ArchiveTooLarge, BoundedTarInfo

_CHUNK = 1 << 20
_MAX_JSON = 1 << 20  # manifest.json and index.json of one image are a few KiB
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_MANIFEST = "manifest.json"
_INDEX = "index.json"
_REPOSITORIES = "repositories"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Docker's reference grammar (distribution/reference), simplified: an optional
# registry (has a '.' or a port, or is localhost), lower-case path components, a tag.
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?$"
)
_PATH = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ImageArchiveError(ArchiveError):
    """The uploaded image archive is not one a target loads; the message says why."""


@dataclass
class ImageManifest:
    image_id: str  # sha256:<hex> of the image config, which is what Docker names the image
    repo_tags: list[str] = field(default_factory=list)


def split_tag(tag: str) -> tuple[str, str]:
    """("repo", "tag") of "repo:tag", or ImageArchiveError for anything else."""
    repo, _, name = tag.rpartition(":")
    parts = repo.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        domain_ok = bool(_DOMAIN.match(parts[0]))
        parts = parts[1:]
    else:
        domain_ok = True
    ok = domain_ok and all(_PATH.match(p) for p in parts) and _TAG.match(name)
    if not ok or len(tag) > 255 or "/" in name:
        raise ImageArchiveError(f"manifest.json: {tag[:80]!r} is not a repository:tag")
    return repo, name


class TagStripper:
    """Iterate it for the rewritten archive; afterwards `manifest` says what was in it.

    An archive that cannot be rewritten safely raises ImageArchiveError from the
    iteration (and keeps it in `error`), which breaks the load mid-stream.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._reader = _Reader(chunks)
        self.manifest: ImageManifest | None = None
        self.error: ImageArchiveError | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._rewrite()
        except ImageArchiveError as exc:
            self.error = exc
            raise
        except ArchiveTooLarge as exc:
            self.error = ImageArchiveError(str(exc))
            raise self.error from None
        except (tarfile.TarError, EOFError) as exc:
            self.error = ImageArchiveError(f"image archive is corrupt: {exc}")
            raise self.error from None

    def _rewrite(self) -> Iterator[bytes]:
        seen: set[str] = set()
        written = 0
        reader: Any = self._reader
        with tarfile.open(
            fileobj=reader,
            mode="r|",
            encoding=_ENCODING,
            errors=_ERRORS,
            tarinfo=BoundedTarInfo,
        ) as tar:
            for m in tar:
                name = _checked_name(m.name)
                if name in (_MANIFEST, _INDEX, _REPOSITORIES):
                    if name in seen:
                        raise ImageArchiveError(f"{name} appears twice in the image archive")
                    seen.add(name)
                    if not m.isreg():
                        raise ImageArchiveError(f"{name} is not a regular file")
                if name == _REPOSITORIES:
                    continue  # legacy tag list: dropped
                if name in (_MANIFEST, _INDEX):
                    data = _read_small(tar, m)
                    data = self._manifest(data) if name == _MANIFEST else _index(data)
                    for out in _entry(m, data):
                        written += len(out)
                        yield out
                    continue
                for out in _copy(tar, m):
                    written += len(out)
                    yield out
        if self.manifest is None:
            raise ImageArchiveError("the image archive has no manifest.json")
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        written += len(end)
        yield end + tarfile.NUL * (-written % tarfile.RECORDSIZE)

    def _manifest(self, data: bytes) -> bytes:
        try:
            entries = json.loads(data)
        except ValueError as exc:
            raise ImageArchiveError(f"manifest.json is not JSON: {exc}") from None
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise ImageArchiveError("manifest.json must describe exactly one image")
        entry: dict[str, Any] = entries[0]
        config = entry.get("Config")
        digest = posixpath.basename(config).removesuffix(".json") if isinstance(config, str) else ""
        if not _HEX64.fullmatch(digest):
            raise ImageArchiveError("manifest.json: Config does not name a sha256 image config")
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageArchiveError("manifest.json: RepoTags must be a list of strings")
        for tag in tags:
            split_tag(tag)
        self.manifest = ImageManifest(f"sha256:{digest}", list(tags))
        entry["RepoTags"] = []
        return json.dumps(entries).encode()


def _index(data: bytes) -> bytes:
    """The OCI index without the image names that a containerd-backed load would apply."""
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise ImageArchiveError(f"index.json is not JSON: {exc}") from None
    if not isinstance(index, dict):
        raise ImageArchiveError("index.json must be an object")
    for desc in index.get("manifests") or []:
        if isinstance(desc, dict):
            desc.pop("annotations", None)
    return json.dumps(index).encode()


def _checked_name(name: str) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        raise ImageArchiveError(f"image archive entry {name[:80]!r} leaves the archive")
    return posixpath.normpath(name)


def _read_small(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    if m.size > _MAX_JSON:
        raise ImageArchiveError(f"{m.name} is {m.size} bytes, more than {_MAX_JSON}")
    src = tar.extractfile(m)
    return src.read() if src is not None else b""


def _header(m: tarfile.TarInfo) -> bytes:
    return m.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def _entry(m: tarfile.TarInfo, data: bytes) -> Iterator[bytes]:
    m.size = len(data)
    yield _header(m)
    yield data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def _copy(tar: tarfile.TarFile, m: tarfile.TarInfo) -> Iterator[bytes]:
    yield _header(m)
    if not m.isreg() or not m.size:
        return
    src = tar.extractfile(m)
    if src is None:
        raise ImageArchiveError(f"{m.name}: no data")
    left = m.size
    while left:
        data = src.read(min(_CHUNK, left))
        if not data:
            raise ImageArchiveError(f"{m.name}: the archive ends inside it")
        left -= len(data)
        yield data
    pad = -m.size % tarfile.BLOCKSIZE
    if pad:
        yield tarfile.NUL * pad


class _Reader:
    """A file-like view of an iterator of chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buf = memoryview(chunk)
        take = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:take])
        self._buf = self._buf[take:]
        return out


def loaded_ids(lines: list[str]) -> set[str]:
    """Image IDs from `docker load` status lines ("Loaded image ID: sha256:...")."""
    out = set()
    for line in lines:
        head, _, value = line.partition(":")
        if head.strip() == "Loaded image ID":
            out.add(value.strip())
    return out
