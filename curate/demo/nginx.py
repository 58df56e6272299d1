"""A private nginx (Debian's ``nginx`` / ``nginx-light`` package) on 127.0.0.1, for tests and benchmarks.

Real server software behaves in ways our own Python servers do not (it answers ``Connection: close``
with ``Connection: close``, trickles with ``limit_rate``, chunks proxied bodies), so every download
property that depends on servers is also checked against nginx.  :class:`Nginx` writes a
configuration whose pid file, logs and every temp path lie in a folder of its own, runs
``nginx -g 'daemon off;'`` as a child process (never the system service) and stops it by its PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """
worker_processes {workers};
{user}
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ image/jpeg jpg jpeg; image/png png; image/webp webp; text/plain txt; }}
    default_type application/octet-stream;
    access_log {access_log};
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    sendfile on;
    keepalive_timeout 30;
{servers}
}}
"""


def nginx_binary() -> str | None:
    """The nginx executable (``/usr/sbin`` is not on every PATH), or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now, and never one this process was given before.

    The kernel may hand the same ephemeral port to two binds in a row once the first socket is
    closed, so two calls could return one port: two nginx servers on it merge into one socket (the
    CI saw the http server inherit the https server's ``ssl``). A port is still only free until
    someone binds it; callers that start servers retry with new ports (:class:`PortTaken`).
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


class PortTaken(RuntimeError):
    """nginx could not bind a port: another process took it between :func:`free_port` and the start."""


class Nginx:
    """nginx running ``servers`` (``server { listen 127.0.0.1:PORT; ... }`` blocks) until :meth:`stop`.

    ``ports``: the ports those blocks listen on, waited for before the constructor returns.
    ``access_log``: False turns the log off (benchmarks); :meth:`requests` counts its lines.
    """

    def __init__(self, run_dir: Path, servers: str, ports: list[int], *, workers: int = 1,
                 access_log: bool = True, start_seconds: float = 20.0) -> None:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf = self.run_dir / "nginx.conf"
        conf.write_text(CONF.format(
            workers=workers, run=self.run_dir, servers=servers,
            access_log=f"{self.run_dir}/access.log" if access_log else "off",
            user="user root;" if os.geteuid() == 0 else ""))  # as root, workers must read 0700 temp folders
        for stale in ("nginx.pid", "error.log"):  # a start before this one in the same folder (a retry)
            (self.run_dir / stale).unlink(missing_ok=True)
        self.proc = subprocess.Popen([binary, "-p", str(self.run_dir), "-e", str(self.run_dir / "error.log"),
                                      "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait(ports, start_seconds)
        except RuntimeError:
            self.stop()
            raise

    def _wait(self, ports: list[int], seconds: float) -> None:
        """Until nginx has written its pid file (after it bound every listening socket) and answers on ``ports``.

        A port answering is not enough: someone else may listen there while nginx retries its bind
        (it logs ``Address already in use`` and tries again for 2.5 s before it exits).
        """
        pid_file, log = self.run_dir / "nginx.pid", self.run_dir / "error.log"
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            logged = log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" in logged:
                raise PortTaken(f"nginx could not bind its port: {logged.strip().splitlines()[-1][-300:]}")
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() or logged.strip()
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err[-500:]}")
            try:
                if pid_file.read_text().strip() == str(self.proc.pid):
                    for port in ports:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nginx is not listening on 127.0.0.1:{ports} after {seconds:g} s")

    def requests(self, target: str) -> int:
        """How many GET requests the access log holds for ``target`` (path and query string, exactly)."""
        log = self.run_dir / "access.log"
        if not log.exists():
            return 0
        return sum(f'"GET {target} HTTP/' in line for line in log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the master's fast shutdown stops its workers too
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
