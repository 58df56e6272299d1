"""A small threaded HTTP server for a demo site written by :func:`curate.demo.corpus.build_site`.

Files are served from ``site_dir/files``; ``site_dir/routes.json`` adds special responses per
path: ``{"status": 404}``, ``{"delay": seconds}``, ``{"headers": {...}}``, ``{"content_type": "..."}``.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import posixpath
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
          ".gif": "image/gif", ".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8"}


def _content_type(path: Path) -> str:
    ext = path.suffix.lower()
    return _TYPES.get(ext) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for handler threads (e.g. a sleeping slow row)
    request_queue_size = 256  # many concurrent downloaders connect at once
    allow_reuse_address = True

    def __init__(self, addr, files_dir: Path, routes: dict, slow_seconds: float | None):
        self.files_dir = files_dir.resolve()
        self.routes = routes
        self.slow_seconds = slow_seconds
        self.stop_event = threading.Event()
        self.hits = 0  # requests answered (GET and HEAD), for tests and benchmarks
        self.requested: list[str] = []  # their paths, in order
        self.failing: dict[str, int] = {}  # path -> status answered instead of the file (DemoServer.fail)
        self._hits_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def count_hit(self, path: str = "") -> None:
        with self._hits_lock:
            self.hits += 1
            self.requested.append(path)

    def handle_error(self, request, client_address):  # client went away etc.: not worth a traceback
        log.debug("demo server: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "curate-demo/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        log.debug("demo server %s: " + format, self.address_string(), *args)

    def do_GET(self):
        self.server.count_hit(urlsplit(self.path).path)
        self._respond(body=True)

    def do_HEAD(self):
        self.server.count_hit(urlsplit(self.path).path)
        self._respond(body=False)

    def _resolve(self, path: str) -> Path | None:
        rel = posixpath.normpath(unquote(path)).lstrip("/")
        if not rel or rel == "." or rel.startswith(".."):
            return None
        target = (self.server.files_dir / rel).resolve()
        if self.server.files_dir not in target.parents or not target.is_file():
            return None
        return target

    def _respond(self, body: bool) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        route = srv.routes.get(path, {})
        delay = route.get("delay")
        if delay is not None:
            delay = srv.slow_seconds if srv.slow_seconds is not None else float(delay)
            if srv.stop_event.wait(delay):  # server stopping: drop the connection unanswered
                self.close_connection = True
                return
        status = int(srv.failing.get(path) or route.get("status", 200))
        target = self._resolve(path) if status == 200 else None
        if target is None:
            status = status if status != 200 else 404
            data, ctype = f"{status} {self.responses.get(status, ('',))[0]}\n".encode(), "text/plain"
        else:
            data, ctype = target.read_bytes(), route.get("content_type") or _content_type(target)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for key, value in route.get("headers", {}).items():
                self.send_header(key, str(value))
            self.end_headers()
            if body:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class DemoServer:
    """Serve a demo site on ``host:port`` (port 0 picks a free one) from a daemon thread.

    ``slow_seconds`` overrides every ``delay`` in routes.json (tests use a short one).
    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, site_dir, host: str = "127.0.0.1", port: int = 0, slow_seconds: float | None = None):
        self.site_dir = Path(site_dir)
        self.host, self.port = host, port
        self.slow_seconds = slow_seconds
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def hits(self) -> int:
        """Requests the server has answered since it started."""
        return self._httpd.hits if self._httpd is not None else 0

    @property
    def requested(self) -> list[str]:
        """The paths of the requests answered so far, in order (a copy)."""
        return list(self._httpd.requested) if self._httpd is not None else []

    def fail(self, paths: list[str], status: int = 503) -> None:
        """Answer ``status`` (e.g. 503 of an overloaded origin) to requests for these URL paths from now on."""
        self._httpd.failing.update({p: status for p in paths})

    def heal(self) -> None:
        """Serve every path normally again."""
        self._httpd.failing.clear()

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("DemoServer has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "DemoServer":
        if self._httpd is not None:
            return self
        routes_path = self.site_dir / "routes.json"
        routes = json.loads(routes_path.read_text()) if routes_path.exists() else {}
        files_dir = self.site_dir / "files"
        if not files_dir.is_dir():
            raise FileNotFoundError(f"{files_dir} does not exist; run curate.demo.corpus.build_site first")
        self._httpd = _Server((self.host, self.port), files_dir, routes, self.slow_seconds)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"curate-demo-server-{self.port}", daemon=True)
        self._thread.start()
        log.info("demo server serving %s at %s", files_dir, self.base_url)
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stop_event.set()  # wakes handlers sleeping on a slow route
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        log.info("demo server on port %d stopped", self.port)

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
