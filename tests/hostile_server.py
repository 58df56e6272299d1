"""A loopback HTTP server playing the hostile web, run as its own process by the tests.

    python tests/hostile_server.py [PORT]   -> prints the port, serves until killed

Paths (see tests/test_hostile_web.py):
  /ok/NAME.jpg            a real photograph (JPEG, 128 px)
  /photo/[TAG-]N.jpg?delay=S  photo number N (a variant with a coloured square), after S seconds
  /slow                   200, Content-Length 1000, then one byte every 2 s
  /slow-headers           the status line, then one header byte every 2 s
  /big                    Content-Length 2 GiB of zeros, sent as fast as the client reads
  /chunked                an endless chunked body (no Content-Length)
  /announced              Content-Length 10 GiB, body streamed
  /bomb.jpg               a 632-byte-class JPEG whose header declares 30000x30000
  /bomb.png               a ~1-3 MB PNG of 30000x30000 (zlib-compressed zeros)
  /redirect?to=URL        302 to URL
  /loop                   302 to itself
  /retry-after?id=X&s=N&code=C  C (429) with Retry-After: N the first time for id X, then the photo
  /concurrency?id=X       the photo after 0.4 s; /stats reports the peak concurrency per id
  /noai.jpg               the photo with X-Robots-Tag: noai
  /robots.txt             "User-agent: *  Disallow: /private/"
  /private/NAME.jpg       the photo (must never be requested when robots.txt is respected)
  /stats                  JSON: requests per path, peak concurrency per id
"""

from __future__ import annotations

import io
import json
import struct
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GIB = 1 << 30


def photo_jpeg(size: int = 128) -> bytes:
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def variant(img, i: int) -> bytes:
    """Photo number ``i``: the base photo with a coloured square placed by ``i`` (distinct bytes and pHash)."""
    from PIL import ImageDraw

    im = img.copy()
    x, y = (i * 37) % 96, (i * 61) % 96
    ImageDraw.Draw(im).rectangle([x, y, x + 31, y + 31], fill=((i * 53) % 256, (i * 97) % 256, (i * 151) % 256))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_bomb(side: int = 30000) -> bytes:
    """A tiny valid JPEG whose SOF0 header is patched to declare side x side pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG", quality=50)
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")  # SOF0: FFC0, length(2), precision(1), height(2), width(2)
    struct.pack_into(">HH", data, i + 5, side, side)
    return bytes(data)


def png_bomb(side: int = 30000) -> bytes:
    """A real PNG of side x side 8-bit grey pixels (all zero), compressed to a few MB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    comp = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row * 100) for _ in range(side // 100)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.peak: dict[str, int] = defaultdict(int)
        self.seen_ids: set[str] = set()
        self.photo = photo_jpeg()
        from PIL import Image

        self.base = Image.open(io.BytesIO(self.photo)).convert("RGB")
        self.jpeg_bomb = jpeg_bomb()
        self.png_bomb = png_bomb()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, length: int | None, chunk: bytes, pause: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        while length is None or sent < length:
            part = chunk if length is None else chunk[: length - sent]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if length is None else part)
            sent += len(part)
            if pause:
                self.wfile.flush()
                time.sleep(pause)

    def do_GET(self) -> None:  # noqa: C901 - one branch per hostile behaviour
        st = self.server.state
        parts = urlsplit(self.path)
        path, q = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        with st.lock:
            st.hits[path] += 1
        try:
            if path.startswith("/photo/"):  # a distinct photo per number, optionally slow
                time.sleep(float(q.get("delay", 0)))
                self._send(200, variant(st.base, int(path.rsplit("/", 1)[1].split(".")[0].rsplit("-", 1)[-1])))
            elif path.startswith(("/ok/", "/private/")):
                self._send(200, st.photo)
            elif path == "/noai.jpg":
                self._send(200, st.photo, headers={"X-Robots-Tag": "noai"})
            elif path == "/slow":
                self._stream(1000, b"x", pause=2.0)
            elif path == "/slow-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for ch in b"X-Slow: " + b"y" * 1000:
                    self.wfile.write(bytes([ch]))
                    self.wfile.flush()
                    time.sleep(2.0)
            elif path == "/big":
                self._stream(2 * GIB, b"\x00" * (1 << 20))
            elif path == "/chunked":
                self._stream(None, b"\x00" * (1 << 20))
            elif path == "/announced":
                self._stream(10 * GIB, b"\x00" * (1 << 20))
            elif path == "/bomb.jpg":
                self._send(200, st.jpeg_bomb)
            elif path == "/bomb.png":
                self._send(200, st.png_bomb, ctype="image/png")
            elif path == "/redirect":
                self._send(302, b"", "text/plain", {"Location": q["to"]})
            elif path == "/loop":
                self._send(302, b"", "text/plain", {"Location": "/loop"})
            elif path == "/retry-after":
                key = "retry:" + q.get("id", "")
                with st.lock:
                    first = key not in st.seen_ids
                    st.seen_ids.add(key)
                if first:
                    self._send(int(q.get("code", 429)), b"busy", "text/plain", {"Retry-After": q.get("s", "1")})
                else:
                    self._send(200, st.photo)
            elif path == "/concurrency":
                key = q.get("id", "")
                with st.lock:
                    st.active[key] += 1
                    st.peak[key] = max(st.peak[key], st.active[key])
                try:
                    time.sleep(0.4)
                    self._send(200, st.photo)
                finally:
                    with st.lock:
                        st.active[key] -= 1
            elif path == "/robots.txt":
                self._send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
            elif path == "/stats":
                with st.lock:
                    body = json.dumps({"hits": dict(st.hits), "peak": dict(st.peak)}).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # clients hang up on purpose
        pass


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    srv = Server(("127.0.0.1", port), Handler)
    srv.state = State()
    print(srv.server_address[1], flush=True)
    srv.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
