"""The one place Ferry talks to the Docker Engine.

Every Engine call goes through `DockerAdapter`, checkpoint endpoints included,
so the rest of the code never builds URLs and sees Ferry's own exception
types instead of the SDK's. The Python SDK has no checkpoint methods, so those
use the low-level client's private request helpers; that coupling stays here.

All methods block: call them from asyncio through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import docker
import docker.errors
import requests
import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
# Checkpoint, restore and image transfer go through containerd's content store
# and take tens of seconds for a GiB of memory (see TESTBED-NOTES), so they get
# their own, much longer, limit.
LONG_TIMEOUT = 1800.0

CHECKPOINT_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")


class DockerError(Exception):
    """A Docker Engine call failed. `operation` names what Ferry was doing."""

    def __init__(self, operation: str, message: str, status: int | None = None) -> None:
        self.operation = operation
        self.message = message
        self.status = status
        super().__init__(f"{operation}: {message}")


class DockerUnavailable(DockerError):
    """The daemon could not be reached (socket missing, refused, timed out)."""


class DockerNotFound(DockerError):
    """The container, image, checkpoint or network does not exist."""


class DockerConflict(DockerError):
    """The daemon refused because of the object's state or a name clash."""


class CheckpointError(DockerError):
    """Checkpoint create or restore failed (usually CRIU said why)."""


class EventStream:
    """Decoded container events; `close()` from any thread wakes a blocked reader."""

    def __init__(self, stream: Any, response: Any) -> None:
        self._stream = stream
        self._response = response
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for item in self._stream:
                if isinstance(item, dict):
                    yield item
        except Exception as exc:
            # After close() the HTTP client fails in assorted ways (OSError,
            # AttributeError inside http.client): all of them just mean "closed".
            if self._closed:
                return
            if isinstance(exc, requests.RequestException | OSError):
                raise DockerUnavailable("events", str(exc)) from exc
            raise
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Closing the response alone does not wake a thread blocked in recv();
        # shutting the socket down does. The SDK's CancellableStream knows how
        # to find the socket under each transport.
        with contextlib.suppress(Exception):
            docker.types.CancellableStream(self._stream, self._response).close()
        with contextlib.suppress(Exception):
            self._response.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ByteStream:
    """A closable iterator of bytes (image save); closing releases the connection."""

    def __init__(self, response: Any, chunk_size: int) -> None:
        self._response = response
        self._chunks = response.iter_content(chunk_size)
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return bytes(next(self._chunks))
        except StopIteration:
            self.close()
            raise
        except (requests.RequestException, OSError) as exc:
            self.close()
            raise DockerUnavailable("image save", f"stream broke: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._response.close()


def _explanation(exc: docker.errors.APIError) -> str:
    text = exc.explanation
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text or exc).strip()


class DockerAdapter:
    """Thin, typed wrapper over one daemon's Engine API."""

    def __init__(
        self,
        base_url: str,
        timeout: float = DEFAULT_TIMEOUT,
        client_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._factory = client_factory or docker.APIClient
        self._client: Any = None
        self._client_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------

    def _api(self) -> Any:
        # Created on first use: the agent must start (and reconcile later) even
        # while its daemon is still coming up, and "auto" asks the daemon.
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = self._factory(
                        base_url=self.base_url, version="auto", timeout=self.timeout
                    )
                except docker.errors.DockerException as exc:
                    raise DockerUnavailable("connect", f"{self.base_url}: {exc}") from exc
            return self._client

    def _call(self, operation: str, fn: Callable[[Any], T]) -> T:
        api = self._api()
        try:
            return fn(api)
        except docker.errors.NotFound as exc:
            raise DockerNotFound(operation, _explanation(exc), 404) from exc
        except docker.errors.APIError as exc:
            status = exc.status_code
            msg = _explanation(exc)
            if status == 409:
                raise DockerConflict(operation, msg, status) from exc
            raise DockerError(operation, msg, status) from exc
        except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
            raise DockerUnavailable(operation, f"{self.base_url}: {exc}") from exc
        except docker.errors.DockerException as exc:
            raise DockerError(operation, str(exc)) from exc

    def _call_criu(self, operation: str, fn: Callable[[Any], T]) -> T:
        """`_call` for checkpoint and restore: any other refusal is CRIU's, and the
        migration engine handles a CheckpointError differently from a Docker failure."""
        try:
            return self._call(operation, fn)
        except (DockerNotFound, DockerUnavailable):
            raise
        except DockerError as exc:
            raise CheckpointError(exc.operation, exc.message, exc.status) from exc

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                try:
                    self._client.close()
                finally:
                    self._client = None

    # -- daemon -----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return self._call("info", lambda api: api.info())

    def version(self) -> dict[str, Any]:
        return self._call("version", lambda api: api.version())

    def ping(self) -> bool:
        return bool(self._call("ping", lambda api: api.ping()))

    def data_root(self) -> str:
        """The daemon's own data root path (as the daemon sees it)."""
        return str(self.info()["DockerRootDir"])

    def events(self, since: float | None, until: float | None = None) -> EventStream:
        """Container events from `since` (wall-clock seconds), live when `until` is None."""

        def open_stream(api: Any) -> EventStream:
            params = {
                "since": _ts(since),
                "until": _ts(until),
                "filters": docker.utils.convert_filters({"type": "container"}),
            }
            response = api._get(api._url("/events"), params=params, stream=True, timeout=None)
            api._raise_for_status(response)
            return EventStream(api._stream_helper(response, decode=True), response)

        return self._call("events", open_stream)

    # -- containers -------------------------------------------------------------

    def list_containers(self) -> list[dict[str, Any]]:
        return list(self._call("list containers", lambda api: api.containers(all=True)))

    def inspect_container(self, container: str) -> dict[str, Any]:
        return self._call(
            f"inspect container {container}", lambda api: api.inspect_container(container)
        )

    def find_container(self, container: str) -> dict[str, Any] | None:
        """Inspect data, or None when there is no such container."""
        try:
            return self.inspect_container(container)
        except DockerNotFound:
            return None

    def memory_usage(self, container: str) -> int:
        """Current memory use in bytes (cgroup usage minus page cache when reported)."""
        stats = self._call(
            f"stats of {container}", lambda api: api.stats(container, stream=False, one_shot=True)
        )
        mem = stats.get("memory_stats") or {}
        usage = int(mem.get("usage") or 0)
        detail = mem.get("stats") or {}
        cache = int(detail.get("total_inactive_file") or detail.get("inactive_file") or 0)
        return max(usage - cache, 0)

    def create_container(self, body: dict[str, Any], name: str | None = None) -> str:
        """Create from an Engine API create body (see `agent.migration.spec`); returns the id."""
        result = self._call(
            f"create container {name or ''}".strip(),
            lambda api: api.create_container_from_config(body, name=name),
        )
        return str(result["Id"])

    def start(self, container: str, checkpoint: str | None = None) -> None:
        """Start, or restore from a checkpoint under the container's checkpoints dir."""
        if checkpoint is None:
            self._call(f"start {container}", lambda api: api.start(container))
            return

        def restore(api: Any) -> None:
            response = api._post(
                api._url("/containers/{0}/start", container),
                params={"checkpoint": checkpoint},
                timeout=LONG_TIMEOUT,
            )
            api._raise_for_status(response)

        self._call_criu(f"restore {container} from checkpoint {checkpoint}", restore)

    def stop(self, container: str, timeout: int = 10) -> None:
        self._call(
            f"stop {container}",
            lambda api: api.stop(container, timeout=timeout),
        )

    def kill(self, container: str) -> None:
        self._call(f"kill {container}", lambda api: api.kill(container))

    def pause(self, container: str) -> None:
        self._call(f"pause {container}", lambda api: api.pause(container))

    def unpause(self, container: str) -> None:
        self._call(f"unpause {container}", lambda api: api.unpause(container))

    def daemon_pid(self) -> int | None:
        """dockerd's PID in this agent's PID namespace, from the socket's peer credentials.

        None for a TCP daemon URL or when the socket cannot be asked.
        """
        if not self.base_url.startswith(("unix://", "/")):
            return None
        path = self.base_url.removeprefix("unix://")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                creds = sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
        except OSError:
            return None
        pid = int(struct.unpack("3i", creds)[0])
        return pid or None

    def remove(self, container: str, force: bool = False, volumes: bool = False) -> None:
        self._call(
            f"remove {container}",
            lambda api: api.remove_container(container, force=force, v=volumes),
        )

    def rename(self, container: str, new_name: str) -> None:
        self._call(f"rename {container} to {new_name}", lambda api: api.rename(container, new_name))

    def update_restart_policy(self, container: str, policy: dict[str, Any]) -> None:
        name = policy.get("Name") or "no"
        body = {"Name": name, "MaximumRetryCount": int(policy.get("MaximumRetryCount") or 0)}
        self._call(
            f"set restart policy of {container} to {name}",
            lambda api: api.update_container(container, restart_policy=body),
        )

    def wait_running(
        self,
        container: str,
        timeout: float,
        healthy: bool = False,
        poll: float = 0.1,
    ) -> dict[str, Any]:
        """Poll until running (and healthy when asked); raise if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.inspect_container(container)
            state = data.get("State") or {}
            if state.get("Running") and not state.get("Restarting"):
                health = (state.get("Health") or {}).get("Status")
                if not healthy or health in (None, "healthy"):
                    return data
                if health == "unhealthy":
                    raise DockerConflict(f"wait for {container}", "container is unhealthy")
            elif state.get("Status") in ("exited", "dead"):
                raise DockerConflict(
                    f"wait for {container}",
                    f"container {state.get('Status')} with code {state.get('ExitCode')}"
                    + (f": {state['Error']}" if state.get("Error") else ""),
                )
            if time.monotonic() >= deadline:
                what = "healthy" if healthy else "running"
                raise DockerConflict(
                    f"wait for {container}",
                    f"not {what} after {timeout:.0f}s (state {state.get('Status')})",
                )
            time.sleep(poll)

    # -- checkpoints ------------------------------------------------------------

    def checkpoint_create(
        self,
        container: str,
        name: str,
        exit: bool = True,
        checkpoint_dir: str | None = None,
    ) -> None:
        if not CHECKPOINT_NAME_RE.match(name):
            raise ValueError(
                f"invalid checkpoint name {name!r}: must match {CHECKPOINT_NAME_RE.pattern}"
            )

        def create(api: Any) -> None:
            body: dict[str, Any] = {"CheckpointID": name, "Exit": exit}
            if checkpoint_dir:
                body["CheckpointDir"] = checkpoint_dir
            response = api._post_json(
                api._url("/containers/{0}/checkpoints", container),
                data=body,
                timeout=LONG_TIMEOUT,
            )
            api._raise_for_status(response)

        self._call_criu(f"checkpoint {container} as {name}", create)

    def checkpoint_list(self, container: str) -> list[str]:
        def list_(api: Any) -> list[str]:
            response = api._get(api._url("/containers/{0}/checkpoints", container))
            items = api._result(response, json=True) or []
            return [str(item.get("Name")) for item in items]

        return self._call(f"list checkpoints of {container}", list_)

    def checkpoint_delete(self, container: str, name: str) -> None:
        def delete(api: Any) -> None:
            response = api._delete(api._url("/containers/{0}/checkpoints/{1}", container, name))
            api._raise_for_status(response)

        self._call(f"delete checkpoint {name} of {container}", delete)

    # -- images -----------------------------------------------------------------

    def inspect_image(self, image: str) -> dict[str, Any]:
        return self._call(f"inspect image {image}", lambda api: api.inspect_image(image))

    def has_image(self, image_id: str) -> bool:
        try:
            self.inspect_image(image_id)
        except DockerNotFound:
            return False
        return True

    def image_save(self, images: list[str], chunk_size: int = 1 << 20) -> ByteStream:
        """`docker save` as a stream; IDs and tags keep the image ID on load."""

        def save(api: Any) -> ByteStream:
            response = api._get(
                api._url("/images/get"),
                params={"names": images},
                stream=True,
                timeout=LONG_TIMEOUT,
            )
            api._raise_for_status(response)
            return ByteStream(response, chunk_size)

        return self._call(f"save images {', '.join(images)}", save)

    def image_load(self, stream: Iterable[bytes]) -> list[str]:
        """`docker load` from a stream of tar bytes; returns the daemon's status lines."""

        def load(api: Any) -> list[str]:
            response = api._post(
                api._url("/images/load"),
                data=iter(stream),
                params={"quiet": "1"},
                stream=True,
                timeout=LONG_TIMEOUT,
                headers={"Content-Type": "application/x-tar"},
            )
            lines: list[str] = []
            for item in api._stream_helper(response, decode=True):
                if isinstance(item, dict) and item.get("error"):
                    detail = item.get("errorDetail") or {}
                    raise DockerError("load image", str(detail.get("message") or item["error"]))
                if isinstance(item, dict) and item.get("stream"):
                    lines.append(str(item["stream"]).strip())
            return lines

        return self._call("load image", load)

    def tag_image(self, image: str, repository: str, tag: str) -> None:
        self._call(f"tag {image}", lambda api: api.tag(image, repository, tag))

    def image_ids(self) -> set[str]:
        """The IDs of every image here, intermediate ones included."""
        ids = self._call("list images", lambda api: api.images(all=True, quiet=True))
        return {str(i) for i in ids}

    def remove_image(self, image: str) -> None:
        """`docker rmi` without force: refused (DockerConflict) while anything uses it."""
        self._call(f"remove image {image}", lambda api: api.remove_image(image, force=False))

    # -- networks and volumes ---------------------------------------------------

    def network_names(self) -> set[str]:
        nets = self._call("list networks", lambda api: api.networks())
        return {str(n.get("Name")) for n in nets}

    def inspect_network(self, name: str) -> dict[str, Any]:
        return self._call(f"inspect network {name}", lambda api: api.inspect_network(name))

    def networks_labelled(self, label: str) -> list[dict[str, Any]]:
        return self._call(
            f"list networks labelled {label}",
            lambda api: api.networks(filters={"label": label}),
        )

    def create_network(self, name: str, spec: dict[str, Any], labels: dict[str, str]) -> str:
        """Create a network from `agent.migration.networks.NetworkSpec` fields."""
        ipam = spec.get("ipam") or None

        def create(api: Any) -> str:
            import docker.types

            pool = None
            if ipam:
                configs = [
                    docker.types.IPAMPool(
                        subnet=c.get("Subnet"),
                        iprange=c.get("IPRange"),
                        gateway=c.get("Gateway"),
                    )
                    for c in ipam.get("Config") or []
                ]
                pool = docker.types.IPAMConfig(
                    driver=str(ipam.get("Driver") or "default"), pool_configs=configs
                )
            result = api.create_network(
                name,
                driver=spec.get("driver") or "bridge",
                options=spec.get("options") or None,
                ipam=pool,
                internal=bool(spec.get("internal")),
                attachable=bool(spec.get("attachable")),
                enable_ipv6=bool(spec.get("enable_ipv6")),
                labels={**(spec.get("labels") or {}), **labels},
            )
            return str(result.get("Id"))

        return self._call(f"create network {name}", create)

    def remove_network(self, name: str) -> None:
        self._call(f"remove network {name}", lambda api: api.remove_network(name))

    def inspect_volume(self, name: str) -> dict[str, Any]:
        return self._call(f"inspect volume {name}", lambda api: api.inspect_volume(name))

    def create_volume(self, name: str, driver: str = "local") -> dict[str, Any]:
        return self._call(f"create volume {name}", lambda api: api.create_volume(name, driver))

    def remove_volume(self, name: str) -> None:
        self._call(f"remove volume {name}", lambda api: api.remove_volume(name, force=True))


def _ts(value: float | None) -> str | None:
    # The Engine parses "seconds.nanoseconds"; nine digits avoid any rescaling.
    return None if value is None else f"{value:.9f}"
