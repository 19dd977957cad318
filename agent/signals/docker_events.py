"""Container events from the Docker Engine, and the container inventory they keep current.

Every event becomes a `DockerEvent` in the sink (so policies can count e.g.
"oom" or "die" per window), and the inventory (`ContainerInfo` with labels,
which policies select on) is rebuilt from a full list at every (re)connect and
patched by create/rename/destroy/start/die/pause/unpause/update in between.
Signals: docker.connected (1/0), containers.running.

A container's `memory_bytes` is its memory limit (HostConfig.Memory, 0 when
unlimited). Summaries do not carry it, so each container is inspected once:
when it is created, or at the first connect that lists it; an `update` event
reads it again. Resident use would order better, but the stats API takes a
second or more per container, far too slow to ask every container about.

dockerd restarts are routine (upgrades, live-restore), and the SDK's event
stream just ends without an error when the daemon goes away. So the source
reconnects with capped exponential backoff and asks for `since=` the last
event it saw (the Engine replays its in-memory buffer from there; the bound is
inclusive, so the last event comes again and is dropped by the
(timeNano, id, action) dedupe). Events that happened after the new daemon
started but before we reconnected are therefore caught too. Anything older
than the new daemon's buffer is covered by the full list at reconnect.

The SDK stream blocks, so it is read on a dedicated thread that hands events
to the loop; on cancel the stream is closed (which wakes the blocked read) and
the thread is joined. All Engine calls go through `agent.docker_adapter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Protocol

import structlog

from agent.backoff import Backoff
from agent.model import Clock, ContainerInfo, DockerEvent, Sample, SignalSink, SystemClock
from agent.signals.store import InventorySink

log = structlog.get_logger(__name__)

_DEDUPE_KEYS = 4096
# Float seconds cannot carry nanoseconds exactly; asking from a microsecond
# earlier never skips an event, and the dedupe absorbs the overlap.
_SINCE_MARGIN_NS = 1_000


class ClosableEvents(Protocol):
    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


class DockerEventsAPI(Protocol):
    """The subset of `agent.docker_adapter.DockerAdapter` this source needs."""

    def events(self, since: float | None, until: float | None = None) -> ClosableEvents: ...

    def list_containers(self) -> list[dict[str, Any]]: ...

    def inspect_container(self, container: str) -> dict[str, Any]: ...


class _End:
    """Queued by the reader thread when the stream stops (error is None: ended silently)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def _parse_created(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return 0.0
    # RFC 3339 with nanoseconds ("2024-05-01T10:00:00.123456789Z"); Python keeps microseconds.
    text = value.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{tz}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def info_from_summary(item: dict[str, Any]) -> ContainerInfo:
    """From a low-level `containers(all=True)` summary."""
    names = item.get("Names") or []
    name = names[0].lstrip("/") if names else str(item.get("Id", ""))[:12]
    return ContainerInfo(
        id=str(item["Id"]),
        name=name,
        image=str(item.get("Image", "")),
        image_id=str(item.get("ImageID", "")),
        labels=dict(item.get("Labels") or {}),
        state=str(item.get("State", "")),
        created=_parse_created(item.get("Created")),
    )


def memory_limit(data: dict[str, Any]) -> int:
    """HostConfig.Memory of an inspect answer, in bytes; 0 when unlimited or absent."""
    value = (data.get("HostConfig") or {}).get("Memory")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def info_from_inspect(data: dict[str, Any]) -> ContainerInfo:
    config = data.get("Config") or {}
    state = data.get("State") or {}
    return ContainerInfo(
        id=str(data["Id"]),
        name=str(data.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        image_id=str(data.get("Image", "")),
        labels=dict(config.get("Labels") or {}),
        state=str(state.get("Status", "")),
        memory_bytes=memory_limit(data),
        created=_parse_created(data.get("Created")),
    )


def parse_event(raw: dict[str, Any]) -> tuple[int, DockerEvent] | None:
    """Engine event dict -> (timeNano, DockerEvent); None for non-container events.

    Docker folds a detail into some actions ("health_status: unhealthy",
    "exec_start: sh -c ..."); the base goes to `action` and the detail to
    attributes["action_detail"], which `SignalStore.event_count` understands.
    """
    if raw.get("Type", "container") != "container":
        return None
    actor = raw.get("Actor") or {}
    cid = str(actor.get("ID") or raw.get("id") or "")
    action_full = str(raw.get("Action") or raw.get("status") or "")
    if not cid or not action_full:
        return None
    if "timeNano" in raw:
        time_nano = int(raw["timeNano"])
    else:
        time_nano = int(float(raw.get("time", 0)) * 1_000_000_000)
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    base, sep, detail = action_full.partition(":")
    if sep:
        attributes["action_detail"] = detail.strip()
    event = DockerEvent(
        action=base.strip(),
        container_id=cid,
        name=attributes.get("name", ""),
        ts=time_nano / 1e9,
        attributes=attributes,
    )
    return time_nano, event


_STATE_AFTER = {
    "start": "running",
    "restart": "running",
    "unpause": "running",
    "die": "exited",
    "pause": "paused",
}


class DockerEventsSource:
    """Publishes container events and keeps the inventory; survives dockerd restarts."""

    def __init__(
        self,
        adapter: DockerEventsAPI,
        clock: Clock | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        name: str = "docker_events",
    ) -> None:
        self.name = name
        self.adapter = adapter
        self.clock: Clock = clock or SystemClock()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = False
        self.connects = 0  # successful (re)connects, for tests and metrics
        self.last_time_nano: int | None = None
        self._inventory: dict[str, ContainerInfo] = {}
        self._seen: OrderedDict[tuple[int, str, str], None] = OrderedDict()

    def max_ages(self) -> dict[str, float | None]:
        # Event-driven, not polled: they change only when something happens.
        return {"docker.connected": None, "containers.running": None}

    def containers(self) -> list[ContainerInfo]:
        return sorted(self._inventory.values(), key=lambda c: c.name)

    async def run(self, sink: SignalSink) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        # Until an event is seen, every (re)connect asks from when we first
        # connected, so even the very first events of a restarted daemon count.
        first_open = self.clock.time()
        try:
            while True:
                since = self._since() if self.last_time_nano is not None else first_open
                error: BaseException | None
                try:
                    async with self._stream(since) as queue:
                        await self._rebuild(sink)
                        self._set_connected(sink, True)
                        self.connects += 1
                        backoff.reset()
                        log.info("signals.docker_events_connected", since=since)
                        error = await self._consume(queue, sink)
                except Exception as exc:
                    error = exc
                self._set_connected(sink, False)
                delay = backoff.next()
                if error is None:
                    log.warning("signals.docker_events_ended", retry_in=delay)
                else:
                    log.warning(
                        "signals.docker_events_failed",
                        error=str(error),
                        error_type=type(error).__name__,
                        retry_in=delay,
                    )
                await asyncio.sleep(delay)
        finally:
            self.connected = False

    # -- connection -------------------------------------------------------

    def _since(self) -> float:
        assert self.last_time_nano is not None
        return (self.last_time_nano - _SINCE_MARGIN_NS) / 1e9

    @contextlib.asynccontextmanager
    async def _stream(self, since: float) -> Any:
        """Open the event stream and read it on a thread; yields the loop-side queue."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, self.adapter.events, since, None)
        try:
            stream = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The open may still succeed after we stop waiting; close it then.
            opening.add_done_callback(_close_result)
            raise
        queue: asyncio.Queue[dict[str, Any] | _End] = asyncio.Queue()

        def put(item: dict[str, Any] | _End) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed during interpreter shutdown
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            error: BaseException | None = None
            try:
                for raw in stream:
                    put(raw)
            except BaseException as exc:  # handed to the loop, which decides
                error = exc
            put(_End(error))

        reader = threading.Thread(target=read, name="ferry-docker-events", daemon=True)
        reader.start()
        try:
            yield queue
        finally:
            # Closing the response wakes a reader blocked in recv(); then join,
            # so no thread outlives the connection.
            with contextlib.suppress(Exception):
                stream.close()
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 10.0)
            if reader.is_alive():
                log.error("signals.docker_events_reader_stuck")

    async def _consume(
        self, queue: asyncio.Queue[dict[str, Any] | _End], sink: SignalSink
    ) -> BaseException | None:
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                return item.error
            await self._handle(item, sink)

    async def _rebuild(self, sink: SignalSink) -> None:
        summaries = await asyncio.to_thread(self.adapter.list_containers)
        previous, self._inventory = self._inventory, {}
        unknown = []
        for item in summaries:
            try:
                info = info_from_summary(item)
            except (KeyError, TypeError) as exc:
                log.warning("signals.docker_bad_summary", error=str(exc))
                continue
            known = previous.get(info.id)
            if known is not None:
                info.memory_bytes = known.memory_bytes  # a reconnect does not inspect again
            else:
                unknown.append(info)
            self._inventory[info.id] = info
        if unknown:
            await asyncio.to_thread(self._read_memory_limits, unknown)
        self._push_inventory(sink)

    def _read_memory_limits(self, infos: list[ContainerInfo]) -> None:
        for info in infos:
            info.memory_bytes = self._memory_limit(info.id)

    def _memory_limit(self, container_id: str) -> int:
        try:
            return memory_limit(self.adapter.inspect_container(container_id))
        except Exception as exc:  # gone meanwhile, or daemon trouble: unknown, as before
            log.debug("signals.docker_inspect_failed", id=container_id, error=str(exc))
            return 0

    # -- events -----------------------------------------------------------

    async def _handle(self, raw: dict[str, Any], sink: SignalSink) -> None:
        try:
            parsed = parse_event(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("signals.docker_bad_event", error=str(exc))
            return
        if parsed is None:
            return
        time_nano, event = parsed
        key = (time_nano, event.container_id, raw.get("Action") or event.action)
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > _DEDUPE_KEYS:
            self._seen.popitem(last=False)
        if self.last_time_nano is None or time_nano > self.last_time_nano:
            self.last_time_nano = time_nano

        if not event.name and event.container_id in self._inventory:
            event = DockerEvent(
                event.action,
                event.container_id,
                self._inventory[event.container_id].name,
                event.ts,
                event.attributes,
            )
        # Inventory first, so a policy reacting to the event sees the container as it now is.
        if await self._patch(event):
            self._push_inventory(sink)
        sink.publish_event(event)

    async def _patch(self, event: DockerEvent) -> bool:
        cid = event.container_id
        current = self._inventory.get(cid)
        if event.action == "destroy":
            return self._inventory.pop(cid, None) is not None
        if event.action == "create" or (current is None and event.action in _STATE_AFTER):
            self._inventory[cid] = await self._describe(event)
            return True
        if current is None:
            return False
        if event.action == "update":  # `docker update` may have changed the limit
            limit = await asyncio.to_thread(self._memory_limit, cid)
            if limit != current.memory_bytes:
                current.memory_bytes = limit
                return True
            return False
        if event.action == "rename":
            new_name = event.attributes.get("name", "")
            if new_name and new_name != current.name:
                current.name = new_name
                return True
            return False
        state = _STATE_AFTER.get(event.action)
        if state is not None and state != current.state:
            current.state = state
            return True
        return False

    async def _describe(self, event: DockerEvent) -> ContainerInfo:
        try:
            return info_from_inspect(
                await asyncio.to_thread(self.adapter.inspect_container, event.container_id)
            )
        except Exception as exc:
            # Already gone (a destroy follows in the stream) or daemon trouble:
            # the event's attributes still say enough to select on.
            log.debug("signals.docker_inspect_failed", id=event.container_id, error=str(exc))
        attrs = event.attributes
        labels = {k: v for k, v in attrs.items() if k not in ("image", "name", "action_detail")}
        return ContainerInfo(
            id=event.container_id,
            name=attrs.get("name", event.container_id[:12]),
            image=attrs.get("image", ""),
            image_id="",
            labels=labels,
            state=_STATE_AFTER.get(event.action, "created"),
            created=event.ts if event.action == "create" else 0.0,
        )

    # -- sink -------------------------------------------------------------

    def _push_inventory(self, sink: SignalSink) -> None:
        if isinstance(sink, InventorySink):
            sink.set_containers(_copies(self._inventory.values()))
        running = sum(1 for c in self._inventory.values() if c.state == "running")
        sink.publish(Sample("containers.running", float(running), self.clock.time()))

    def _set_connected(self, sink: SignalSink, connected: bool) -> None:
        self.connected = connected
        sink.publish(Sample("docker.connected", 1.0 if connected else 0.0, self.clock.time()))


def _copies(items: Iterable[ContainerInfo]) -> list[ContainerInfo]:
    # The store must not share mutable ContainerInfo objects with our patching.
    return [
        ContainerInfo(
            c.id, c.name, c.image, c.image_id, dict(c.labels), c.state, c.memory_bytes, c.created
        )
        for c in items
    ]


def _close_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        with contextlib.suppress(Exception):
            fut.result().close()
