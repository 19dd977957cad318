"""What the target knows about one migration it receives, as kept in its journal record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.migration import criu_images


@dataclass
class Incoming:
    """What the target knows about one migration it is receiving."""

    migration_id: str
    peer: str
    name: str
    source_container_id: str
    checkpoint: str = ""
    container_id: str | None = None
    spec: dict[str, Any] | None = None
    upper_dir: str | None = None  # local path
    volume_dirs: dict[str, str] = field(default_factory=dict)  # section -> local path
    created_volumes: list[str] = field(default_factory=list)
    network_specs: list[dict[str, Any]] = field(default_factory=list)  # from prepare
    created_networks: list[str] = field(default_factory=list)
    group_id: str | None = None  # members of one group migration share it
    postcopy_port: int | None = None  # the source's page server, for a post-copy restore
    pages_in: bool = False  # post-copy: every page arrived (the daemon exited 0)
    page_failure: str | None = None
    staging_dirs: list[str] = field(default_factory=list)  # state unpacked, not yet in place
    archive_digest: str | None = None
    archive_bytes: int = 0
    image_bytes: int = 0
    image_id: str = ""  # as prepared; the staged spec must name the same image
    state_cap: int = 0  # what the state may unpack to: the declared estimate plus slack
    image_cap: int = 0  # what the image upload may be
    loaded_image: str | None = None  # an image this migration loaded (removed if unused)
    added_tags: list[str] = field(default_factory=list)  # tags this migration added
    aborted: bool = False  # set by abort at once, even while a restore holds the lock
    timings: dict[str, float] = field(default_factory=dict)
    last_heard: float = 0.0  # monotonic: the source's latest request

    def journal_report(self) -> dict[str, Any]:
        # The spec stays: a restarted agent needs its restart policy and health check.
        return {"target": asdict(self)}


def lazy_bytes(timings: Any) -> int:
    """Bytes of the pages a lazy restore left to its daemon (0 when not known)."""
    pages = (timings or {}).get("lazy_pages") if isinstance(timings, dict) else None
    return int(pages) * criu_images.PAGE_SIZE if isinstance(pages, int | float) else 0


def incoming_from_record(rec: Any) -> Incoming:
    data = dict((rec.report or {}).get("target") or {})
    known = {k: v for k, v in data.items() if k in Incoming.__dataclass_fields__}
    known.setdefault("migration_id", rec.id)
    known.setdefault("peer", rec.source)
    known.setdefault("name", rec.container_name)
    known.setdefault("source_container_id", rec.container_id)
    return Incoming(**known)
