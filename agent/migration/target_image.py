"""The target's image upload: load what the source sends, as the image it declared, moving no tag.

The upload is capped at the size prepare accepted, its tags are stripped on
the way into `docker load` (image_upload.TagStripper), and what loaded must be
exactly the declared image ID. Tags are then added only where no image holds
them yet. Whatever this migration loaded or tagged is remembered in its
record, so an abort removes exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from agent.bridges import feed_blocking_consumer
from agent.docker_adapter import DockerAdapter, DockerConflict, DockerError, DockerNotFound
from agent.migration.image_upload import TagStripper, loaded_ids, split_tag
from agent.migration.incoming import Incoming
from agent.peer.api import ByteStream, HandlerError

log = structlog.get_logger(__name__)

_IMAGE_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class _TooBig(Exception):
    pass


class _Counting:
    def __init__(self, stream: ByteStream, limit: int) -> None:
        self._stream = stream
        self.limit = limit
        self.count = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            self.count += len(chunk)
            if self.count > self.limit:
                raise _TooBig(
                    f"image upload exceeds {self.limit} bytes (its declared size with slack, "
                    "at most migration.max_image_bytes)"
                )
            yield chunk


class ImageReceiver:
    def __init__(self, adapter: DockerAdapter, host: str) -> None:
        self.adapter = adapter
        self.host = host  # this agent's name, for refusals

    def expected(self, inc: Incoming, meta: dict[str, Any]) -> str:
        """The image ID the upload declares, if prepare expects exactly that one."""
        declared = str(meta.get("image_id") or "")
        if not _IMAGE_ID_RE.match(declared):
            raise HandlerError(
                400, "bad_request", "image upload: image_id must be sha256:<64 hex digits>"
            )
        if inc.image_id and declared != inc.image_id:
            raise HandlerError(
                400, "bad_request", f"image upload: {declared} is not the prepared {inc.image_id}"
            )
        if not inc.image_cap:
            raise HandlerError(
                409, "bad_order", f"{self.host} has image {declared} already; none was expected"
            )
        return declared

    async def load(
        self,
        inc: Incoming,
        stream: ByteStream,
        declared: str,
        save: Callable[[Incoming], Awaitable[None]],
    ) -> dict[str, Any]:
        here = self.host
        before = await asyncio.to_thread(self.adapter.image_ids)
        counted = _Counting(stream, inc.image_cap)
        strippers: list[TagStripper] = []

        def load(chunks: Any) -> list[str]:
            strippers.append(TagStripper(chunks))
            return self.adapter.image_load(strippers[0])

        def made(ids: set[str]) -> list[str]:
            return sorted(i for i in ids if i and i not in before)

        try:
            lines = await feed_blocking_consumer(counted, load)
        except BaseException as exc:
            stripper = strippers[0] if strippers else None
            if stripper is not None and stripper.manifest is not None:
                await asyncio.to_thread(self.remove, made({stripper.manifest.image_id}))
            if stripper is not None and stripper.error is not None:
                raise HandlerError(
                    422, "unsafe_image", f"image refused by {here}: {stripper.error}"
                ) from exc
            if isinstance(exc, _TooBig):
                raise HandlerError(413, "too_large", str(exc)) from exc
            if isinstance(exc, DockerError):
                raise HandlerError(
                    409, "refused", f"docker load failed on {here}: {exc.message}"
                ) from exc
            raise
        inc.image_bytes = counted.count
        manifest = strippers[0].manifest
        assert manifest is not None  # the stripper raises without one
        got = loaded_ids(lines) or {manifest.image_id}
        if got != {declared} or not await asyncio.to_thread(self.adapter.has_image, declared):
            await asyncio.to_thread(self.remove, made(got))
            raise HandlerError(
                422,
                "image_mismatch",
                f"the uploaded image is {', '.join(sorted(got))}, not the declared {declared}",
            )
        inc.loaded_image = declared if declared not in before else None
        await save(inc)
        await asyncio.to_thread(self._add_absent_tags, inc, manifest.repo_tags)
        await save(inc)
        log.info(
            "migration.target.image_loaded",
            migration=inc.migration_id,
            bytes=counted.count,
            tags_added=inc.added_tags,
        )
        return {"loaded": True, "bytes": counted.count, "tags_added": inc.added_tags}

    def _add_absent_tags(self, inc: Incoming, tags: list[str]) -> None:
        """Tag the loaded image only with names that point nowhere here yet."""
        for tag in tags:
            try:
                current = self.adapter.inspect_image(tag).get("Id")
            except DockerNotFound:
                repo, name = split_tag(tag)
                try:
                    self.adapter.tag_image(inc.image_id, repo, name)
                except DockerError as exc:
                    # A name this daemon will not take is only a missing tag: the
                    # container is created from the ID.
                    log.warning("migration.target.tag_refused", tag=tag, error=exc.message)
                    continue
                inc.added_tags.append(tag)
                continue
            if current != inc.image_id:
                log.info("migration.target.tag_kept", tag=tag, points_to=current)

    def remove(self, ids: list[str]) -> None:
        for image in ids:
            with contextlib.suppress(DockerNotFound, DockerConflict):
                self.adapter.remove_image(image)
