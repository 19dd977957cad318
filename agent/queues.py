"""Hand-off between a worker thread and its consumer through a bounded queue."""

from __future__ import annotations

import queue
import threading
from typing import Any

# How often a thread blocked on a full queue re-checks that it should stop.
PUT_WAIT = 0.5


def put_until(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put `item`, waiting for room, unless `stop` is set first; True if it was put.

    A plain blocking put would hang forever once the other side has gone away.
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=PUT_WAIT)
            return True
        except queue.Full:
            continue
    return False
