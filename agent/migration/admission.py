"""What a target checks about a container it is asked to take, besides room and policy.

Run at prepare and by the dry-run peer call (`TargetHandlers.check`), so a
check and a migration get the same answer. Published ports are tried with a
real bind in this host's network namespace (the one dockerd publishes in): a
host IP the host does not have fails here, not after the freeze. Static
addresses must lie in the target network's subnet and be free there.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

from agent.docker_adapter import DockerAdapter, DockerNotFound

ANY_ADDRESSES = ("", "0.0.0.0", "::")

Binder = Callable[[str, int, str], int]  # (ip, port, proto) -> 0 or an errno


def try_bind(ip: str, port: int, proto: str) -> int:
    """0 if (ip, port) could be bound here now, else the errno; nothing stays bound."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip or "0.0.0.0", port))
    except OSError as exc:
        return exc.errno or errno.EINVAL
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return 0


def published_here(containers: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """(host ip, port) of every port a running container publishes on this host."""
    out = []
    for c in containers:
        if c.get("State") != "running":
            continue
        for p in c.get("Ports") or []:
            if p.get("PublicPort"):
                out.append((str(p.get("IP") or ""), int(p["PublicPort"])))
    return out


def _overlaps(ip: str, used_ip: str) -> bool:
    return ip in ANY_ADDRESSES or used_ip in ANY_ADDRESSES or used_ip == ip


def port_problems(
    ports: Iterable[dict[str, Any]],
    published: list[tuple[str, int]],
    here: str,
    binder: Binder = try_bind,
) -> list[str]:
    out: list[str] = []
    for p in ports:
        ip, port = str(p.get("host_ip") or ""), int(p["host_port"])
        proto = str(p.get("proto") or "tcp")
        shown = f"{ip}:{port}" if ip else str(port)
        if any(port == used and _overlaps(ip, used_ip) for used_ip, used in published):
            out.append(f"port {port} is already published on {here}")
            continue
        err = binder(ip, port, proto)
        if err == errno.EADDRNOTAVAIL:
            out.append(
                f"port {shown}/{proto} cannot be bound on {here}: {ip} is not an address of {here}"
            )
        elif err == errno.EADDRINUSE:
            out.append(f"port {shown}/{proto} is in use on {here} by a process outside Docker")
        elif err and err != errno.EACCES:
            out.append(f"port {shown}/{proto} cannot be bound on {here}: {errno.errorcode[err]}")
    return out


def _in_subnets(ip: str, subnets: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(s, strict=False) for s in subnets)
    except ValueError:
        return False


def address_problems(
    addresses: dict[str, dict[str, str]], adapter: DockerAdapter, here: str
) -> list[str]:
    """Why a static address cannot be given on this host's network of the same name."""
    out: list[str] = []
    for net, wanted in (addresses or {}).items():
        try:
            info = adapter.inspect_network(net)
        except DockerNotFound:
            continue  # a missing network is reported (or created) on its own
        configs = (info.get("IPAM") or {}).get("Config") or []
        subnets = [str(c.get("Subnet")) for c in configs if c.get("Subnet")]
        gateways = {str(c.get("Gateway")) for c in configs if c.get("Gateway")}
        used = {
            str(ep.get(key) or "").split("/")[0]: str(ep.get("Name") or cid[:12])
            for cid, ep in (info.get("Containers") or {}).items()
            for key in ("IPv4Address", "IPv6Address")
        }
        for ip in wanted.values():
            if not _in_subnets(ip, subnets):
                out.append(
                    f"static address {ip} is outside network {net} on {here} "
                    f"(subnet {', '.join(subnets) or 'none'})"
                )
            elif ip in gateways:
                out.append(f"static address {ip} is the gateway of network {net} on {here}")
            elif ip in used:
                out.append(f"static address {ip} on network {net} is taken on {here} by {used[ip]}")
    return out
