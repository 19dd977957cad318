"""python -m tests.testbed up|down|status|exec|agents — see README.md "Testbed"."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tests.testbed import hosts as _hosts
from tests.testbed import procs
from tests.testbed.images import ensure_images
from tests.testbed.layout import MAX_HOSTS, load_state
from tests.testbed.progress import step
from tests.testbed.rootfs import ensure_rootfs
from tests.testbed.service_images import ensure_service_image


def cmd_up(args: argparse.Namespace) -> int:
    why = _hosts.preflight()
    if why:
        print(f"testbed: cannot run here: {why}", file=sys.stderr)
        return 3
    started = time.monotonic()
    if args.systemd:
        from tests.testbed.systemd_rootfs import ensure_systemd_rootfs

        rootfs = ensure_systemd_rootfs()
    else:
        rootfs = ensure_rootfs()
    hosts = _hosts.up(args.hosts, rootfs, systemd=args.systemd)
    ensure_images(hosts)
    if args.services:
        ensure_service_image(hosts)
    step(
        f"testbed up in {time.monotonic() - started:.1f}s; "
        "`python -m tests.testbed status` describes it"
    )
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("testbed: down needs root", file=sys.stderr)
        return 3
    _hosts.down()
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    hosts, _ = load_state()
    out = []
    for h in hosts:
        item = h.public()
        item["up"] = _hosts.healthy(h)
        out.append(item)
    print(json.dumps(out, indent=2))
    return 0 if hosts and all(o["up"] for o in out) else 1


def cmd_exec(args: argparse.Namespace) -> int:
    hosts, _ = load_state()
    match = [h for h in hosts if h.name == args.host]
    if not match:
        names = ", ".join(h.name for h in hosts) or "none: run `make testbed-up`"
        print(f"testbed: no host {args.host!r} (hosts: {names})", file=sys.stderr)
        return 2
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("testbed: exec needs a command after --", file=sys.stderr)
        return 2
    extra = {}
    if match[0].agent_config:
        extra["FERRY_CONFIG"] = match[0].agent_config
    if match[0].systemd:
        from tests.testbed.systemd_hosts import host_argv

        # A systemd host is a machine of its own: enter all its namespaces.
        argv = host_argv(match[0], cmd)
    else:
        argv = procs.netns_argv(match[0], cmd, extra)
    os.execvp(argv[0], argv)
    return 127  # pragma: no cover


def cmd_agents(args: argparse.Namespace) -> int:
    from tests.testbed import agents  # the agents need the ferry package; hosts do not

    hosts, _ = load_state()
    if not hosts:
        print("testbed: no hosts; run `python -m tests.testbed up` first", file=sys.stderr)
        return 3
    if args.action == "up":
        agents.agents_up(hosts)
    else:
        agents.agents_down(hosts)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build/cache the rootfs and start the hosts (idempotent)")
    up.add_argument("--hosts", type=int, default=int(os.environ.get("FERRY_TESTBED_HOSTS", "2")),
                    help=f"number of hosts, 1..{MAX_HOSTS} (default 2)")  # fmt: skip
    up.add_argument("--services", action="store_true",
                    help="also build (once, cached) and load ferry-test/services:1; "
                    "tests that need it do this themselves")  # fmt: skip
    up.add_argument(
        "--systemd",
        action="store_true",
        help="boot each host with systemd as PID 1 and docker.service inside",
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser(
        "down", help="stop everything and remove namespaces, links, mounts, data"
    ).set_defaults(func=cmd_down)
    sub.add_parser("status", help="JSON: one object per host").set_defaults(func=cmd_status)
    ex = sub.add_parser(
        "exec", help="run a command in HOST's network namespace with DOCKER_HOST set"
    )
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    ag = sub.add_parser("agents", help="start/stop a real `ferry run` on every host")
    ag.add_argument("action", choices=["up", "down"])
    ag.set_defaults(func=cmd_agents)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
