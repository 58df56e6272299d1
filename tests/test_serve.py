"""curate serve: the web app started as `curate serve` on the indexed demo output, driven by headless Chromium
(Playwright on the system's chromium; skipped like tests/test_report.py when it is absent), plus its hostile
HTTP input through the same app in-process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from curate.query import connect, output_stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(indexed_demo, tmp_path_factory):
    """`curate serve OUT --port 0` in its own process; yields (base URL, subsets dir)."""
    subsets = tmp_path_factory.mktemp("subsets")
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "serve", str(indexed_demo), "--port", "0",
                             "--subsets-dir", str(subsets)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield f"http://127.0.0.1:{m.group(1)}", subsets
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def _cards(pg) -> list[dict]:
    return pg.eval_on_selector_all("figure.card", """cs => cs.map(c => {
        const img = c.querySelector('img');
        return {uid: c.dataset.uid, text: c.innerText,
                loaded: img ? img.complete && img.naturalWidth > 0 : null}; })""")


def _shot(pg, tmp_path, name):
    pg.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_browse_search_duplicates_sql_and_save_subsets_in_chromium(server, page, indexed_demo, tmp_path):
    base, subsets = server
    pg = page
    con = connect(indexed_demo)
    n_kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    # kept rows: an image grid with thumbnails decoded from the Parquet bytes
    pg.goto(base + "/")
    pg.wait_for_load_state("networkidle")
    cards = _cards(pg)
    assert pg.inner_text("#total") == str(n_kept) and 0 < len(cards) <= 48
    assert all(c["loaded"] for c in cards), "a thumbnail did not load"
    _shot(pg, tmp_path, "kept")
    # rejected rows filtered by reason (chosen in the form)
    reason, n_reason = con.execute("SELECT reject_reason, count(*) FROM rejected GROUP BY 1 ORDER BY 2 DESC LIMIT 1"
                                   ).fetchone()
    pg.click("#nav-rejected")
    pg.select_option("#reason", reason)
    pg.click("#apply")
    pg.wait_for_load_state("networkidle")
    assert pg.inner_text("#total") == str(n_reason)
    assert all(reason in c["text"] for c in _cards(pg))
    _shot(pg, tmp_path, "rejected")
    # a score range on kept rows
    lo = con.execute("SELECT quantile_cont(clip_score, 0.5) FROM kept").fetchone()[0]
    n_lo = con.execute("SELECT count(*) FROM kept WHERE clip_score >= $lo", {"lo": round(lo, 4)}).fetchone()[0]
    pg.click("#nav-kept")
    pg.select_option("#metric", "clip_score")
    pg.fill("#lo", f"{lo:.4f}")
    pg.click("#apply")
    pg.wait_for_load_state("networkidle")
    assert pg.inner_text("#total") == str(n_lo) and 0 < n_lo < n_kept
    scores = [float(re.search(r"clip_score ([0-9.-]+)", c["text"]).group(1)) for c in _cards(pg)]
    assert scores and min(scores) >= round(lo, 4) - 1e-4
    # ... saved as a complete curate output
    pg.fill("#subset-name", "high-clip")
    pg.click("#save-subset")
    pg.wait_for_load_state("networkidle")
    assert f"{n_lo} rows" in pg.inner_text("#message")
    _shot(pg, tmp_path, "saved")
    st = output_stats(subsets / "high-clip")["run"]
    total = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert st["kept"] == n_lo and st["kept"] + st["rejected"] == total
    sub = connect(subsets / "high-clip")
    assert sub.execute("SELECT min(clip_score) FROM kept").fetchone()[0] >= round(lo, 4) - 1e-6
    sub.close()
    # text search, then "similar" on the first result: that row comes back first
    pg.click("#nav-search")
    pg.fill("#text", "a photo of a bicycle")
    pg.click("#search-text")
    pg.wait_for_load_state("networkidle")
    hits = _cards(pg)
    assert len(hits) == min(48, n_kept) and all(h["loaded"] for h in hits)
    _shot(pg, tmp_path, "search-text")
    target = hits[3]["uid"]
    pg.click(f"figure.card[data-uid='{target}'] a.similar")
    pg.wait_for_load_state("networkidle")
    assert _cards(pg)[0]["uid"] == target
    # similar-image search with an uploaded file: a kept row's own image finds it
    uid, image = con.execute("SELECT uid, image FROM kept ORDER BY uid DESC LIMIT 1").fetchone()
    (tmp_path / "query.jpg").write_bytes(image)
    pg.set_input_files("#image-file", str(tmp_path / "query.jpg"))
    pg.click("#search-image")
    pg.wait_for_load_state("networkidle")
    assert _cards(pg)[0]["uid"] == uid
    _shot(pg, tmp_path, "search-image")
    # ... and the results saved as a DataComp uid file
    pg.fill("#subset-name", "like-it")
    pg.select_option("#subset-kind", "datacomp-uids")
    pg.click("#save-subset")
    pg.wait_for_load_state("networkidle")
    arr = np.load(subsets / "like-it.npy")
    assert len(arr) == min(48, n_kept) and arr.dtype == np.dtype("u8,u8")
    # duplicate groups: open the largest one
    keeper, n_dups = con.execute("SELECT duplicate_of, count(*) FROM rejected WHERE duplicate_of IS NOT NULL "
                                 "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchone()
    pg.click("#nav-duplicates")
    _shot(pg, tmp_path, "duplicates")
    pg.click("a.group >> nth=0")
    pg.wait_for_load_state("networkidle")
    assert pg.inner_text("#members") == str(n_dups) and keeper in pg.inner_text("h1")
    members = {c["uid"] for c in _cards(pg)} - {keeper}
    expect = {r[0] for r in con.execute("SELECT uid FROM rejected WHERE duplicate_of = $k", {"k": keeper}).fetchall()}
    assert members == expect
    _shot(pg, tmp_path, "duplicate-group")
    # the SQL box: a query, then a write and a file read outside the output, refused in one line
    pg.click("#nav-sql")
    pg.fill("#q", "SELECT reject_reason, count(*) AS n FROM rejected GROUP BY 1 ORDER BY 2 DESC")
    pg.click("#run")
    pg.wait_for_load_state("networkidle")
    assert reason in pg.inner_text("#result") and str(n_reason) in pg.inner_text("#result")
    _shot(pg, tmp_path, "sql")
    for bad in ("COPY kept TO '/tmp/curate-serve-leak.csv'", "SELECT * FROM read_csv('/etc/passwd')"):
        pg.fill("#q", bad)
        pg.click("#run")
        pg.wait_for_load_state("networkidle")
        err = pg.inner_text("#error")
        assert err and "\n" not in err and ("only SELECT" in err or "disabled by configuration" in err)
    assert not os.path.exists("/tmp/curate-serve-leak.csv")
    con.close()


def test_hostile_http_input_gets_one_line_4xx(indexed_demo, tmp_path):
    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    c = TestClient(create_app(indexed_demo, tmp_path / "subsets", allowed_hosts=["testserver"]))
    first = sorted(p.name for p in (indexed_demo / "data").glob("*.parquet"))[0]
    cases = [
        ("get", "/sql?q=ATTACH%20'/tmp/x.db'", 400, "only SELECT"),
        ("get", "/sql?q=SELECT%20*%20FROM%20read_parquet('/tmp/other/x.parquet')", 400, "disabled by configuration"),
        ("get", "/rows/kept?where=1%3D1)%20UNION%20SELECT%201%20--", 400, "not a condition"),
        ("get", "/rows/kept?metric=clip_score&lo=nan", 400, "finite"),
        ("get", "/rows/kept?metric=no_such&lo=1", 400, "no numeric column"),
        ("get", "/rows/kept?order=uid;drop", 400, "cannot order"),
        ("get", "/rows/secret", 404, "no view"),
        ("get", "/thumb/kept/..%2F..%2Fetc%2Fpasswd/0", 404, ""),
        ("get", "/thumb/kept/x.parquet/0", 400, "no such file"),
        ("get", f"/thumb/kept/{first}/-1", 400, "no such row"),
        ("get", f"/thumb/kept/{first}/99999999", 400, "no such row"),
        ("get", "/search?uid=" + "x" * 5000, 400, "bad uid"),
        ("get", "/search?text=" + "y" * 5000, 400, "longer than"),
        ("get", "/duplicates/nope", 404, "no such duplicate group"),
    ]
    for method, url, status, text in cases:
        r = getattr(c, method)(url)
        assert r.status_code == status and text in r.text and r.text.count("\n") <= 1, (url, r.status_code, r.text)
    r = c.post("/search/image", files={"image": ("x.jpg", b"\xff\xd8 not an image", "image/jpeg")})
    assert r.status_code == 400 and "decode_failed" in r.text
    r = c.post("/search/image", content=b"x" * 10, headers={"content-length": str(100 << 20),
                                                             "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    r = c.post("/subset", data={"name": "../escape", "kind": "output"})
    assert r.status_code == 400 and not (tmp_path / "escape").exists()
    r = c.post("/subset", data={"name": "s", "where": "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0"})
    assert r.status_code == 400 and "disabled by configuration" in r.text and not (tmp_path / "subsets" / "s").exists()
    r = c.post("/subset", data={"name": "s", "kind": "output"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    assert c.get("/rows/kept", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding


def _storage_order(root, sub: str, where=None) -> list[str]:
    """uids of a view in storage order (files by name, rows in order), read with pyarrow alone."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uids = []
    for f in sorted((root / sub).glob("*.parquet")):
        t = pq.read_table(f, columns=["uid", "reject_reason"])
        if where is not None:
            t = t.filter(pc.fill_null(where(t), False))
        uids += t.column("uid").to_pylist()
    return uids


def test_duplicate_groups_page_and_deep_pages_in_chromium(server, page, indexed_demo, tmp_path):
    """The duplicate-groups page (each group's kept image beside its copies, with kind and distance) and pages
    reached by the pager's last link, its jump form and its cursors, row for row against pyarrow."""
    import pyarrow.compute as pc

    base, _ = server
    pg = page
    con = connect(indexed_demo)
    groups = con.execute("SELECT duplicate_of, count(*) FROM rejected WHERE duplicate_of IS NOT NULL "
                         "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
    members = {k: {r[0] for r in con.execute("SELECT uid FROM rejected WHERE duplicate_of = $k", {"k": k}).fetchall()}
               for k, _ in groups}
    pg.goto(base + "/rows/kept")
    pg.click("#nav-groups")
    pg.wait_for_load_state("networkidle")
    assert pg.inner_text("#total") == str(len(groups))
    sections = pg.eval_on_selector_all("section.dgroup", """ss => ss.map(s => ({
        keeper: s.dataset.keeper, n: +s.dataset.members, text: s.innerText,
        copies: [...s.querySelectorAll('figure.copy')].map(c => c.dataset.uid),
        imgs: [...s.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0)}))""")
    assert [(s["keeper"], s["n"]) for s in sections] == groups[:20]
    first = sections[0]
    assert set(first["copies"]) <= members[first["keeper"]] and len(first["copies"]) == min(12, first["n"])
    assert all(first["imgs"]) and "kept" in first["text"]
    kinds = {r[0] for r in con.execute("SELECT DISTINCT duplicate_kind FROM rejected WHERE duplicate_of IS NOT NULL"
                                       ).fetchall()}
    shown = " ".join(s["text"] for s in sections)
    assert kinds & {"exact", "phash", "semantic"} and any(k in shown for k in kinds)
    assert "Hamming" in shown or "cosine" in shown or "identical bytes" in shown
    _shot(pg, tmp_path, "duplicate-groups")
    pg.click("section.dgroup >> nth=0 >> a.group")
    pg.wait_for_load_state("networkidle")
    assert pg.inner_text("#members") == str(groups[0][1]) and groups[0][0] in pg.inner_text("h1")
    # deep pages of kept rows, 10 a page: the last one, then page 5 by the jump form
    kept = _storage_order(indexed_demo, "data")
    pg.goto(base + "/rows/kept?per=10")
    pg.click("#last")
    pg.wait_for_load_state("networkidle")
    last = (len(kept) - 1) // 10
    assert [c["uid"] for c in _cards(pg)] == kept[last * 10:]
    assert pg.inner_text("#page-no") == str(last + 1) == pg.inner_text("#page-count")
    assert all(c["loaded"] for c in _cards(pg))
    _shot(pg, tmp_path, "deep-page")
    pg.fill("#jump-page", "5")
    pg.click("#jump-go")
    pg.wait_for_load_state("networkidle")
    assert [c["uid"] for c in _cards(pg)] == kept[40:50] and pg.inner_text("#page-no") == "5"
    # a filtered view: next and previous by cursor
    dups = _storage_order(indexed_demo, "rejected", lambda t: pc.equal(t["reject_reason"], "duplicate"))
    pg.goto(base + "/rows/rejected?reason=duplicate&per=5")
    pg.click("#next")
    pg.wait_for_load_state("networkidle")
    pg.click("#next")
    pg.wait_for_load_state("networkidle")
    assert "after=" in pg.url and [c["uid"] for c in _cards(pg)] == dups[10:15]
    assert pg.inner_text("#total") == str(len(dups)) and pg.inner_text("#page-no") == "3"
    pg.click("#prev")
    pg.wait_for_load_state("networkidle")
    assert "before=" in pg.url and [c["uid"] for c in _cards(pg)] == dups[5:10]
    _shot(pg, tmp_path, "filtered-cursor")
    con.close()
