"""The download stage against real server software: nginx (Debian's package) and an HTTP/1.0 origin.

A property that depends on how servers behave is proven here against the real thing, not only
against tests/hostile_server.py (which speaks HTTP/1.1 and never answers ``Connection: close``).
The session fixture ``real_web`` (conftest) runs one nginx with http and https servers on 127.0.0.1
and one Python ``BaseHTTPRequestHandler`` origin at its default protocol version, HTTP/1.0.
Every row is accounted for (exactly once in data/ or rejected/) by ``_run``; the suite's audit hook
fails a test that tries to reach anything outside 127.0.0.0/8.
"""

from __future__ import annotations

import os
import time

import pytest

from curate.net.guard import AddressGuard
from curate.net.http import Fetcher
from test_hostile_web import ALLOW, _run, _why

DEADLINE = 5
HOSTS = {"curate.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}  # https names, resolved without DNS


def _https(site, host: str, path: str) -> str:
    return f"https://{host}:{site.https_port}{path}"


def _assert_cut(row: dict) -> None:
    assert _why(row) == ("download_failed", "timeout"), (row["url"], row["reject_reason"], row["reject_detail"])
    assert f"deadline of {DEADLINE} s exceeded" in row["reject_detail"], row["reject_detail"]


# -- the deadline holds on every connection, whatever the server answers --------------------------------
@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.ray)])
@pytest.mark.parametrize("connection", ["close", "keep-alive"])
def test_trickled_answers_end_at_the_deadline(real_web, tmp_path, runner, connection, request):
    """nginx trickling a body (answering ``Connection: close`` or keep-alive) or headers, an HTTP/1.0 origin
    trickling its body directly and behind nginx as a reverse proxy, and a trickled HTTPS body."""
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    site, origin = real_web, real_web.origin
    slow = [f"{site.base}/slow/a.jpg", f"{site.base}/slow-headers/b.jpg", f"{origin.base}/trickle.jpg",
            f"{site.base}/origin/trickle.jpg", _https(site, "curate.test", "/slow/c.jpg")]
    fine = [f"{site.base}/photos/d.jpg", f"{origin.base}/photo.jpg", _https(site, "curate.test", "/photos/a.jpg")]
    rows, wall = _run(tmp_path, slow + fine, runner, timeout=3, deadline=DEADLINE, static_hosts=HOSTS,
                      ca_bundle=str(site.ca), request_headers={"Connection": connection})
    for u in slow:  # a byte a second (or two a second) never trips the 3 s read timeout: only the deadline ends them
        _assert_cut(rows[u])
    for u in fine:
        assert rows[u]["reject_reason"] is None and rows[u]["image"][:2] == b"\xff\xd8", rows[u]["reject_detail"]
    # before the fix, nginx's answer to `Connection: close` kept this run going for ~10,000 s (64 KiB at 1 B/s)
    assert wall < DEADLINE + (60 if runner == "ray" else 15), wall


def test_fetcher_returns_within_the_deadline_for_each_server_kind(real_web):
    """One request at a time through the client itself: each ends within the deadline plus a small margin."""
    site, origin = real_web, real_web.origin
    f = Fetcher(AddressGuard(ALLOW), timeout=3, deadline=2)
    try:
        for url in (f"{site.base}/slow/a.jpg", f"{origin.base}/trickle.jpg", f"{site.base}/origin/trickle.jpg"):
            t0 = time.monotonic()
            r = f.get(url)
            took = time.monotonic() - t0
            assert (r.reason, r.error_type) == ("download_failed", "timeout"), (url, r.detail)
            assert took < 2 + 1.0, (url, took)
    finally:
        f.close()


def test_body_reads_return_as_bytes_arrive(real_web):
    """nginx sends headers and body up to 2 KB at once, then a byte a second: the client counts those bytes as
    they come (a read of a full 64 KiB buffer would still be waiting for them when the deadline cuts it)."""
    import re

    f = Fetcher(AddressGuard(ALLOW), timeout=3, deadline=3)
    try:
        r = f.get(f"{real_web.base}/slow/a.jpg")
    finally:
        f.close()
    assert r.error_type == "timeout", r.detail
    got = int(re.search(r"([\d,]+) bytes read", r.detail).group(1).replace(",", ""))
    assert 1_700 <= got <= 2_100, r.detail  # the burst's body part (~1.8 KB) and a byte or two more


# -- what real servers answer: redirects, errors, Retry-After, size, opt-outs ----------------------------
def test_nginx_answers(real_web, tmp_path, netlog):
    site, base = real_web, real_web.base
    urls = {
        "r301": f"{base}/r301", "r302": f"{base}/r302", "blocked": f"{base}/r302-blocked",
        "403": f"{base}/s403", "404": f"{base}/photos/missing.jpg", "500": f"{base}/s500",
        "429": f"{base}/s429?t=nginx-answers", "503": f"{base}/s503",
        "big": f"{base}/photos/big.jpg", "chunked": f"{base}/origin/endless",
        "noai": f"{base}/noai/a.jpg", "private": f"{base}/private/b.jpg", "ok": f"{base}/photos/c.jpg",
    }
    robots_before = site.requests("/robots.txt")
    rows, _ = _run(tmp_path, list(urls.values()), deadline=10, max_bytes=1 << 20, respect_robots_txt=True)
    r = {k: rows[u] for k, u in urls.items()}
    for k in ("r301", "r302", "ok"):
        assert r[k]["reject_reason"] is None and r[k]["image"], (k, r[k]["reject_detail"])
    assert _why(r["blocked"]) == ("blocked_address", "blocked_loopback"), r["blocked"]["reject_detail"]
    for code in ("403", "404", "500"):
        assert _why(r[code]) == ("download_failed", f"http_{code}"), r[code]["reject_detail"]
    assert _why(r["429"]) == ("download_failed", "http_429")
    assert site.requests("/s429?t=nginx-answers") == 2  # Retry-After: 1 fits in the deadline: asked once more
    assert _why(r["503"]) == ("download_failed", "http_503")
    assert "Retry-After 3600 s is past" in r["503"]["reject_detail"]
    assert _why(r["big"]) == ("response_too_large", "content_length")
    assert _why(r["chunked"]) == ("response_too_large", "streamed")
    assert _why(r["noai"]) == ("opted_out", "x_robots_tag")
    assert _why(r["private"]) == ("opted_out", "robots_txt")
    assert site.requests("/private/b.jpg") == 0  # never asked for
    assert site.requests("/robots.txt") - robots_before == 1  # fetched once for the host, cached
    connects = {x.split()[2] for x in netlog.lines() if "socket.connect" in x}
    assert "127.0.0.2" not in connects  # the redirect to a refused address was never dialled


# -- retrying failed downloads (#27) against nginx ----------------------------------------------------
def test_retry_failed_refetches_exactly_what_nginx_refused(real_web, tmp_path):
    """nginx answers 503 (Retry-After far past the deadline) under /flaky/ while a flag file exists. After the
    flag is removed, ``retry_failed`` asks nginx again for exactly those URLs -- its access log says so --
    and the output equals a fresh run against the healed server; the 403 and 404 rows are never asked again."""
    import curate
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import read_dir, rows_by_uid

    site, base = real_web, real_web.base
    flaky = [f"/flaky/{n}.jpg?t=retry-{i}" for i, n in enumerate("abcdab")]
    steady = ["/photos/c.jpg?t=retry", "/s403?t=retry", "/photos/missing.jpg?t=retry", "/photos/d.jpg?t=retry"]
    targets = flaky + steady
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"uid": [f"u{i:02d}" for i in range(len(targets))], "url": [base + t for t in targets],
                             "caption": [f"row {i} of a flaky site" for i in range(len(targets))]}), inp)

    def cfg(out):
        return {"input": {"path": str(inp), "uid_col": "uid", "shard_size": 4}, "output": {"path": str(out)},
                "runner": {"kind": "local"},
                "stages": [{"stage": "download", "image_size": 64, "allow_networks": ALLOW, "deadline": 10},
                           {"stage": "image_size", "min_side": 32}]}

    flag = site.site / "down"
    flag.write_text("")
    try:
        curate.run(cfg(tmp_path / "out"))
    finally:
        flag.unlink()
    first = {r["url"]: r for r in read_dir(tmp_path / "out" / "rejected").to_pylist()}
    for t in flaky:
        assert _why(first[base + t]) == ("download_failed", "http_503"), first[base + t]["reject_detail"]
    assert _why(first[base + "/s403?t=retry"]) == ("download_failed", "http_403")

    asked = {t: site.requests(t) for t in targets}
    assert all(asked[t] == 1 for t in targets), asked
    curate.run(cfg(tmp_path / "out"), retry_failed=[])
    again = {t: site.requests(t) - asked[t] for t in targets}
    assert again == {t: int(t in flaky) for t in targets}, again

    curate.run(cfg(tmp_path / "fresh"))
    for sub in ("data", "rejected"):
        x, y = rows_by_uid(read_dir(tmp_path / "out" / sub)), rows_by_uid(read_dir(tmp_path / "fresh" / sub))
        assert x == y, sub
    kept = {r["url"] for r in read_dir(tmp_path / "out" / "data").to_pylist()}
    assert {base + t for t in flaky} <= kept


# -- HTTPS ---------------------------------------------------------------------------------------------
def test_https_trusts_only_what_it_is_told(real_web, tmp_path, monkeypatch):
    site = real_web
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    good, wrong_name = _https(site, "curate.test", "/photos/b.jpg"), _https(site, "other.test", "/photos/b.jpg")
    rows, _ = _run(tmp_path / "untrusted", [good], static_hosts=HOSTS)  # certifi's CAs do not know the test CA
    assert _why(rows[good]) == ("download_failed", "ssl_error") and "CERTIFICATE_VERIFY_FAILED" in \
        rows[good]["reject_detail"], rows[good]["reject_detail"]
    rows, _ = _run(tmp_path / "bundle", [good, wrong_name], static_hosts=HOSTS, ca_bundle=str(site.ca))
    assert rows[good]["reject_reason"] is None and rows[good]["image"], rows[good]["reject_detail"]
    # SNI other.test: nginx answers with its curate.test certificate, which names another host
    assert _why(rows[wrong_name]) == ("download_failed", "ssl_error"), rows[wrong_name]["reject_detail"]
    assert "other.test" in rows[wrong_name]["reject_detail"] or "match" in rows[wrong_name]["reject_detail"]
    monkeypatch.setenv("SSL_CERT_FILE", str(site.ca))  # OpenSSL's convention, when no ca_bundle is given
    rows, _ = _run(tmp_path / "env", [good], static_hosts=HOSTS)
    assert rows[good]["reject_reason"] is None, rows[good]["reject_detail"]


def test_ca_bundle_errors_are_one_line(tmp_path):
    import curate
    from curate.config import ConfigError

    cfg = {"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out")},
           "stages": [{"stage": "download", "ca_bundle": str(tmp_path / "missing.pem")}]}
    with pytest.raises(ConfigError, match="missing.pem.*is not a file"):
        curate.run(cfg)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    from curate.net.http import tls_context

    with pytest.raises(ValueError, match=f"cannot load CA certificates from {bad}"):
        tls_context(str(bad))


def test_request_headers_replace_ours_whatever_their_case():
    """A user's header replaces curate's of the same name in any case: nothing is sent twice."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got: list[bytes] = []

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            got.append(data)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    f = Fetcher(AddressGuard(ALLOW), timeout=3, deadline=5, headers={"connection": "keep-alive", "Referer": "x"})
    try:
        r = f.get(f"http://127.0.0.1:{srv.getsockname()[1]}/a.jpg")
    finally:
        f.close()
        srv.close()
    t.join(5)
    assert r.error_type == "http_404"
    lines = [x.lower() for x in got[0].decode().split("\r\n")]
    assert [x for x in lines if x.startswith("connection:")] == ["connection: keep-alive"]
    assert "referer: x" in lines and sum(x.startswith("host:") for x in lines) == 1


def test_resize_threads_change_only_the_speed(real_web, tmp_path, monkeypatch):
    """Several resize threads give the very rows one thread gives (the photos decoded and resized in parallel,
    failures in their places), use at most ``resize_threads`` threads at once, and leave the fingerprint alone."""
    import threading

    from curate.config import work_params
    from curate.stages.download import Download, DownloadParams

    busy, peak, lock = [0], [0], threading.Lock()
    real = Download._image

    def counted(self, body):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        try:
            time.sleep(0.02)  # long enough for the threads to overlap
            return real(self, body)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(Download, "_image", counted)
    urls = [f"{real_web.base}/photos/{n}.jpg" for n in "abcd"] * 3 + [f"{real_web.base}/missing.jpg",
                                                                      f"{real_web.base}/s500"]
    urls = [f"{u}?{i}" for i, u in enumerate(urls)]  # distinct urls, rows keyed by url
    fds = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
    one, _ = _run(tmp_path / "one", urls, resize_threads=1)
    assert peak[0] == 1
    peak[0] = 0
    three, _ = _run(tmp_path / "three", urls, resize_threads=3)
    assert 1 < peak[0] <= 3
    # img2dataset's Resizer points fds 1 and 2 at /dev/null around each image: racy across threads (stdout
    # was left on /dev/null); curate's copy of the resizer leaves them alone
    assert {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)} == fds
    assert one.keys() == three.keys()
    for u in urls:
        a, b = one[u], three[u]
        assert {k: a[k] for k in a if k != "source_file"} == {k: b[k] for k in b if k != "source_file"}, u
    assert sum(r["reject_reason"] is None for r in one.values()) == 12
    assert work_params(DownloadParams(resize_threads=3, thread_count=5)) == work_params(DownloadParams())


# -- the fixture itself: two servers never share a port -------------------------------------------------
def test_free_ports_are_distinct_and_a_taken_port_is_chosen_again(tmp_path, monkeypatch):
    """CI once got one port for both of NginxSite's servers (the kernel hands a just-closed ephemeral port
    out again): nginx merged them into one ``ssl`` socket and refused to start. Ports one process is given
    are distinct, and a port some other process binds before nginx does is replaced, not fatal."""
    import socket

    import realweb
    from curate.demo.nginx import free_port, nginx_binary

    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light)")
    with socket.socket() as squatter:  # another process's listener on the port free_port hands out first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed = iter([taken, free_port()])
        monkeypatch.setattr(realweb, "free_port", lambda: next(handed, None) or free_port())
        origin = realweb.Http10Origin(tmp_path / "origin")
        try:
            site = realweb.NginxSite(tmp_path / "nginx", origin)
            try:
                assert taken not in (site.http_port, site.https_port)
                assert site.http_port != site.https_port
            finally:
                site.stop()
        finally:
            origin.stop()
