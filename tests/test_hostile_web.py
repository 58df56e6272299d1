"""The download stage against the hostile web (tests/hostile_server.py plays the servers, on 127.0.0.1).

Each test asserts the reject reason, the accounting (every input row exactly once in data/ or
rejected/) and, where it applies, the wall time or the RSS bound.  No packet leaves 127.0.0.0/8:
names of private or link-local hosts resolve through ``static_hosts`` or a stub resolver, and
the suite's audit hook (conftest ``_loopback_only``) fails any test that tries otherwise.
The input side of the issue (input manifest, undecodable lines, source_row, caption and URL
limits, write errors naming the file) is tested in tests/test_hostile_input.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate
from curate.net.guard import AddressGuard, BlockedAddress, category, numeric_host
from helpers import read_dir

ALLOW = ["127.0.0.1/32"]  # the servers' address; 127.0.0.2 and every other loopback address stay refused


def _run(tmp: Path, urls: list[str], runner: str = "local", **dl) -> tuple[dict[str, dict], float]:
    """Download ``urls`` (uid = index) with the given download parameters; rows by url, and wall seconds."""
    tmp.mkdir(parents=True, exist_ok=True)
    inp = tmp / "in.parquet"
    pq.write_table(pa.table({"uid": [f"u{i:03d}" for i in range(len(urls))], "url": urls,
                             "caption": [f"row {i} of the hostile web" for i in range(len(urls))]}), inp)
    cfg = {"input": {"path": str(inp), "uid_col": "uid", "shard_size": 4}, "output": {"path": str(tmp / "out")},
           "runner": {"kind": runner, "num_cpus": 2},
           "stages": [{"stage": "download", "image_size": 64, "allow_networks": ALLOW, "thread_count": 8, **dl}]}
    t0 = time.monotonic()
    curate.run(cfg)
    wall = time.monotonic() - t0
    rows = read_dir(tmp / "out" / "data").to_pylist() + read_dir(tmp / "out" / "rejected").to_pylist()
    # accounting: every input row exactly once in data/ or rejected/
    assert sorted(r["uid"] for r in rows) == [f"u{i:03d}" for i in range(len(urls))]
    return {r["url"]: r for r in rows}, wall


def _server_stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as r:
        return json.loads(r.read())


def _why(row: dict) -> tuple:
    return row["reject_reason"], row["error_type"]


# -- 1. a deadline per request ------------------------------------------------------------------------
@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_slow_server_ends_at_the_deadline(hostile_server, tmp_path, runner, request):
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    base = hostile_server
    urls = [f"{base}/slow", f"{base}/slow-headers", f"{base}/ok/a.jpg"]
    rows, wall = _run(tmp_path, urls, runner, timeout=3, deadline=4)
    for u in urls[:2]:  # one byte every 2 s never trips the 3 s read timeout: only the deadline ends them
        assert _why(rows[u]) == ("download_failed", "timeout"), rows[u]["reject_detail"]
        assert "deadline of 4 s" in rows[u]["reject_detail"]
    assert rows[urls[2]]["reject_reason"] is None and rows[urls[2]]["image"]
    # without a deadline these rows would take 2000 s; allow the run's start-up (Ray Data's too)
    assert wall < 4 + (60 if runner == "ray" else 15), wall


# -- 2. a size cap, and 3. the pixel limit before decoding: RSS measured in a fresh process -----------
RSS_PROBE = r"""
import json, resource, sys, time
import pyarrow as pa, pyarrow.parquet as pq
import curate
from pathlib import Path

tmp, base, paths = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")

def run(name, urls):
    inp = tmp / f"{name}.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), inp)
    res = curate.run({"input": {"path": str(inp), "shard_size": 8}, "output": {"path": str(tmp / name)},
                      "stages": [{"stage": "download", "image_size": 64, "allow_networks": ["127.0.0.1/32"],
                                  "thread_count": 4}]})
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

base_rss = run("baseline", [f"{base}/ok/{i}.jpg" for i in range(len(paths))])
t0 = time.monotonic()
peak = run("hostile", [base + p for p in paths])
print(json.dumps({"baseline": base_rss, "peak": peak, "seconds": time.monotonic() - t0}))
"""


def _rss_probe(tmp: Path, base: str, paths: list[str]) -> tuple[dict, dict]:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp), base, ",".join(paths)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = read_dir(tmp / "hostile" / "data").to_pylist() + read_dir(tmp / "hostile" / "rejected").to_pylist()
    assert len(rows) == len(paths) and len({r["uid"] for r in rows}) == len(paths)  # accounting
    return probe, {r["url"][len(base):]: r for r in rows}


def test_endless_and_huge_bodies_are_capped(hostile_server, tmp_path):
    probe, rows = _rss_probe(tmp_path, hostile_server, ["/big", "/announced", "/chunked"])
    assert _why(rows["/announced"]) == ("response_too_large", "content_length")  # refused from the header
    assert _why(rows["/big"]) == ("response_too_large", "content_length")  # 2 GiB announced too
    assert _why(rows["/chunked"]) == ("response_too_large", "streamed")  # no length: cut while streaming
    growth = probe["peak"] - probe["baseline"]
    assert growth < 100 * 2**20, f"RSS grew {growth / 2**20:.0f} MB"


def test_decompression_bombs_rejected_before_decoding(hostile_server, tmp_path):
    probe, rows = _rss_probe(tmp_path, hostile_server, ["/bomb.jpg", "/bomb.png"])
    for p in ("/bomb.jpg", "/bomb.png"):
        assert rows[p]["reject_reason"] == "image_too_large", rows[p]
        assert rows[p]["image"] is None
    growth = probe["peak"] - probe["baseline"]
    assert growth < 200 * 2**20, f"RSS grew {growth / 2**20:.0f} MB"  # decoding one would take 900 MB-2.7 GB


def test_pixel_limit_is_a_parameter(hostile_server, tmp_path):
    rows, _ = _run(tmp_path, [f"{hostile_server}/ok/a.jpg"], max_image_pixels=128 * 127)  # the photo is 128x128
    row = rows[f"{hostile_server}/ok/a.jpg"]
    assert row["reject_reason"] == "image_too_large" and "128x128 = 16,384 pixels" in row["reject_detail"]


@pytest.mark.ray
def test_bombs_and_big_bodies_on_ray(hostile_server, tmp_path, ray_cluster):
    base = hostile_server
    rows, _ = _run(tmp_path, [f"{base}/bomb.jpg", f"{base}/bomb.png", f"{base}/chunked", f"{base}/ok/b.jpg"], "ray")
    assert rows[f"{base}/bomb.jpg"]["reject_reason"] == "image_too_large"
    assert rows[f"{base}/bomb.png"]["reject_reason"] == "image_too_large"
    assert _why(rows[f"{base}/chunked"]) == ("response_too_large", "streamed")
    assert rows[f"{base}/ok/b.jpg"]["reject_reason"] is None


# -- 4. the address guard -------------------------------------------------------------------------------
def test_guard_classifies_every_spelling_without_a_lookup(netlog):
    calls = []

    def stub(host: str) -> list[str]:
        calls.append(host)
        return {"intranet.corp": ["10.1.2.3"], "metadata.cloud": ["169.254.169.254"],
                "mixed.example": ["93.184.216.34", "192.168.1.1"], "dual.example": ["10.0.0.1", "fd00::1"]}[host]

    guard = AddressGuard(resolver=stub)
    for host, cat in [("127.1", "loopback"), ("0x7f000001", "loopback"),
                      ("2130706433", "loopback"), ("017700000001", "loopback"), ("0.0.0.0", "unspecified"),
                      ("[::1]", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
                      ("2002:a00:1::", "private"), ("64:ff9b::a9fe:a9fe", "link_local"), ("100.64.0.1", "cgnat"),
                      ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
                      ("fe80::1", "link_local"), ("fd12::1", "private"), ("192.0.2.1", "private")]:
        with pytest.raises(BlockedAddress) as e:
            guard.addresses(host)
        assert e.value.category == cat, (host, e.value)
    assert calls == []  # numeric hosts never reach a resolver
    assert category(numeric_host("8.8.8.8")) is None and category(numeric_host("2606:4700::1111")) is None
    with pytest.raises(BlockedAddress, match="10.1.2.3"):
        guard.addresses("intranet.corp")
    with pytest.raises(BlockedAddress, match="link_local|169.254"):
        guard.addresses("metadata.cloud")
    with pytest.raises(BlockedAddress):
        guard.addresses("dual.example")
    assert guard.addresses("mixed.example") == ["93.184.216.34"]  # only the checked public address is used
    assert AddressGuard(["10.0.0.0/8"], resolver=stub).addresses("intranet.corp") == ["10.1.2.3"]
    # names came from the stub, numeric hosts were parsed: not one lookup or connect was attempted
    assert not [x for x in netlog.lines() if "socket.connect" in x or "socket.getaddrinfo" in x]


def test_connects_to_the_address_it_checked(hostile_server, netlog):
    """DNS rebinding: the stub answers 127.0.0.1 (allowed) once, then 127.0.0.2; one lookup per hop."""
    from curate.net.http import Fetcher

    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    calls = []

    def rebinding(host: str) -> list[str]:
        calls.append(host)
        return next(answers)

    port = hostile_server.rsplit(":", 1)[1]
    f = Fetcher(AddressGuard(ALLOW, resolver=rebinding), timeout=3, deadline=10)
    r = f.get(f"http://rebind.test:{port}/ok/c.jpg")
    assert r.ok and r.body[:2] == b"\xff\xd8" and calls == ["rebind.test"]
    r = f.get(f"http://rebind.test:{port}/ok/c.jpg")  # now the name points at 127.0.0.2: refused, not fetched
    assert r.reason == "blocked_address"
    f.close()
    connects = {x.split()[2] for x in netlog.lines() if "socket.connect" in x}
    assert connects == {"127.0.0.1"} and not netlog.blocked(), connects  # 127.0.0.2 was never contacted


def test_internal_targets_refused_in_every_spelling(hostile_server, tmp_path, netlog):
    """Default guard: the server's own address in every spelling, and names of private hosts: no connect at all."""
    port = hostile_server.rsplit(":", 1)[1]
    internal = [f"http://{h}:{port}/ok/x.jpg" for h in
                ("localhost", "[::1]", "0.0.0.0", "127.1", "0x7f000001", "2130706433", "017700000001",
                 "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "intranet.corp", "metadata.cloud", "cgnat.isp", "v6.ula",
                 "mapped.v6")]
    internal.append("http://2130706433/")  # default port
    static = {"intranet.corp": ["10.20.30.40"], "metadata.cloud": ["169.254.169.254"], "cgnat.isp": ["100.100.1.1"],
              "v6.ula": ["fd00::1"], "mapped.v6": ["::ffff:192.168.0.1"]}
    rows, _ = _run(tmp_path, internal, static_hosts=static, allow_networks=[])
    for u in internal:
        assert rows[u]["reject_reason"] == "blocked_address", (u, rows[u]["reject_detail"])
    cats = {u.split("//")[1].split(":")[0].split("/")[0]: rows[u]["error_type"] for u in internal}
    assert cats["metadata.cloud"] == "blocked_link_local" and cats["intranet.corp"] == "blocked_private"
    assert cats["cgnat.isp"] == "blocked_cgnat" and cats["0.0.0.0"] == "blocked_unspecified"
    assert cats["mapped.v6"] == "blocked_private" and cats["127.1"] == "blocked_loopback"
    assert not [x for x in netlog.lines() if "socket.connect" in x]  # refused before any connect
    assert not netlog.blocked()


def test_redirects_to_internal_targets_refused(hostile_server, tmp_path, netlog):
    """Only 127.0.0.1/32 allowed: every hop is checked, so a redirect to another internal address is refused."""
    base = hostile_server
    port = base.rsplit(":", 1)[1]
    redirects = [f"{base}/redirect?to=http://127.0.0.2:{port}/ok/r.jpg",
                 f"{base}/redirect?to=http://0x7f000002:{port}/ok/r.jpg",
                 f"{base}/redirect?to=http://metadata.cloud/latest/meta-data/",
                 f"{base}/redirect?to=http://[::1]:{port}/ok/r.jpg",
                 f"{base}/redirect?to={base}/redirect?to=http://intranet.corp:{port}/"]
    ok = [f"{base}/ok/y.jpg", f"{base}/redirect?to=/ok/z.jpg"]
    static = {"intranet.corp": ["10.20.30.40"], "metadata.cloud": ["169.254.169.254"]}
    rows, _ = _run(tmp_path, redirects + ok, static_hosts=static)
    for u in redirects:
        assert rows[u]["reject_reason"] == "blocked_address", (u, rows[u]["reject_detail"])
    for u in ok:
        assert rows[u]["reject_reason"] is None, rows[u]["reject_detail"]
    connects = {x.split()[2] for x in netlog.lines() if "socket.connect" in x}
    assert connects == {"127.0.0.1"}, connects  # nothing else was even tried
    assert not netlog.blocked()


def test_redirect_rules(hostile_server, tmp_path):
    base = hostile_server
    urls = [f"{base}/loop", f"{base}/redirect?to=ftp://example.org/a.jpg", f"{base}/redirect?to=file:///etc/passwd",
            f"{base}/redirect?to={base}/redirect?to=/ok/chain.jpg"]
    rows, _ = _run(tmp_path, urls, max_redirects=3)
    assert _why(rows[urls[0]]) == ("download_failed", "too_many_redirects")
    assert _why(rows[urls[1]]) == ("download_failed", "bad_redirect")
    assert _why(rows[urls[2]]) == ("download_failed", "bad_redirect")
    assert rows[urls[3]]["reject_reason"] is None  # two hops, within max_redirects
    rows, _ = _run(tmp_path / "zero", urls[3:], max_redirects=1)
    assert _why(rows[urls[3]]) == ("download_failed", "too_many_redirects")


# -- 5. politeness ----------------------------------------------------------------------------------------
def test_at_most_max_per_host_requests_in_flight(hostile_server, tmp_path):
    urls = [f"{hostile_server}/concurrency?id=cap2&n={i}" for i in range(12)]
    rows, _ = _run(tmp_path, urls, max_per_host=2, thread_count=8)
    assert all(r["reject_reason"] is None for r in rows.values())
    assert _server_stats(hostile_server)["peak"]["cap2"] == 2


def test_retry_after_honoured_within_the_deadline(hostile_server, tmp_path):
    base = hostile_server
    soon, late, unavailable = (f"{base}/retry-after?id=soon&s=1", f"{base}/retry-after?id=late&s=3600",
                               f"{base}/retry-after?id=unavail&s=1&code=503")
    rows, wall = _run(tmp_path, [soon, late, unavailable], deadline=10)
    assert rows[soon]["reject_reason"] is None and rows[unavailable]["reject_reason"] is None
    assert _why(rows[late]) == ("download_failed", "http_429")
    assert "Retry-After 3600 s is past" in rows[late]["reject_detail"]
    hits = _server_stats(base)["hits"]["/retry-after"]
    assert hits == 5  # soon and unavailable twice (429/503, then the photo), late once


def test_robots_txt_and_x_robots_tag(hostile_server, tmp_path):
    base = hostile_server
    before = _server_stats(base)["hits"]
    urls = [f"{base}/private/a.jpg", f"{base}/private/b.jpg", f"{base}/ok/r1.jpg", f"{base}/ok/r2.jpg",
            f"{base}/noai.jpg"]
    rows, _ = _run(tmp_path, urls, respect_robots_txt=True)
    for u in urls[:2]:
        assert _why(rows[u]) == ("opted_out", "robots_txt")
    assert rows[urls[2]]["reject_reason"] is None and rows[urls[3]]["reject_reason"] is None
    assert _why(rows[urls[4]]) == ("opted_out", "x_robots_tag")
    after = _server_stats(base)["hits"]
    assert after.get("/private/a.jpg", 0) == before.get("/private/a.jpg", 0) == 0  # never requested
    assert after["/robots.txt"] - before.get("/robots.txt", 0) == 1  # fetched once, cached for the host
