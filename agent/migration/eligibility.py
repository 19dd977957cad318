"""Can this container move, and what changes if it does: one check, before anything is frozen.

`ferry check`, `ferry migrate` (and its `--dry-run`), policies, drain and
`ferry status` all ask `EligibilityChecker.check`. The source's reasons come
from the container's inspect data (`spec.source_problems`); each target answers
the dry-run peer call `POST /v1/check` with the same checks its prepare runs
(`agent.migration.admission`), so what a check accepts the migration's own
prepare accepts too, unless something changed in between.

A reason is *permanent* when asking again gives the same answer until the
container, the config or a peer changes (`--init`, an address a peer lacks);
*transient* otherwise (a peer unreachable or busy). Drain retries only the
transient ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.migration.errors import MigrationRefused
from agent.migration.spec import (
    DEFAULT_NETWORKS,
    ContainerSpec,
    SpecError,
    source_problems,
    spec_from_inspect,
)
from agent.model import group_of_labels
from agent.peer import protocol
from agent.peer.api import CHECK_PATH
from agent.peer.client import PeerError, PeerRefused

CHECK_TIMEOUT = 10.0


class CheckPeer(Protocol):
    name: str

    async def post_json(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]: ...


@dataclass
class PeerVerdict:
    """One target's answer: would it take the container, and if not, why."""

    peer: str
    reasons: list[str] = field(default_factory=list)
    transient: bool = False  # asking again later may give another answer
    changes: list[str] = field(default_factory=list)

    @property
    def accepts(self) -> bool:
        return not self.reasons


@dataclass
class Eligibility:
    container: str
    container_id: str = ""
    running: bool = True
    blockers: list[str] = field(default_factory=list)  # the container's own, for every target
    blockers_transient: bool = False
    changes: list[str] = field(default_factory=list)
    peers: dict[str, PeerVerdict] = field(default_factory=dict)

    def accepting(self) -> list[str]:
        return [name for name, v in self.peers.items() if v.accepts]

    @property
    def movable(self) -> bool:
        return not self.blockers and bool(self.accepting())

    @property
    def permanent(self) -> bool:
        """Cannot move, and asking again gives the same answer until something changes."""
        if self.movable:
            return False
        if self.blockers:
            return not self.blockers_transient
        return bool(self.peers) and not any(v.transient for v in self.peers.values())

    def reasons(self) -> list[str]:
        out = list(self.blockers)
        if not self.blockers:
            out += [f"{name}: {r}" for name, v in self.peers.items() for r in v.reasons]
            if not self.peers:
                out.append("no peers configured")
        return out

    def summary(self) -> str:
        return "; ".join(self.reasons())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["movable"] = self.movable
        data["permanent"] = self.permanent
        data["reasons"] = self.reasons()
        for name, v in self.peers.items():
            data["peers"][name]["accepts"] = v.accepts
        return data


def refusal(result: Eligibility) -> MigrationRefused:
    exc = MigrationRefused(result.summary())
    exc.eligibility = result
    return exc


def admission_body(
    spec: ContainerSpec, memory_bytes: int, image_bytes: int, state_bytes: int, mid: str = ""
) -> dict[str, Any]:
    """What a target checks, at prepare and for a dry run: one shape for both."""
    body: dict[str, Any] = {
        "container_id": spec.id,
        "name": spec.name,
        "image_id": spec.image_id,
        "image_ref": spec.image_ref,
        "image_bytes": image_bytes,
        "memory_bytes": max(memory_bytes, 1),
        "state_bytes_estimate": state_bytes,
        "ports": [
            {
                "host_ip": p.host_ip,
                "host_port": p.host_port,
                "proto": p.container_port.partition("/")[2] or "tcp",
            }
            for p in spec.ports
        ],
        "networks": spec.networks,
        "volumes": [v.name for v in spec.volumes],
        "addresses": spec.addresses,
        protocol.KEY: protocol.PROTOCOL,
    }
    if mid:
        body["migration_id"] = mid
    return body


def source_changes(
    inspect: dict[str, Any], spec: ContainerSpec, neighbours: Mapping[str, list[str]]
) -> list[str]:
    """What will be different for the container and its clients once it runs elsewhere."""
    out: list[str] = []
    nets = (inspect.get("NetworkSettings") or {}).get("Networks") or {}
    for net, ep in nets.items():
        ip = str((ep or {}).get("IPAddress") or "")
        if net in spec.addresses:
            pinned = ", ".join(spec.addresses[net].values())
            out.append(f"keeps its static address {pinned} on network {net}")
        elif ip:
            out.append(f"its address {ip} on network {net} changes: the target assigns a new one")
        staying = neighbours.get(net) or []
        if staying and net not in DEFAULT_NETWORKS:
            out.append(
                f"leaves network {net} on this host: {', '.join(sorted(staying))} stay here "
                "and can no longer reach it there (nor it them)"
            )
    for p in spec.ports:
        where = p.host_ip or "the target's addresses"
        out.append(
            f"published port {p.host_port} ({p.container_port}) is served on {where} "
            "instead of this host; clients must connect to the target"
        )
    if spec.mac_address:
        out.append(f"keeps its MAC address {spec.mac_address}")
    return out


def neighbours_on_networks(
    containers: list[dict[str, Any]], container_id: str, group: str | None = None
) -> dict[str, list[str]]:
    """Other running containers on this host that stay here, per network (`docker ps` data).

    Members of the container's own group move with it, so they are not left behind.
    """
    out: dict[str, list[str]] = {}
    for c in containers:
        if c.get("Id") == container_id or c.get("State") != "running":
            continue
        if group is not None and group_of_labels(c.get("Labels")) == group:
            continue
        name = str((c.get("Names") or ["?"])[0]).lstrip("/")
        for net in (c.get("NetworkSettings") or {}).get("Networks") or {}:
            out.setdefault(net, []).append(name)
    return out


class EligibilityChecker:
    """Runs the check for the migration engine: inspect here, ask the target(s)."""

    def __init__(
        self,
        adapter: DockerAdapter,
        config: FerryConfig,
        peers: Mapping[str, CheckPeer],
        active: Callable[[str], str | None] = lambda _cid: None,
        data_root_size: Callable[[ContainerSpec], int] = lambda _spec: 0,
        describe_networks: Callable[[ContainerSpec], list[dict[str, Any]]] = lambda _spec: [],
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.peers = peers
        self.active = active  # container id -> migration id while one runs
        self.data_root_size = data_root_size
        self.describe_networks = describe_networks  # what the target creates when missing

    async def inspect(self, container: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self.adapter.inspect_container, container)
        except DockerNotFound:
            raise MigrationRefused(
                f"no container {container!r} on {self.config.name}", bad_input=True
            ) from None
        except DockerError as exc:
            raise MigrationRefused(f"cannot inspect {container}: {exc}") from exc

    async def check(
        self,
        container: str,
        target: str | None = None,
        inspect: dict[str, Any] | None = None,
    ) -> Eligibility:
        """Every reason `container` cannot move (to `target`, or to any peer), and what changes.

        Raises MigrationRefused(bad_input) for an unknown container or peer.
        """
        if target is not None and target not in self.peers:
            known = ", ".join(sorted(self.peers)) or "none configured"
            raise MigrationRefused(f"unknown peer {target!r} (peers: {known})", bad_input=True)
        if inspect is None:
            inspect = await self.inspect(container)
        name = str(inspect.get("Name") or container).lstrip("/")
        result = Eligibility(name, str(inspect.get("Id") or ""))
        result.running = bool((inspect.get("State") or {}).get("Running"))
        try:
            spec = spec_from_inspect(inspect)
        except SpecError as exc:
            result.blockers.append(str(exc))
            return result
        result.blockers = source_problems(inspect, spec, self.config.migration.copy_named_volumes)
        running = self.active(spec.id)
        if running:
            # Alone: while it migrates it is frozen, and "paused" is only a symptom of that.
            result.blockers = [f"{spec.name} is already being migrated ({running})"]
            result.blockers_transient = True
        try:
            listed = await asyncio.to_thread(self.adapter.list_containers)
        except DockerError:
            listed = []  # only the list of neighbours left behind is missing then
        group = group_of_labels((inspect.get("Config") or {}).get("Labels"))
        result.changes = source_changes(
            inspect, spec, neighbours_on_networks(listed, spec.id, group)
        )
        if result.blockers:
            return result  # the targets' answers would not change the outcome
        body = await self._body(spec)
        names = [target] if target is not None else sorted(self.peers)
        verdicts = await asyncio.gather(*(self._ask(n, body) for n in names))
        result.peers = {v.peer: v for v in verdicts}
        return result

    async def _body(self, spec: ContainerSpec) -> dict[str, Any]:
        def measure() -> tuple[int, int]:
            memory = self.adapter.memory_usage(spec.id)
            image = int(self.adapter.inspect_image(spec.image_id).get("Size") or 0)
            return memory, image

        try:
            memory, image = await asyncio.to_thread(measure)
        except DockerError:
            memory, image = spec.memory_limit, 0
        state = memory + await asyncio.to_thread(self.data_root_size, spec)
        body = admission_body(spec, memory, image, state)
        try:
            body["network_specs"] = await asyncio.to_thread(self.describe_networks, spec)
        except DockerError:
            body["network_specs"] = []
        body["spec"] = spec.to_dict()
        return body

    async def _ask(self, name: str, body: dict[str, Any]) -> PeerVerdict:
        peer = self.peers[name]
        try:
            answer = await peer.post_json(CHECK_PATH, body, timeout=CHECK_TIMEOUT)
        except PeerRefused as exc:
            transient = exc.status >= 500 or exc.status in (404, 429)
            return PeerVerdict(name, [exc.reason], transient=transient)
        except PeerError as exc:
            return PeerVerdict(name, [f"unreachable: {exc}"], transient=True)
        verdict = PeerVerdict(
            name,
            [str(r) for r in answer.get("reasons") or []],
            transient=bool(answer.get("transient")),
            changes=[str(c) for c in answer.get("changes") or []],
        )
        too_old = protocol.refusal(name, self.config.name, answer)
        if too_old:
            verdict.reasons.append(too_old)
        mig = self.config.migration
        if not answer.get("has_image"):
            image = f"image {body['image_ref'] or body['image_id']}"
            if not mig.allow_image_shipping:
                verdict.reasons.append(
                    f"lacks {image} and migration.allow_image_shipping is off here"
                )
            elif int(body["image_bytes"]) > int(mig.max_image_bytes):
                verdict.reasons.append(
                    f"lacks {image} ({body['image_bytes']} bytes), over "
                    f"migration.max_image_bytes ({int(mig.max_image_bytes)})"
                )
            else:
                verdict.changes.append(f"{image} is shipped to {name} first")
        return verdict
