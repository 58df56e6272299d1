"""Real server software for the download tests: nginx (Debian's package) and an HTTP/1.0 origin.

``NginxSite`` writes a site (photos made from scikit-image's sample photographs, a large file, a
robots.txt) and a test CA with certificates (the ``openssl`` CLI), and serves them with
:class:`curate.demo.nginx.Nginx` (own pid file, logs and temp paths; stopped by its PID) on free
ports of 127.0.0.1.  ``Http10Origin`` runs Python's ``BaseHTTPRequestHandler``
with its default protocol version (HTTP/1.0: every answer closes the connection) in its own process;
nginx also proxies it (``/origin/``), which turns its length-less bodies into chunked ones.

Every address is 127.0.0.1; a redirect aims at 127.0.0.2 only to be refused before any connect.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from curate.demo.nginx import Nginx, PortTaken, free_port

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
BIG_BYTES = 3 << 20  # served with a Content-Length (nginx) and without one (origin, chunked by nginx)


def photo_bytes(i: int, side: int = 200) -> bytes:
    """A JPEG crop of one of scikit-image's photographs (10-20 KB: well over nginx's 2 KB burst)."""
    import skimage
    from PIL import Image

    img = Image.open(Path(skimage.__file__).parent / "data" / PHOTOS[i % len(PHOTOS)]).convert("RGB")
    buf = io.BytesIO()
    img.resize((side, side)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_ca(folder: Path, names: tuple[str, ...]) -> Path:
    """A CA (``ca.pem``) and, per host name, ``NAME.pem``/``NAME.key`` signed by it (subjectAltName=DNS:NAME)."""
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=curate test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name in names:
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return folder / "ca.pem"


ORIGIN = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PHOTO = open(sys.argv[1], "rb").read()
BIG = int(sys.argv[2])

class H(BaseHTTPRequestHandler):  # protocol_version stays "HTTP/1.0": each answer closes the connection
    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/photo.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO)
        elif path == "/trickle.jpg":  # 2 KB at once, then one byte every 0.5 s (ends after 10 minutes)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(PHOTO[:2048])
            self.wfile.flush()
            for i in range(2048, min(len(PHOTO), 2048 + 1200)):
                time.sleep(0.5)
                self.wfile.write(PHOTO[i:i + 1])
                self.wfile.flush()
        elif path == "/endless":  # BIG bytes, no Content-Length: the end of the body is the end of the connection
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            block = PHOTO * (65536 // len(PHOTO) + 1)
            for _ in range(BIG // 65536 + 1):
                self.wfile.write(block[:65536])
        else:
            self.send_error(404)

ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.handle_error = lambda *a: None  # a client that hung up (the deadline cut it): nothing to report
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


class Http10Origin:
    """The HTTP/1.0 origin in its own process on 127.0.0.1 (``base``: its URL)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "origin.jpg").write_bytes(photo_bytes(3))
        self.proc = subprocess.Popen([sys.executable, "-c", ORIGIN, str(folder / "origin.jpg"), str(BIG_BYTES)],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


LOCATIONS = """
        absolute_redirect off;
        location /photos/ {{ }}
        location /slow/ {{ alias {site}/photos/; limit_rate_after 2k; limit_rate 1; sendfile off; }}
        location /slow-headers/ {{ alias {site}/photos/; limit_rate 1; sendfile off; }}
        location /noai/ {{ alias {site}/photos/; add_header X-Robots-Tag noai; }}
        location /private/ {{ alias {site}/photos/; }}
        location = /r301 {{ return 301 /photos/a.jpg; }}
        location = /r302 {{ return 302 /r301; }}
        location = /r302-blocked {{ return 302 http://127.0.0.2:{http_port}/photos/a.jpg; }}
        location = /s403 {{ return 403; }}
        location = /s500 {{ return 500; }}
        location = /s429 {{ add_header Retry-After 1 always; return 429; }}
        location = /s503 {{ add_header Retry-After 3600 always; return 503; }}
        location /origin/ {{ proxy_pass {origin}/; proxy_buffering off; }}
        # 503 while the file `down` exists in the site folder (a retry test heals it by deleting the file)
        location /flaky/ {{ alias {site}/photos/; if (-f {site}/down) {{ add_header Retry-After 3600 always; return 503; }} }}
"""

SERVERS = """
    server {{
        listen 127.0.0.1:{http_port};
        server_name curate.test;
        root {site};
{locations}
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl;
        server_name curate.test;
        ssl_certificate {certs}/curate.test.pem;
        ssl_certificate_key {certs}/curate.test.key;
        root {site};
{locations}
    }}
"""


class NginxSite(Nginx):
    """nginx on 127.0.0.1: ``base`` (http) and ``https_port`` (certificate for ``curate.test``, CA ``ca``)."""

    def __init__(self, folder: Path, origin: Http10Origin) -> None:
        self.site = folder / "site"
        (self.site / "photos").mkdir(parents=True)
        for i, name in enumerate("abcd"):
            (self.site / "photos" / f"{name}.jpg").write_bytes(photo_bytes(i))
        (self.site / "photos" / "big.jpg").write_bytes(os.urandom(BIG_BYTES))
        (self.site / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
        self.ca = make_ca(folder / "certs", ("curate.test",))
        self.origin = origin
        for attempt in range(3):
            self.http_port, self.https_port = free_port(), free_port()
            fmt = dict(site=self.site, certs=folder / "certs", http_port=self.http_port,
                       https_port=self.https_port, origin=origin.base)
            try:
                super().__init__(folder / "run", SERVERS.format(locations=LOCATIONS.format(**fmt), **fmt),
                                 [self.http_port, self.https_port])
                break
            except PortTaken:  # another process bound a port after free_port chose it: choose again
                if attempt == 2:
                    raise
        self.base = f"http://127.0.0.1:{self.http_port}"
