"""The offline demo corpus (curate.demo.corpus) and its HTTP server (curate.demo.server)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from curate.demo.corpus import PHOTOS, build_site, read_manifest, write_input
from curate.demo.server import DemoServer

N = 120
ALL_KINDS = {"original", "mismatched_caption", "exact_duplicate", "near_duplicate", "http_404", "corrupt",
             "not_image", "noai", "slow", "missing_url", "unsupported_scheme", "malformed_url",
             "missing_caption", "duplicate_row"}
FIELDS = ["row", "kind", "path", "caption", "photo", "duplicate_of", "transform", "width", "height", "format"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("demo_site")
    build_site(site_dir, n_rows=N, seed=0)
    return site_dir


@pytest.fixture(scope="module")
def server(site):
    with DemoServer(site, slow_seconds=0.5) as srv:
        yield srv


def _digest(site_dir: Path) -> dict[str, str]:
    files = sorted(p for p in site_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(site_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _get(url: str, timeout: float = 10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _first(recs, kind):
    return next(r for r in recs if r["kind"] == kind)


def test_build_is_deterministic(site, tmp_path):
    summary = build_site(tmp_path / "again", n_rows=N, seed=0)
    assert _digest(tmp_path / "again") == _digest(site)
    assert summary["n_rows"] == N and sum(summary["kinds"].values()) == N
    other = build_site(tmp_path / "other", n_rows=N, seed=1)
    assert sum(other["kinds"].values()) == N
    assert (tmp_path / "other" / "manifest.jsonl").read_bytes() != (site / "manifest.jsonl").read_bytes()


def test_manifest_rows_and_kinds(site):
    recs = read_manifest(site)
    assert [r["row"] for r in recs] == list(range(N))
    assert all(list(r) == FIELDS for r in recs)
    kinds = Counter(r["kind"] for r in recs)
    assert set(kinds) == ALL_KINDS
    assert kinds["original"] >= 0.6 * N
    assert 2 <= kinds["slow"] <= 3 and kinds["duplicate_row"] == 2
    for r in recs:
        if r["kind"] in ("exact_duplicate", "near_duplicate", "duplicate_row"):
            src = recs[r["duplicate_of"]]
            assert src["row"] < r["row"] and src["kind"] == "original" and src["photo"] == r["photo"]
        if r["kind"] == "duplicate_row":
            assert (r["path"], r["caption"]) == (src["path"], src["caption"])
        if r["kind"] == "exact_duplicate":
            assert r["path"] != src["path"]
            assert (site / "files" / r["path"][1:]).read_bytes() == (site / "files" / src["path"][1:]).read_bytes()
        if r["kind"] == "near_duplicate":
            assert r["transform"]
            assert (site / "files" / r["path"][1:]).read_bytes() != (site / "files" / src["path"][1:]).read_bytes()
        if r["kind"] == "missing_url":
            assert r["path"] is None
        elif r["kind"] in ("unsupported_scheme", "malformed_url"):
            assert r["path"] and not r["path"].startswith("/")
        else:
            assert r["path"].startswith("/")
        assert (r["caption"] is None) == (r["kind"] == "missing_caption")
    mismatched = _first(recs, "mismatched_caption")
    assert mismatched["caption"] not in PHOTOS[mismatched["photo"]][1]


def test_images_decode_with_varied_sizes_and_formats(site, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    recs = read_manifest(site)
    served = [r for r in recs if r["kind"] in ("original", "mismatched_caption", "exact_duplicate",
                                                "near_duplicate", "noai", "slow", "missing_caption")]
    sizes, formats = set(), Counter()
    for r in served:
        with Image.open(site / "files" / r["path"][1:]) as im:
            im.load()
            assert im.size == (r["width"], r["height"]), r
            assert im.format.lower() == r["format"], r
        sizes.add((r["width"], r["height"]))
        formats[r["format"]] += 1
    assert set(formats) == {"jpeg", "png", "webp"}
    assert formats["jpeg"] > formats["png"] > 0 and formats["webp"] > 0
    assert len(sizes) > 0.8 * len(served)
    shorts = [min(w, h) for w, h in sizes]
    assert min(shorts) < 32 and max(shorts) > 300
    assert (1000, 40) in sizes
    assert any(w >= 2 * h for w, h in sizes) and any(h >= 2 * w for w, h in sizes)
    for r in recs:
        if r["kind"] == "corrupt":
            with pytest.raises(Exception):
                with Image.open(site / "files" / r["path"][1:]) as im:
                    im.load()


def test_server_responses(site, server):
    recs = read_manifest(site)
    base = server.base_url
    assert base.startswith("http://127.0.0.1:")
    orig = _first(recs, "original")
    status, headers, body = _get(base + orig["path"])
    assert status == 200 and body == (site / "files" / orig["path"][1:]).read_bytes()
    assert headers["Content-Type"].startswith("image/")
    assert _get(base + _first(recs, "http_404")["path"])[0] == 404
    assert _get(base + "/no/such/file.jpg")[0] == 404
    assert _get(base + "/../manifest.jsonl")[0] == 404
    status, headers, _ = _get(base + _first(recs, "noai")["path"])
    assert status == 200 and headers["X-Robots-Tag"] == "noai"
    status, headers, body = _get(base + _first(recs, "not_image")["path"])
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body
    status, headers, _ = _get(base + _first(recs, "corrupt")["path"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    t0 = time.monotonic()
    assert _get(base + _first(recs, "slow")["path"])[0] == 200
    assert time.monotonic() - t0 >= 0.5


def test_server_concurrent_downloads(site, server):
    recs = [r for r in read_manifest(site) if r["kind"] in ("original", "exact_duplicate", "near_duplicate")]
    urls = [server.base_url + r["path"] for r in recs] * 2
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda u: _get(u)[0], urls))
    assert statuses == [200] * len(urls)


def test_stop_is_quick_while_slow_request_sleeps(site):
    slow = _first(read_manifest(site), "slow")
    srv = DemoServer(site).start()  # routes.json delay (30 s) applies
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_get, srv.base_url + slow["path"], 5)
        time.sleep(0.2)
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(Exception):  # the connection is dropped unanswered
            fut.result(timeout=5)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_write_input(site, server, tmp_path, fmt):
    out = write_input(site, server.base_url, tmp_path / f"input.{fmt}", fmt=fmt)
    recs = read_manifest(site)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out.read_text())))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N
    assert set(rows[0]) == {"uid", "url", "caption", "source"}
    assert all(row["source"] == "curate-demo" for row in rows)
    for rec, row in zip(recs, rows):
        if rec["kind"] in ("missing_url", "unsupported_scheme", "malformed_url"):
            assert row["url"] in (rec["path"], None if fmt != "csv" else "")
        else:
            assert row["url"] == server.base_url + rec["path"]
        if fmt != "csv":
            assert row["caption"] == rec["caption"]
    orig = _first(recs, "original")
    assert _get(rows[orig["row"]]["url"])[0] == 200


def test_write_input_rejects_unknown_format(site, tmp_path):
    with pytest.raises(ValueError):
        write_input(site, "http://127.0.0.1:1", tmp_path / "x.txt", fmt="txt")
