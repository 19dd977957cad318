"""The target's stage step: check the staged spec against this host, then create the copy.

The spec must be the prepared container (name, image) and pass this host's
`migration.accept`. The container is created by image ID, with restart policy
"no" and this host's own CRIU config (leave-stopped, the options the source's
dump needs), and every network or volume it makes is journalled at once, so a
crash from there on finds and removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from agent.config import FerryConfig
from agent.docker_adapter import DockerAdapter, DockerError, DockerNotFound
from agent.journal import Journal, JournalError
from agent.migration import criu_config, networks
from agent.migration.accept import DaemonFacts, SpecShapeError, check_spec, parse_spec
from agent.migration.checkpointers import restore_options_for
from agent.migration.incoming import Incoming
from agent.migration.paths import DataRootResolver
from agent.migration.spec import DEFAULT_NETWORKS, ContainerSpec
from agent.peer.api import HandlerError

log = structlog.get_logger(__name__)


def _refuse(reason: str, code: str = "refused", status: int = 409) -> HandlerError:
    return HandlerError(status, code, reason)


def dump_matched(spec: ContainerSpec) -> list[str]:
    """Restore options the source's dump options need (checkpointers.restore_options_for).

    tcp-close for tcp-established (the address changes), file-locks for file-locks
    (restoring lock images without it silently drops the locks).
    """
    try:
        return restore_options_for(spec.dump_options)
    except ValueError as exc:
        raise DockerError("stage", f"cannot restore this dump here: {exc}") from exc


class Stager:
    def __init__(
        self,
        adapter: DockerAdapter,
        config: FerryConfig,
        journal: Journal,
        data_root: DataRootResolver,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.journal = journal
        self.data_root = data_root

    async def accepted_spec(self, inc: Incoming, data: Any) -> ContainerSpec:
        """The staged spec, if it is well-formed and this host's migration.accept allows it."""
        here = self.config.name
        try:
            spec = parse_spec(data)
        except SpecShapeError as exc:
            raise _refuse(str(exc), "bad_request", 400) from None
        if spec.name != inc.name:
            raise _refuse(
                f"spec.name {spec.name!r} is not the prepared {inc.name!r}", "bad_request", 400
            )
        if inc.image_id and spec.image_id != inc.image_id:
            raise _refuse(
                f"spec.image_id {spec.image_id} is not the prepared {inc.image_id}",
                "bad_request",
                400,
            )
        reasons = await self.accept_reasons(spec)
        if reasons:
            raise _refuse(
                f"{here} does not accept this container: " + "; ".join(reasons), "not_accepted", 403
            )
        existing = await asyncio.to_thread(
            lambda: [v.name for v in spec.volumes if self._volume_exists(v.name)]
        )
        if existing:
            # Its data section would be unpacked into a volume that is not this migration's.
            raise _refuse(f"volume(s) {', '.join(existing)} already exist on {here}")
        return spec

    async def accept_reasons(self, spec: ContainerSpec) -> list[str]:
        """What in `spec` this host's migration.accept refuses (empty: all of it is allowed)."""
        host_config = spec.body.get("HostConfig")
        notes = host_config.get("Annotations") if isinstance(host_config, dict) else None
        if (
            isinstance(host_config, dict)
            and isinstance(notes, dict)
            and criu_config.ANNOTATION in notes
        ):
            # The source's own CRIU config, set by Ferry when that host received the
            # container. Never passed on: _create sets this host's.
            host_config["Annotations"] = {
                k: v for k, v in notes.items() if k != criu_config.ANNOTATION
            }
        facts = DaemonFacts()
        if isinstance(host_config, dict) and host_config.get("CgroupnsMode") == "host":
            info = await asyncio.to_thread(self.adapter.info)
            facts = DaemonFacts(cgroup_version=str(info.get("CgroupVersion") or "2"))
        return check_spec(spec, self.config.migration.accept, facts)

    def create(self, inc: Incoming, spec: ContainerSpec) -> dict[str, Any]:
        if not self.adapter.has_image(spec.image_id):
            raise DockerError("stage", f"image {spec.image_ref or spec.image_id} is not here")
        body = dict(spec.body)
        # By ID: a tag on this host may name another image than the source's.
        body["Image"] = spec.image_id
        # The copy must stay stopped after its restore until the source commits, and
        # Docker must not restart it on its own before then.
        conf = criu_config.for_migration(self.data_root.get(), inc.migration_id)
        conf.write(criu_config.restore_options(conf.daemon_log, extra=dump_matched(spec)))
        host_cfg = dict(body.get("HostConfig") or {})
        host_cfg["Annotations"] = dict(host_cfg.get("Annotations") or {}) | {
            criu_config.ANNOTATION: conf.daemon_path
        }
        host_cfg["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
        body["HostConfig"] = host_cfg
        self._create_networks(inc, spec)
        try:
            cid = self.adapter.create_container(body, name=spec.name)
        except DockerError as exc:
            if "bind source path does not exist" in exc.message:
                raise DockerError(
                    "stage", f"bind mount source missing on {self.config.name}: {exc.message}"
                ) from exc
            raise
        inc.container_id = cid
        inc.spec = spec.to_dict()
        inc.created_volumes = [v.name for v in spec.volumes]
        # Journal the id right away: a crash from here on must find and remove it.
        self.journal.update_report(inc.migration_id, inc.journal_report())
        info = self.adapter.inspect_container(cid)
        graph = info.get("GraphDriver") or {}
        if graph.get("Name") != "overlay2":
            raise DockerError(
                "stage", f"{self.config.name} uses storage driver {graph.get('Name')}"
            )
        root = self.data_root.get()
        inc.upper_dir = str(root.local(str(graph["Data"]["UpperDir"])))
        for i, vol in enumerate(spec.volumes):
            mp = self.adapter.inspect_volume(vol.name).get("Mountpoint")
            inc.volume_dirs[f"vol{i}"] = str(root.local(str(mp)))
        if not Path(inc.upper_dir).is_dir():
            raise DockerError("stage", f"upper dir {inc.upper_dir} is not visible to the agent")
        return {"container_id": cid, "image": body["Image"]}

    def _create_networks(self, inc: Incoming, spec: ContainerSpec) -> None:
        """The user-defined networks the container needs and this host lacks."""
        wanted = {str(n.get("name")): n for n in inc.network_specs}
        existing = self.adapter.network_names()
        for name in spec.networks:
            if name in DEFAULT_NETWORKS or name in existing:
                continue
            net = wanted.get(name)
            if net is None or networks.problems(net):
                raise DockerError("stage", f"network {name} does not exist on {self.config.name}")
            self.adapter.create_network(name, net, {networks.LABEL: inc.migration_id})
            inc.created_networks.append(name)
            # Journalled at once: a crash from here on must find and remove it.
            self.journal.update_report(inc.migration_id, inc.journal_report())
            log.info("migration.target.network_created", migration=inc.migration_id, network=name)

    def sweep_networks(self) -> None:
        """Remove networks Ferry made for migrations that were abandoned, once unused."""
        for net in self.adapter.networks_labelled(networks.LABEL):
            mid = str((net.get("Labels") or {}).get(networks.LABEL) or "")
            try:
                rec = self.journal.get(mid)
            except JournalError:
                continue
            if rec.outcome in (None, "succeeded"):
                continue
            with contextlib.suppress(DockerError):
                info = self.adapter.inspect_network(str(net.get("Id") or net.get("Name")))
                if not info.get("Containers"):
                    self.adapter.remove_network(str(info.get("Id")))
                    log.info("migration.target.network_removed", network=info.get("Name"))

    def _volume_exists(self, name: str) -> bool:
        try:
            self.adapter.inspect_volume(name)
        except DockerNotFound:
            return False
        return True
