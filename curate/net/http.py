"""A guarded HTTP GET for hostile servers, on urllib3's connection classes.

Every request is bounded: a deadline for the whole of it (connect, redirects, Retry-After
waits and body), a per-read timeout, ``max_bytes`` checked against ``Content-Length`` and
while streaming, at most ``max_redirects`` hops (http/https only), every hop's address
checked by the :class:`~curate.net.guard.AddressGuard` and connected to directly (the
``Host`` header and TLS server name carry the host name), and at most ``max_per_host``
requests in flight to one host.  Failures come back as a :class:`Response` with a reject
reason and an error type, never as an exception.

The deadline holds whatever the server answers: the :class:`~curate.net.limits.Reaper` holds each
socket from the moment it is connected (``_new_conn`` below), and the body is read with ``read1``,
which returns as bytes arrive, so the size cap and the deadline are checked as the body streams.
HTTPS trusts ``ca_bundle`` when given, else ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (OpenSSL's
convention), else certifi's bundle; the host name is sent as SNI and checked against the certificate.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from curate.net.guard import AddressGuard, BlockedAddress, ResolveError
from curate.net.limits import HostLimiter, Reaper

log = logging.getLogger(__name__)
# urllib3 logs a traceback for every malformed response header; the row's reject_detail says enough
logging.getLogger("urllib3.connection").setLevel(logging.ERROR)

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 1 << 16


@dataclass
class Response:
    url: str  # the last URL requested (after redirects)
    status: int | None = None
    headers: Any = None  # urllib3 HTTPHeaderDict (case-insensitive)
    body: bytes | None = None
    reason: str | None = None  # reject reason when the fetch failed
    error_type: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None and self.body is not None


def _fail(url: str, reason: str, error_type: str | None, detail: str, status: int | None = None,
          headers: Any = None) -> Response:
    return Response(url, status, headers, None, reason, error_type, detail)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Fetcher:
    """Thread-safe: one per worker, shared by its download threads."""

    def __init__(self, guard: AddressGuard, *, timeout: float = 10.0, deadline: float = 30.0,
                 max_bytes: int = 32 << 20, max_redirects: int = 5, max_per_host: int = 16, retries: int = 0,
                 user_agent: str = "curate", robots: Any = None,
                 veto: Callable[[Any], tuple[str, str, str] | None] | None = None,
                 ca_bundle: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.guard = guard
        self.timeout, self.deadline, self.max_bytes = timeout, deadline, max_bytes
        self.max_redirects, self.retries, self.user_agent = max_redirects, retries, user_agent
        self.hosts = HostLimiter(max_per_host)
        self.reaper = Reaper()
        self.robots = robots  # RobotsCache or None
        self.veto = veto  # headers -> (reason, error_type, detail) to refuse a response before its body
        self.ca_bundle = ca_bundle
        self.headers = headers or {}  # request headers that replace or add to the defaults
        self._tls: ssl.SSLContext | None = None

    def close(self) -> None:
        self.reaper.close()
        self.guard.close()

    def get(self, url: str, deadline_at: float | None = None, max_bytes: int | None = None,
            check_robots: bool = True) -> Response:
        """GET ``url``: follow redirects, honour Retry-After for 429/503, retry transient errors."""
        deadline_at = deadline_at if deadline_at is not None else time.monotonic() + self.deadline
        attempt = 0
        while True:
            r = self._follow(url, deadline_at, max_bytes or self.max_bytes, check_robots)
            left = deadline_at - time.monotonic()
            wait = None
            if r.status in (429, 503) and attempt < max(self.retries, 1):
                wait = retry_after(r.headers.get("Retry-After") if r.headers is not None else None)
                if wait is not None and wait >= left:
                    r.detail = f"{r.detail}; Retry-After {wait:g} s is past the {self.deadline:g} s deadline"
                    wait = None
            elif attempt < self.retries and (r.error_type in ("connection_error", "connection_refused", "timeout")
                                              or (r.status or 0) >= 500):
                wait = min(0.5 * 2 ** attempt, max(left - 0.1, 0))
            if wait is None or left <= 0:
                return r
            time.sleep(wait)
            attempt += 1

    def _follow(self, url: str, deadline_at: float, max_bytes: int, check_robots: bool) -> Response:
        for hop in range(self.max_redirects + 1):
            try:
                parts = urlsplit(url)
                host, port = parts.hostname, parts.port
            except ValueError as e:
                return _fail(url, "download_failed", "bad_redirect" if hop else "malformed_url", f"bad url: {e}")
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not host:
                return _fail(url, "download_failed", "bad_redirect" if hop else "unsupported_scheme",
                             f"{'redirect to ' if hop else ''}{url[:200]!r}: only http(s) URLs with a host are fetched")
            try:
                addresses = self.guard.addresses(host)
            except BlockedAddress as e:  # before robots.txt: nothing at all is asked of a refused address
                return _fail(url, "blocked_address", f"blocked_{e.category}", str(e))
            except ResolveError as e:
                return _fail(url, "download_failed", "timeout" if e.timeout else "dns_error", str(e))
            if check_robots and self.robots is not None and not self.robots.allowed(self, url, deadline_at):
                return _fail(url, "opted_out", "robots_txt", f"robots.txt of {host} disallows {parts.path or '/'}")
            try:
                with self.hosts.slot(host, deadline_at):
                    r = self._request(url, parts, host, port, addresses, deadline_at, max_bytes)
            except TimeoutError as e:
                return _fail(url, "download_failed", "timeout", str(e))
            if r.status in REDIRECTS and r.reason is None:
                location = r.headers.get("Location") if r.headers is not None else None
                if not location:
                    return _fail(url, "download_failed", f"http_{r.status}", "redirect without Location", r.status)
                url = urljoin(url, location.strip())
                continue
            return r
        return _fail(url, "download_failed", "too_many_redirects", f"more than {self.max_redirects} redirects")

    def tls_context(self) -> ssl.SSLContext:
        """The one TLS context of this fetcher (made on first use; :func:`tls_context` says what it trusts)."""
        if self._tls is None:
            self._tls = tls_context(self.ca_bundle)
        return self._tls

    def _request(self, url: str, parts: Any, host: str, port: int | None, addresses: list[str],
                 deadline_at: float, max_bytes: int) -> Response:
        https = parts.scheme.lower() == "https"
        port = port or (443 if https else 80)
        try:
            host_idna = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError as e:
            return _fail(url, "download_failed", "malformed_url", f"bad host name: {e}")
        default_port = port == (443 if https else 80)
        host_header = (f"[{host_idna}]" if ":" in host_idna else host_idna) + ("" if default_port else f":{port}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Host": host_header, "User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8",
                   "Accept-Encoding": "identity", "Connection": "close"}
        if self.headers:  # the user's replace ours whatever their case (no header is sent twice)
            given = {k.lower() for k in self.headers}
            headers = {**{k: v for k, v in headers.items() if k.lower() not in given}, **self.headers}
        last: Response | None = None
        for ip in addresses:
            left = deadline_at - time.monotonic()
            if left <= 0:
                break
            timeout = min(self.timeout, left)
            watch = self.reaper.watch(deadline_at)
            plain, secure = _connection_classes()
            if https:
                conn = secure(ip, port, timeout=timeout, server_hostname=host_idna,
                              assert_hostname=host_idna, ssl_context=self.tls_context())
            else:
                conn = plain(ip, port, timeout=timeout)
            conn.curate_watch = watch
            try:
                return self._exchange(conn, url, target, headers, max_bytes, watch)
            except _Retryable as e:  # connect failed: try the host's next address
                last = e.response
            finally:
                watch.cancel()
                conn.close()
        return last or _fail(url, "download_failed", "timeout", f"deadline of {self.deadline:g} s exceeded")

    def _exchange(self, conn: Any, url: str, target: str, headers: dict, max_bytes: int, watch: Any) -> Response:
        from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError
        from urllib3.exceptions import SSLError as Urllib3SSLError
        from urllib3.util.ssl_match_hostname import CertificateError as Urllib3CertificateError

        got = 0
        try:
            try:
                conn.connect()
            except NewConnectionError as e:  # (a subclass of ConnectTimeoutError in urllib3 2)
                refused = isinstance(e.__cause__, ConnectionRefusedError) or "refused" in str(e).lower()
                raise _Retryable(self._err(url, watch, "connection_refused" if refused else "connection_error",
                                           f"connect: {e}")) from None
            except ConnectTimeoutError as e:
                raise _Retryable(self._err(url, watch, "timeout", f"connect: {e}")) from None
            conn.request("GET", target, headers=headers, preload_content=False, decode_content=True)
            resp = conn.getresponse()
            status, hdrs = resp.status, resp.headers
            if status in REDIRECTS:
                return Response(url, status, hdrs)
            if not 200 <= status < 300 or status in (204, 206):
                return _fail(url, "download_failed", f"http_{status}", f"HTTP Error {status}: {resp.reason}",
                             status, hdrs)
            refused = self.veto(hdrs) if self.veto is not None else None
            if refused is not None:
                return _fail(url, *refused, status=status, headers=hdrs)
            length = hdrs.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                return _fail(url, "response_too_large", "content_length",
                             f"Content-Length {int(length):,} bytes > max_bytes {max_bytes:,}", status, hdrs)
            chunks = []
            while True:
                chunk = resp.read1(CHUNK)  # whatever has arrived (up to CHUNK), not a full CHUNK
                if watch.expired:
                    raise TimeoutError("deadline")
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    return _fail(url, "response_too_large", "streamed",
                                 f"body larger than max_bytes {max_bytes:,} (stopped reading)", status, hdrs)
                chunks.append(chunk)
            return Response(url, status, hdrs, b"".join(chunks))
        except _Retryable:
            raise
        except (ReadTimeoutError, TimeoutError) as e:
            return self._err(url, watch, "read_timeout", f"no data for {self.timeout:g} s ({e})", got)
        except (ssl.SSLError, ssl.CertificateError, Urllib3SSLError, Urllib3CertificateError) as e:
            return self._err(url, watch, "ssl_error", f"TLS: {e}", got)
        except ConnectionRefusedError as e:
            return self._err(url, watch, "connection_refused", str(e), got)
        except (ProtocolError, http.client.HTTPException, OSError) as e:
            return self._err(url, watch, "connection_error", f"{type(e).__name__}: {e}", got)
        except Exception as e:  # noqa: BLE001 - a hostile server must never crash a worker
            return self._err(url, watch, "other", f"{type(e).__name__}: {e}", got)

    def _err(self, url: str, watch: Any, error_type: str, detail: str, got: int = 0) -> Response:
        if watch.expired:
            return _fail(url, "download_failed", "timeout",
                         f"deadline of {self.deadline:g} s exceeded (connect + redirects + body; {got:,} bytes read)")
        if error_type == "read_timeout":
            return _fail(url, "download_failed", "timeout", detail)
        return _fail(url, "download_failed", error_type, detail[:300])


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying TLS context: ``ca_bundle`` if given, else ``SSL_CERT_FILE``/``SSL_CERT_DIR``, else certifi.

    Raises ``ValueError`` with one line naming the file when the bundle cannot be loaded.
    """
    cafile, capath = ca_bundle, None
    if cafile is None:
        cafile, capath = os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None
        if cafile is None and capath is None:
            import certifi

            cafile = certifi.where()
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as e:
        where = cafile if ca_bundle is not None else f"SSL_CERT_FILE={cafile} SSL_CERT_DIR={capath}"
        raise ValueError(f"cannot load CA certificates from {where}: {e}") from None


@functools.cache
def _connection_classes() -> tuple[type, type]:
    """urllib3's connection classes whose new socket is handed to the request's reaper watch at once."""
    from urllib3.connection import HTTPConnection, HTTPSConnection

    class _Adopt:
        curate_watch: Any = None

        def _new_conn(self) -> Any:
            sock = super()._new_conn()  # type: ignore[misc]
            if self.curate_watch is not None:
                self.curate_watch.adopt(sock)
            return sock

    class Plain(_Adopt, HTTPConnection):
        pass

    class Secure(_Adopt, HTTPSConnection):
        pass

    return Plain, Secure


class _Retryable(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.detail)
        self.response = response
