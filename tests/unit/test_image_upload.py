"""TagStripper: a docker-save archive passes through with nothing left that could move a tag."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator

import pytest

from agent.migration.image_upload import ImageArchiveError, TagStripper, loaded_ids, split_tag

DIGEST = "ab" * 32


def archive(
    *extra: tuple[str, bytes], manifest: object = None, tags: list[str] | None = None
) -> bytes:
    if manifest is None:
        manifest = [{"Config": f"blobs/sha256/{DIGEST}", "RepoTags": tags or [], "Layers": []}]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "digest": "sha256:" + "cd" * 32,
                "annotations": {"io.containerd.image.name": "docker.io/app:1"},
            }
        ],
    }
    files = [
        (f"blobs/sha256/{DIGEST}", b"{}" * 600_000),  # bigger than one chunk
        ("index.json", json.dumps(index).encode()),
        ("manifest.json", json.dumps(manifest).encode()),
        ("repositories", json.dumps({"app": {"1": DIGEST}}).encode()),
        *extra,
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def chunks(data: bytes, size: int = 7000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def rewrite(data: bytes) -> tuple[TagStripper, dict[str, bytes]]:
    stripper = TagStripper(chunks(data))
    out = b"".join(stripper)
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        files = {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in tar if m.isreg()}
    return stripper, files


def test_tags_are_emptied_names_dropped_and_the_rest_kept_byte_for_byte() -> None:
    stripper, files = rewrite(archive(tags=["app:1", "registry.local:5000/team/app:v2"]))
    assert stripper.manifest is not None
    assert stripper.manifest.image_id == f"sha256:{DIGEST}"
    assert stripper.manifest.repo_tags == ["app:1", "registry.local:5000/team/app:v2"]
    assert json.loads(files["manifest.json"])[0]["RepoTags"] == []
    assert "repositories" not in files
    assert "annotations" not in json.loads(files["index.json"])["manifests"][0]
    assert files[f"blobs/sha256/{DIGEST}"] == b"{}" * 600_000


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"extra": [("manifest.json", b"[]")]}, "appears twice"),
        ({"extra": [("../manifest.json", b"[]")]}, "leaves the archive"),
        ({"manifest": [{"Config": "x"}, {"Config": "y"}]}, "exactly one image"),
        ({"manifest": [{"Config": "blobs/sha256/short"}]}, "sha256 image config"),
        ({"manifest": [{"Config": f"blobs/sha256/{DIGEST}", "RepoTags": "app:1"}]}, "RepoTags"),
        ({"tags": ["UPPER/case:1"]}, "is not a repository:tag"),
        ({"tags": ["no-tag"]}, "is not a repository:tag"),
        ({"tags": ["app:1/x"]}, "is not a repository:tag"),
        ({"tags": ["a..b:1"]}, "is not a repository:tag"),
    ],
)
def test_archives_that_cannot_be_rewritten_safely_are_refused(
    bad: dict[str, object], words: str
) -> None:
    extra = bad.pop("extra", [])
    data = archive(*extra, **bad)  # type: ignore[arg-type]
    stripper = TagStripper(chunks(data))
    with pytest.raises(ImageArchiveError, match=re.escape(words)):
        b"".join(stripper)
    assert stripper.error is not None and words in str(stripper.error)


def test_an_archive_without_a_manifest_is_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("repositories")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ImageArchiveError, match=r"no manifest\.json"):
        b"".join(TagStripper(chunks(buf.getvalue())))


def test_helpers() -> None:
    assert split_tag("registry.local:5000/team/app:v2") == ("registry.local:5000/team/app", "v2")
    assert split_tag("localhost/x_y__z:1") == ("localhost/x_y__z", "1")
    assert split_tag("ferry-test/counter:1") == ("ferry-test/counter", "1")
    assert loaded_ids(["Loaded image ID: sha256:" + DIGEST, "Loaded image: app:1"]) == {
        "sha256:" + DIGEST
    }


def test_a_huge_pax_header_in_an_image_is_refused_before_it_is_read() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("blobs")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info)
    stripper = TagStripper(chunks(buf.getvalue(), 1 << 16))
    with pytest.raises(ImageArchiveError, match="metadata header"):
        b"".join(stripper)
