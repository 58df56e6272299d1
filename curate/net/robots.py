"""robots.txt, fetched through the same guarded client and cached per host (RFC 9309 semantics).

* 2xx: parsed with the standard library's ``urllib.robotparser``;
* 4xx (no robots.txt): everything is allowed;
* 5xx, timeouts, network errors: the host is treated as disallowing everything
  ("unreachable", RFC 9309 section 2.3.1.4) for the rest of the run.
The cache is an LRU of ``max_hosts`` entries; concurrent rows of one host wait for one fetch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
ROBOTS_DEADLINE = 10.0


class _Allow:
    def can_fetch(self, agent: str, url: str) -> bool:
        return True


class _Deny:
    def can_fetch(self, agent: str, url: str) -> bool:
        return False


class RobotsCache:
    def __init__(self, agent: str, max_hosts: int = 10_000) -> None:
        self.agent = agent
        self.max_hosts = max_hosts
        self._rules: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # robots.txt requests made (for tests and stats)

    def allowed(self, fetcher: Any, url: str, deadline_at: float) -> bool:
        parts = urlsplit(url)
        key = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        while True:
            with self._lock:
                rules = self._rules.get(key)
                if rules is not None:
                    self._rules.move_to_end(key)
                    break
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    owner = True
                else:
                    owner = False
            if not owner:
                if not event.wait(max(0.0, deadline_at - time.monotonic())):
                    return False  # waited past the deadline: treat as disallowed for this row
                continue
            try:
                rules = self._fetch(fetcher, key, deadline_at)
            finally:
                with self._lock:
                    if rules is not None:
                        self._rules[key] = rules
                        while len(self._rules) > self.max_hosts:
                            self._rules.popitem(last=False)
                    self._pending.pop(key).set()
            break
        path = parts.path or "/"
        return rules.can_fetch(self.agent, f"{path}?{parts.query}" if parts.query else path)

    def _fetch(self, fetcher: Any, key: str, deadline_at: float) -> Any:
        self.fetches += 1
        r = fetcher.get(f"{key}/robots.txt", deadline_at=min(deadline_at, time.monotonic() + ROBOTS_DEADLINE),
                        max_bytes=ROBOTS_MAX_BYTES, check_robots=False)
        if r.ok:
            rp = RobotFileParser()
            rp.parse(r.body.decode("utf-8", errors="replace").splitlines())
            return rp
        if r.status is not None and 400 <= r.status < 500 and r.status != 429:
            return _Allow()
        if r.reason == "response_too_large":  # RFC 9309: parse what fits; we simply allow
            return _Allow()
        return _Deny()
