"""Clients and servers the real-software tests run inside a testbed host's network.

Run as ``python -m tests.e2e.service_clients MODE ...`` under ``nsenter --net``
(tests.testbed.procs.netns_argv), so they talk only to testbed addresses.

- ``redis OUT ADDR [ADDR ...]``: three clients on persistent connections, each
  adding its next number to its own Redis set (``SADD c<i> n``); client 2 sends
  pipelines of 50. A number is written to ``OUT/c<i>.acked`` only once Redis
  answered for it. On any error (2 s timeout) a client reconnects, trying the
  addresses in turn, and logs what it saw to ``OUT/events``
  (``FERRY_CLIENT_TIMEOUT`` sets the timeout). Stops when
  ``OUT/stop`` exists.
- ``echo OUT PORT``: a line echo server; logs ``<peer ip> <line>`` to ``OUT/lines``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

# A client's patience for one answer; FERRY_CLIENT_TIMEOUT overrides it.
TIMEOUT = float(os.environ.get("FERRY_CLIENT_TIMEOUT", "2"))
PIPELINE = 50


def _event(out: Path, text: str) -> None:
    with (out / "events").open("a") as fh:
        fh.write(f"{time.time():.3f} {text}\n")


def _connect(
    addrs: list[tuple[str, int]], start: int, out: Path, who: str
) -> tuple[socket.socket, int]:
    i = start
    while not (out / "stop").exists():
        host, port = addrs[i % len(addrs)]
        try:
            sock = socket.create_connection((host, port), timeout=TIMEOUT)
            sock.settimeout(TIMEOUT)
            _event(out, f"{who} connected {host}:{port}")
            return sock, i % len(addrs)
        except OSError:
            i += 1
            time.sleep(0.1)
    raise SystemExit(0)


def _read_int_replies(f: object, count: int) -> None:
    for _ in range(count):
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("server closed the connection")
        if not line.startswith(b":"):
            raise ConnectionError(f"unexpected reply {line!r}")


def redis_client(idx: int, out: Path, addrs: list[tuple[str, int]]) -> None:
    who = f"c{idx}"
    batch = PIPELINE if idx == 2 else 1
    n = 0
    at = 0
    sock, at = _connect(addrs, at, out, who)
    acked = (out / f"{who}.acked").open("a")
    while not (out / "stop").exists():
        try:
            f = sock.makefile("rb")
            while not (out / "stop").exists():
                nums = list(range(n + 1, n + 1 + batch))
                payload = b"".join(
                    f"*3\r\n$4\r\nSADD\r\n${len(who)}\r\n{who}\r\n${len(str(x))}\r\n{x}\r\n".encode()
                    for x in nums
                )
                sock.sendall(payload)
                _read_int_replies(f, batch)
                n = nums[-1]
                acked.write("".join(f"{x}\n" for x in nums))
                acked.flush()
                time.sleep(0.02)
        except (OSError, ConnectionError) as exc:
            _event(out, f"{who} error after n={n}: {exc!r}")
            sock.close()
            # Unanswered numbers are not acknowledged; they are sent again under new numbers.
            n += batch
            sock, at = _connect(addrs, at + 1, out, who)
    acked.close()


def echo_server(out: Path, port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), reuse_port=True)
    lines = (out / "lines").open("a")
    lock = threading.Lock()

    def serve(conn: socket.socket, peer: str) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                with lock:
                    lines.write(f"{peer} {line.decode().strip()}\n")
                    lines.flush()
                f.write(line)
                f.flush()

    (out / "ready").touch()
    while True:
        conn, (peer, _) = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "redis":
        addrs = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in argv[2:]]
        threads = [
            threading.Thread(target=redis_client, args=(i, out, addrs), daemon=True)
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return 0
    if mode == "echo":
        echo_server(out, int(argv[2]))
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
