"""User-defined networks a container takes with it.

A container on a user-defined network (a compose project's, say) loses its
name resolution and its neighbours if the target lacks that network. The source
describes each such network; the target creates the missing ones with the same
name and settings, labelled with the migration, and removes them again when the
migration is abandoned and nothing else uses them.
"""

from __future__ import annotations

from typing import Any

from agent.migration.spec import DEFAULT_NETWORKS

LABEL = "ferry.migration"
# Options that would reach outside the network itself on the target host.
_REFUSED_OPTIONS = frozenset({"com.docker.network.bridge.name"})
ALLOWED_DRIVERS = frozenset({"bridge"})


def describe(inspect: dict[str, Any]) -> dict[str, Any]:
    """What the target needs to recreate a network, from `docker network inspect`."""
    ipam = inspect.get("IPAM") or {}
    return {
        "name": str(inspect.get("Name")),
        "driver": str(inspect.get("Driver") or "bridge"),
        "options": dict(inspect.get("Options") or {}),
        "ipam": {
            "Driver": str(ipam.get("Driver") or "default"),
            "Config": [
                {k: v for k, v in (c or {}).items() if k in ("Subnet", "IPRange", "Gateway")}
                for c in ipam.get("Config") or []
            ],
        },
        "internal": bool(inspect.get("Internal")),
        "attachable": bool(inspect.get("Attachable")),
        "enable_ipv6": bool(inspect.get("EnableIPv6")),
        "labels": {
            k: v for k, v in (inspect.get("Labels") or {}).items() if not k.startswith("ferry.")
        },
    }


def problems(spec: dict[str, Any]) -> list[str]:
    """Why the target will not create this network (empty: it may)."""
    name = str(spec.get("name") or "")
    out: list[str] = []
    if not name or name in DEFAULT_NETWORKS or name in ("host", "none"):
        out.append(f"network {name!r} cannot be created by a migration")
    driver = str(spec.get("driver") or "")
    if driver not in ALLOWED_DRIVERS:
        out.append(f"network {name}: driver {driver!r} is not one Ferry creates (bridge only)")
    bad = sorted(set(spec.get("options") or {}) & _REFUSED_OPTIONS)
    if bad:
        out.append(f"network {name}: option {bad[0]} would reach outside the network")
    return out
