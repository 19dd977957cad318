"""A real multi-host Docker + CRIU testbed: namespaced hosts on one machine.

Each host has its own network namespace (on a shared private bridge), its own
mount and PID namespace pivoted into a cached Debian rootfs, and its own
dockerd (experimental mode, CRIU >= 4.2). See README.md "Testbed".
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.testbed.faults import (
    cut_link,
    host_run,
    kill_dockerd,
    netns_run,
    restart_dockerd,
    restore_link,
    start_dockerd,
    stop_dockerd,
)
from tests.testbed.layout import Host, load_hosts

__all__ = [
    "Host",
    "cut_link",
    "host_run",
    "http_get_json",
    "kill_dockerd",
    "load_hosts",
    "netns_run",
    "restart_dockerd",
    "restore_link",
    "start_dockerd",
    "stop_dockerd",
]

_GET = (
    "import json,sys,urllib.request;"
    "print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())"
)


def http_get_json(from_host: Host, url: str, timeout: float = 5.0) -> Any:
    """GET `url` from inside `from_host`'s network, as a client on that host would."""
    proc = netns_run(
        from_host, [sys.executable, "-c", _GET, url, str(timeout)], timeout=timeout + 10
    )
    if proc.returncode != 0:
        raise ConnectionError(
            f"GET {url} from {from_host.name} failed: {proc.stderr.strip()[-300:]}"
        )
    return json.loads(proc.stdout)
