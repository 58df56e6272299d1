"""Bounds that no single row may cross: a hard deadline per request and a per-host concurrency cap.

The deadline is enforced by a :class:`Reaper` thread that shuts down the socket of a
request whose deadline has passed.  A socket timeout alone cannot do this: it bounds
each ``recv``, so a server that sends one byte every two seconds keeps a request alive
forever.

The reaper holds the socket itself, from the moment it is connected (:meth:`Watch.adopt`, called
from the connection's ``_new_conn``), as a duplicate file descriptor of its own.  It never looks the
socket up on the connection object later: ``http.client`` takes the socket away from the connection
when a server answers ``Connection: close`` (every HTTP/1.0 server, nginx answering curate's
request), and a TLS wrap replaces it.  ``shutdown(SHUT_RDWR)`` acts on the connection, not on one
descriptor, so shutting down the duplicate ends every blocked ``recv``/``send`` on the original and
on the TLS socket wrapped around it; holding our own descriptor means it can never be closed and
reused under the reaper.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class Watch:
    """One request under the reaper's eye; ``expired`` tells whether the reaper cut it."""

    __slots__ = ("deadline", "expired", "cancelled", "_socks", "_lock")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = self.cancelled = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def adopt(self, sock: socket.socket) -> None:
        """Watch ``sock`` (just connected) until :meth:`cancel`; cut it at once if the deadline already passed."""
        dup = sock.dup()
        with self._lock:
            if self.cancelled:
                dup.close()
                return
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)

    def expire(self) -> None:
        """The deadline passed: shut down every socket of this request (called by the reaper)."""
        with self._lock:
            if self.cancelled:
                return
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def cancel(self) -> None:
        """The request is over: close the reaper's duplicates (the request's own sockets are its own to close)."""
        with self._lock:
            self.cancelled = True
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more): nothing blocks on it
        pass


class Reaper:
    """Shuts down the sockets of every watched request whose deadline (``time.monotonic``) passed.

    ``shutdown(SHUT_RDWR)`` from another thread makes a blocked ``recv``/``send`` return at once, so
    the thread doing the request raises (or reads end of file) and frees itself.  One daemon thread
    per reaper.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, deadline: float) -> Watch:
        w = Watch(deadline)
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="curate-reaper", daemon=True)
                self._thread.start()
            if self._heap[0][2] is w:  # the reaper sleeps until the earliest deadline: wake it only for a new one
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
            w.expire()


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
