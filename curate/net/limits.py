"""Bounds that no single row may cross: a hard deadline per request and a per-host concurrency cap.

The deadline is enforced by a :class:`Reaper` thread that shuts down the socket of a
request whose deadline has passed.  A socket timeout alone cannot do this: it bounds
each ``recv``, so a server that sends one byte every two seconds keeps a request alive
forever, and a buffered read of 64 KiB waits for all of it.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator


class Watch:
    """One request under the reaper's eye; ``expired`` tells whether the reaper cut it."""

    __slots__ = ("deadline", "conn", "expired", "cancelled")

    def __init__(self, deadline: float, conn: Any) -> None:
        self.deadline, self.conn = deadline, conn
        self.expired = self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.conn = None


class Reaper:
    """Shuts down the socket of every watched connection whose deadline (``time.monotonic``) passed.

    ``shutdown(SHUT_RDWR)`` from another thread makes a blocked ``recv``/``send``/``connect`` return
    at once, so the thread doing the request raises and frees itself.  One daemon thread per reaper.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, deadline: float, conn: Any) -> Watch:
        w = Watch(deadline, conn)
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="curate-reaper", daemon=True)
                self._thread.start()
            self._cv.notify()
        return w

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cv.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cv.wait(wait)
                if self._closed:
                    return
                w = heapq.heappop(self._heap)[2]
                conn = w.conn
            if conn is None or w.cancelled:
                continue
            w.expired = True
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class HostLimiter:
    """At most ``limit`` requests at a time to one host name (per worker process)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cv = threading.Condition()
        self._busy: dict[str, int] = {}  # only hosts with requests in flight: bounded by the thread count

    @contextmanager
    def slot(self, host: str, deadline: float) -> Iterator[None]:
        with self._cv:
            while self._busy.get(host, 0) >= self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"waited past the deadline for one of {self.limit} connections to {host}")
                self._cv.wait(left)
            self._busy[host] = self._busy.get(host, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                n = self._busy[host] - 1
                if n:
                    self._busy[host] = n
                else:
                    del self._busy[host]
                self._cv.notify_all()
