"""Testbed workload: keeps one outgoing TCP connection to HOST:PORT.

Sends "TOKEN N" lines every 100 ms and waits for each echo (2 s timeout); on
any error it reconnects and carries on counting. TOKEN is fixed per process
start, so the server sees whether the same process came back.
"""

import os
import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
token = os.urandom(8).hex()
print(f"start token={token}", flush=True)
n = 0
while True:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            print("connected", flush=True)
            f = s.makefile("rwb")
            while True:
                n += 1
                f.write(f"{token} {n}\n".encode())
                f.flush()
                if not f.readline():
                    raise ConnectionError("server closed")
                time.sleep(0.1)
    except OSError as exc:
        print(f"error n={n}: {exc!r}", flush=True)
        time.sleep(0.2)
