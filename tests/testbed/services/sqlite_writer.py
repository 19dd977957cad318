"""Testbed workload: a SQLite WAL writer that holds its locks for life.

Each transaction inserts the next number; the row count must always equal the
last number (no gap, no repeat). `flock` on a lock file keeps a second writer
out, as real services do; SQLite's WAL mode itself holds POSIX locks on the
database and its -shm file. Prints one token per process start, so a restored
process and a restarted one can be told apart.
"""

import fcntl
import os
import sqlite3
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "/srv/writer"
os.makedirs(DIR, exist_ok=True)
guard = open(os.path.join(DIR, "writer.lock"), "w")  # noqa: SIM115 - held for life
fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
db = sqlite3.connect(os.path.join(DIR, "w.db"), isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, at REAL, pid INTEGER)")
n = db.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0]
print(f"start token={os.urandom(8).hex()} from={n}", flush=True)
while True:
    n += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (n, time.time(), os.getpid()))
    db.execute("COMMIT")
    time.sleep(0.02)
