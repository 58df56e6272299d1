"""curate serve's pages at any depth (issue #28): storage-order pages from the Parquet footers, filtered views by
cursor with counts, sorted views from a sort index, the duplicate-groups table -- each checked row for row against
a reference computed independently with pyarrow over the same files.  Sizes are small; speed is bench/serve.py's."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate import schema as S

REPO = Path(__file__).resolve().parents[1]
COLS = [S.UID, S.CAPTION, S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.REJECT_REASON, S.REJECT_STAGE, S.DUPLICATE_OF,
        S.DUPLICATE_KIND, S.REJECT_DETAIL]


def _bench_data():
    spec = importlib.util.spec_from_file_location("bench_serve_data", REPO / "bench" / "serve_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A synthetic output with the real schema: 6,000 rows in 12 shards (24 files), row groups of 64 rows,
    every reason, planted duplicate groups (bench/serve_data.py, without embeddings)."""
    root = tmp_path_factory.mktemp("pages") / "out"
    _bench_data().build(root, 6000, shard_rows=500, embeddings=False, log=None, row_group_rows=64)
    return root


def reference(root: Path, view: str) -> pa.Table:
    """Every row of a view in storage order (files by name), with ``_file`` and ``_row``."""
    parts = []
    for f in sorted((root / ("data" if view == "kept" else "rejected")).glob("*.parquet")):
        t = pq.read_table(f, columns=COLS)
        parts.append(t.append_column("_file", pa.array([f.name] * t.num_rows))
                     .append_column("_row", pa.array(np.arange(t.num_rows), pa.int64())))
    return pa.concat_tables(parts)


def keys(rows: list[dict]) -> list[tuple]:
    return [(r["uid"], r["_file"], r["_row"]) for r in rows]


def ref_keys(t: pa.Table) -> list[tuple]:
    return list(zip(t["uid"].to_pylist(), t["_file"].to_pylist(), t["_row"].to_pylist()))


@pytest.fixture(scope="module")
def ex(out):
    from curate.serve.data import Explorer

    e = Explorer(out, background=False)
    yield e
    e.close()


def test_the_footers_give_the_storage_positions(out):
    from curate.serve.catalog import Catalog

    snap = Catalog(out / "rejected").snapshot()
    ref = reference(out, "rejected")
    assert snap.total == ref.num_rows and len(snap.files) == 12 and len(snap.rg_file) > 24
    for start in (0, 1, 63, 64, 1000, ref.num_rows - 5):
        f, r = snap.positions(start, start + 5)
        got = [(snap.files[i].name, int(j)) for i, j in zip(f, r)]
        assert got == list(zip(ref["_file"].to_pylist(), ref["_row"].to_pylist()))[start:start + 5]


def test_the_footers_are_read_once_across_restarts(out, tmp_path, monkeypatch):
    """The catalog's cache: a second server reads no footer of an unchanged file, and the same facts."""
    import curate.serve.catalog as cat

    src = tmp_path / "rejected"
    shutil.copytree(out / "rejected", src)
    first = cat.Catalog(src, tmp_path / "cache.parquet").snapshot()
    assert (tmp_path / "cache.parquet").exists()
    read = []
    real = cat._read_entry
    monkeypatch.setattr(cat, "_read_entry", lambda p, st: read.append(p.name) or real(p, st))
    again = cat.Catalog(src, tmp_path / "cache.parquet").snapshot()
    assert read == [] and again.fingerprint == first.fingerprint
    assert np.array_equal(again.rg_start, first.rg_start) and np.array_equal(again.rg_file, first.rg_file)
    for c in first.num_stats:
        assert np.array_equal(again.num_stats[c][0], first.num_stats[c][0], equal_nan=True)
    assert again.str_stats[S.REJECT_REASON][0] == first.str_stats[S.REJECT_REASON][0]
    assert np.array_equal(again.str_stats[S.REJECT_REASON][2], first.str_stats[S.REJECT_REASON][2])
    assert again.files[0].schema.equals(first.files[0].schema)
    # one file rewritten: only it is read again; a broken cache is ignored
    t = pq.read_table(src / "00003-00000.parquet")
    pq.write_table(t.slice(0, 10), src / "00003-00000.parquet")
    third = cat.Catalog(src, tmp_path / "cache.parquet").snapshot()
    assert read == ["00003-00000.parquet"] and third.total == first.total - t.num_rows + 10
    (tmp_path / "cache.parquet").write_bytes(b"not parquet")
    read.clear()
    assert cat.Catalog(src, tmp_path / "cache.parquet").snapshot().total == third.total and len(read) == 12


@pytest.mark.parametrize("view", ["kept", "rejected"])
@pytest.mark.parametrize("per", [7, 48])
def test_storage_pages_at_any_depth_are_the_rows_there(ex, out, view, per):
    ref = ref_keys(reference(out, view))
    flt = ex.filter()
    last = (len(ref) - 1) // per
    for page in (0, 1, last // 2, last - 1, last):
        rows, w = ex.browse(view, flt, per, page=page)
        assert keys(rows) == ref[page * per:(page + 1) * per] and w.total == len(ref) and w.first == page * per
    rows, w = ex.browse(view, flt, per, last=True)
    assert keys(rows) == ref[last * per:] and not w.has_next and w.has_prev
    rows, _ = ex.browse(view, flt, per, page=10 ** 8)  # beyond the end: the last page
    assert keys(rows) == ref[last * per:]
    rows, _ = ex.browse(view, flt, per, after=f"{ref[100][1]}:{ref[100][2]}")
    assert keys(rows) == ref[101:101 + per]
    rows, _ = ex.browse(view, flt, per, before=f"{ref[100][1]}:{ref[100][2]}")
    assert keys(rows) == ref[100 - per:100]


def _walk(ex, view, flt, per, order="", backwards=False):
    """Every row of a view by following next (or previous, from the last page) links."""
    seen, pages = [], 0
    rows, w = ex.browse(view, flt, per, order=order, last=backwards)
    while True:
        seen = (keys(rows) + seen) if backwards else (seen + keys(rows))
        pages += 1
        assert pages < 10_000
        if backwards and not w.has_prev or not backwards and not w.has_next:
            return seen, w
        rows, w = ex.browse(view, flt, per, order=order, **({"before": w.before} if backwards else {"after": w.after}))


FILTERS = [
    ("rejected", dict(reason="duplicate"), lambda t: pc.equal(t[S.REJECT_REASON], "duplicate")),
    ("rejected", dict(stage="download"), lambda t: pc.equal(t[S.REJECT_STAGE], "download")),
    ("kept", dict(where="caption LIKE '%dog%'"), lambda t: pc.match_like(t[S.CAPTION], "%dog%")),
    ("kept", dict(metric=S.CLIP_SCORE, lo=0.30, hi=0.33),
     lambda t: pc.and_(pc.greater_equal(pc.cast(t[S.CLIP_SCORE], pa.float64()), 0.30),
                       pc.less_equal(pc.cast(t[S.CLIP_SCORE], pa.float64()), 0.33))),
    ("rejected", dict(reason="no_such_reason"), lambda t: pc.equal(t[S.REJECT_REASON], "no_such_reason")),
]


@pytest.mark.parametrize("view,kw,pred", FILTERS)
def test_filtered_views_by_cursor_visit_every_row_once_and_jump_exactly(ex, out, view, kw, pred):
    ref_t = reference(out, view)
    ref = ref_keys(ref_t.filter(pc.fill_null(pred(ref_t), False)))
    flt = ex.filter(**kw)
    per = 13
    seen, w = _walk(ex, view, flt, per)
    assert seen == ref and w.total == len(ref)
    back, _ = _walk(ex, view, flt, per, backwards=True)
    assert back == ref
    for page in (0, 3, len(ref) // per):
        rows, w = ex.browse(view, flt, per, page=page)
        assert keys(rows) == ref[page * per:(page + 1) * per] and w.total == len(ref)
        assert w.first == (page * per if ref else None)


def test_a_scan_cut_short_by_its_budget_goes_on_from_where_it_stopped(out, monkeypatch):
    """With no time to scan, each request reads one window of files: pages come partial, with a cursor to go on,
    and following them still gives every matching row exactly once."""
    from curate.serve import pages
    from curate.serve.data import Explorer

    monkeypatch.setattr(pages, "BUDGET_S", 0.0)
    monkeypatch.setattr(pages, "WINDOW_ROWS", 300)  # one or two files per window
    e = Explorer(out, background=False)
    ref_t = reference(out, "kept")
    ref = ref_keys(ref_t.filter(pc.match_like(ref_t[S.CAPTION], "%giant owl%")))
    assert 0 < len(ref) < 60
    seen, w = _walk(e, "kept", e.filter(where="caption LIKE '%giant owl%'"), 10)
    assert seen == ref and w.total == len(ref)
    notes = 0
    _, w = e.browse("kept", e.filter(where="caption LIKE '%owl%' AND caption LIKE '%happy%'"), 10)
    while w.has_next:
        notes += bool(w.note)
        _, w = e.browse("kept", e.filter(where="caption LIKE '%owl%' AND caption LIKE '%happy%'"), 10, after=w.after)
    assert notes > 0
    e.close()


def _sorted_ref(t: pa.Table, col: str, desc: bool) -> list[tuple]:
    vals = t[col].cast(pa.float64()).to_pylist()
    uids = t["uid"].to_pylist()
    k = ref_keys(t)
    nn = sorted((i for i, v in enumerate(vals) if v is not None), key=lambda i: (vals[i], uids[i]), reverse=desc)
    nulls = sorted((i for i, v in enumerate(vals) if v is None), key=lambda i: uids[i])
    return [k[i] for i in nn + nulls]


@pytest.mark.parametrize("view,col,desc", [("kept", S.CLIP_SCORE, True), ("kept", S.CLIP_SCORE, False),
                                           ("rejected", S.CLIP_SCORE, True), ("rejected", S.CAPTION_PERPLEXITY, False),
                                           ("kept", S.WIDTH, True)])
def test_sorted_views_from_the_sort_index(ex, out, view, col, desc):
    """Ties by uid (width is 256 everywhere: the order is the uids'), NULLs last; any page, and by cursor."""
    ref_t = reference(out, view).append_column(S.WIDTH, pq.read_table(
        sorted((out / ("data" if view == "kept" else "rejected")).glob("*.parquet")), columns=[S.WIDTH])[S.WIDTH]) \
        if col == S.WIDTH else reference(out, view)
    ref = _sorted_ref(ref_t, col, desc)
    order = f"{col}:{'desc' if desc else 'asc'}"
    flt = ex.filter()
    per = 17
    for page in (0, 5, len(ref) // per):
        rows, w = ex.browse(view, flt, per, order=order, page=page)
        assert keys(rows) == ref[page * per:(page + 1) * per] and w.total == len(ref) and w.first == page * per
    seen, _ = _walk(ex, view, flt, 97, order=order)
    assert seen == ref
    back, _ = _walk(ex, view, flt, 97, order=order, backwards=True)
    assert back == ref
    # a range of the sorted column: a slice of the index
    rng = ex.filter(metric=col, lo=0.3, hi=0.34) if col == S.CLIP_SCORE else ex.filter(metric=col, lo=500.0)
    v = ref_t[col].cast(pa.float64())
    mask = pc.and_(pc.greater_equal(v, 0.3), pc.less_equal(v, 0.34)) if col == S.CLIP_SCORE else \
        pc.greater_equal(v, 500.0)
    rref = _sorted_ref(ref_t.filter(pc.fill_null(mask, False)), col, desc)
    seen, w = _walk(ex, view, rng, 50, order=order)
    assert seen == rref and w.total == len(rref)
    rows, w = ex.browse(view, rng, 50, order=order, page=2)
    assert keys(rows) == rref[100:150]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("desc", [True, False])
def test_sorted_and_filtered_by_another_column_pages_by_cursor(ex, out, desc, scan, monkeypatch):
    """From the sort index and the filter's rows (a Selection), or, before they are known, by DuckDB's top-N."""
    if scan:
        monkeypatch.setattr(ex, "_selection", lambda *a: None)
    ref_t = reference(out, "rejected")
    sel = ref_t.filter(pc.fill_null(pc.equal(ref_t[S.REJECT_REASON], "clip_score_too_low"), False))
    ref = _sorted_ref(sel, S.CLIP_SCORE, desc)
    flt = ex.filter(reason="clip_score_too_low")
    order = f"{S.CLIP_SCORE}:{'desc' if desc else 'asc'}"
    seen, _ = _walk(ex, "rejected", flt, 40, order=order)
    assert seen == ref
    back, _ = _walk(ex, "rejected", flt, 40, order=order, backwards=True)
    assert back == ref
    rows, w = ex.browse("rejected", flt, 40, order=order, page=2)
    assert keys(rows) == ref[80:120] and ("a scan" in w.note) == scan and (scan or w.total == len(ref))
    flt = ex.filter(where="caption_perplexity IS NULL OR caption_perplexity > 700")
    pref = ref_t.filter(pc.fill_null(pc.or_kleene(pc.is_null(ref_t[S.CAPTION_PERPLEXITY]),
                                            pc.greater(ref_t[S.CAPTION_PERPLEXITY], 700)), False))
    seen, _ = _walk(ex, "rejected", flt, 200, order=order)
    assert seen == _sorted_ref(pref, S.CLIP_SCORE, desc)  # with NULL clip_scores: after the others, by uid


def _ref_groups(out: Path) -> tuple[list[tuple], dict]:
    t = reference(out, "rejected")
    t = t.filter(pc.is_valid(t[S.DUPLICATE_OF]))
    groups: dict[str, list] = {}
    for k, u, kind, detail in zip(t[S.DUPLICATE_OF].to_pylist(), t["uid"].to_pylist(), t[S.DUPLICATE_KIND].to_pylist(),
                                  t[S.REJECT_DETAIL].to_pylist()):
        groups.setdefault(k, []).append((u, kind, detail))
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    return [(k, ", ".join(sorted({m[1] for m in groups[k]})), len(groups[k])) for k in order], groups


def test_the_duplicate_groups_table(ex, out, tmp_path):
    from curate.dup_groups import DuplicateGroups, output_fingerprint, read_manifest, write_duplicate_groups
    from curate.layout import Layout

    ref, groups = _ref_groups(out)
    table_dir = tmp_path / "dups"
    m = write_duplicate_groups(out, table_dir)
    assert m["groups"] == len(ref) and m["members"] == sum(len(v) for v in groups.values())
    assert m["fingerprint"] == output_fingerprint(Layout(out))
    t = DuplicateGroups(table_dir)
    got = [(g["keeper"], g["kinds"], g["members"]) for g in t.page(0, t.total)]
    assert got == ref and ref[0][2] > 20  # a planted meme
    kept = reference(out, "kept")
    where = dict(zip(kept["uid"].to_pylist(), zip(kept["_file"].to_pylist(), kept["_row"].to_pylist())))
    for k, kinds, n in ref[:3] + ref[len(ref) // 2:len(ref) // 2 + 3] + ref[-3:]:
        _, g = t.find(k)
        assert (g["keeper_file"], g["keeper_row"]) == where[k] and g["keeper_view"] == "kept" and g["members"] == n
        mem = t.members_of(g, 0, 10_000)
        assert sorted(x["uid"] for x in mem) == sorted(u for u, _, _ in groups[k])
        for x in mem:  # the distance each dedup stage wrote in reject_detail
            d = re.search(r"phash distance (\d+)|cosine ([0-9.]+)", x["detail"] or "")
            want = 0.0 if x["kind"] == "exact" else float(d.group(1)) if x["kind"] == "phash" else 1 - float(d.group(2))
            assert x["distance"] == pytest.approx(want, abs=1e-6)
        assert [(x["kind"], x["distance"], x["uid"]) for x in mem] == sorted((x["kind"], x["distance"], x["uid"])
                                                                            for x in mem)
        assert t.members_of(g, 2, 3) == mem[2:5]
    assert t.find("no-such-uid") is None and t.find("") is None and t.find("\uffff") is None
    # written once: up to date, it is left alone; a changed output makes it stale
    assert write_duplicate_groups(out, table_dir)["built_at"] == read_manifest(table_dir)["built_at"]


def test_serve_writes_the_table_once_and_pages_groups_and_copies(out, tmp_path):
    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("duplicate_groups", "browse"))
    c = TestClient(create_app(copy, tmp_path / "subsets", allowed_hosts=["testserver"]))
    ref, groups = _ref_groups(copy)
    html = {"accept": "text/html"}
    r = c.get("/duplicates", headers=html)  # the first request writes it (a small output: at once)
    assert r.status_code == 200 and (copy / "duplicate_groups" / "manifest.json").exists()
    built = (copy / "duplicate_groups" / "manifest.json").read_text()
    assert re.search(r'id="total">(\d+)<', r.text).group(1) == str(len(ref))
    assert re.findall(r'class="group" href="/duplicates/([0-9a-f]+)"', r.text) == [k for k, _, _ in ref[:100]]
    per = 7
    last = (len(ref) - 1) // per
    for page in (0, 3, last):
        r = c.get(f"/duplicate-groups?page={page}&per={per}&shown=4", headers=html)
        assert r.status_code == 200
        sections = re.findall(r'<section class="dgroup" data-keeper="([0-9a-f]+)" data-members="(\d+)">(.*?)</section>',
                              r.text, re.DOTALL)
        assert [(k, int(n)) for k, n, _ in sections] == [(k, n) for k, _, n in ref[page * per:(page + 1) * per]]
        for k, n, body in sections:
            copies = re.findall(r'figure class="card copy" data-uid="([0-9a-f]+)" data-kind="(\w+)"', body)
            assert len(copies) == min(4, int(n)) and {u for u, _ in copies} <= {u for u, _, _ in groups[k]}
            assert '/thumb/kept/' in body and ("all " in body) == (int(n) > 4)
    r = c.get("/duplicate-groups?page=last&per=7", headers=html)
    assert f'class="page-no">{last + 1}<' in r.text
    # one group, its copies paged by 48
    big = ref[0][0]
    shown: list[str] = []
    for page in range((ref[0][2] + 47) // 48):
        r = c.get(f"/duplicates/{big}?page={page}", headers=html)
        assert r.status_code == 200 and re.search(r'id="members">(\d+)<', r.text).group(1) == str(ref[0][2])
        assert big in re.findall(r'<div id="keeper">.*?data-uid="([0-9a-f]+)"', r.text, re.DOTALL)
        shown += [u for u in re.findall(r'figure class="card" data-uid="([0-9a-f]+)"', r.text) if u != big]
        assert "distance" in r.text and ('id="next"' in r.text) == (page < (ref[0][2] - 1) // 48)
    assert len(shown) == len(set(shown)) and set(shown) == {u for u, _, _ in groups[big]}
    assert c.get("/duplicates/nope", headers=html).status_code == 404
    # a thumbnail of a copy, from the table's position
    body = c.get("/duplicate-groups?per=1&shown=1", headers=html).text
    src = re.findall(r'src="(/thumb/rejected/[^"]+)"', body)[0]
    t = c.get(src)
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg" and t.content[:2] == b"\xff\xd8"
    # reused by the next server; rewritten when the files change
    c2 = TestClient(create_app(copy, tmp_path / "subsets", allowed_hosts=["testserver"]))
    assert c2.get("/duplicates", headers=html).status_code == 200
    assert (copy / "duplicate_groups" / "manifest.json").read_text() == built
    (copy / "rejected" / "00011-00000.parquet").unlink()
    r = c2.get("/duplicates", headers=html)
    assert r.status_code == 200 and (copy / "duplicate_groups" / "manifest.json").read_text() != built
    assert int(re.search(r'id="total">(\d+)<', r.text).group(1)) == len(_ref_groups(copy)[0])


def test_a_read_only_output_gets_the_table_in_a_private_folder(out, tmp_path, monkeypatch):
    import os

    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    copy = tmp_path / "ro"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("duplicate_groups", "browse"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == copy.resolve() and mode == os.W_OK
                        else real(p, mode, **kw))
    c = TestClient(create_app(copy, tmp_path / "subsets", allowed_hosts=["testserver"]))
    html = {"accept": "text/html"}
    assert c.get("/duplicates", headers=html).status_code == 200
    assert c.get("/rows/kept?order=clip_score:asc", headers=html).status_code == 200
    assert not (copy / "duplicate_groups").exists() and not (copy / "browse").exists()


def test_new_files_are_seen_and_the_rows_pages_follow(out, tmp_path):
    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    copy = tmp_path / "grow"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("duplicate_groups", "browse"))
    c = TestClient(create_app(copy, tmp_path / "subsets", allowed_hosts=["testserver"]))
    html = {"accept": "text/html"}
    n0 = reference(copy, "kept").num_rows
    assert re.search(r'id="total">(\d+)<', c.get("/rows/kept", headers=html).text).group(1) == str(n0)
    assert c.get("/rows/kept?order=clip_score:desc", headers=html).status_code == 200
    extra = pq.read_table(copy / "data" / "00000-00000.parquet")
    pq.write_table(extra.set_column(0, "uid", pa.array([u + "x" for u in extra["uid"].to_pylist()])),
                   copy / "data" / "99999-00000.parquet", row_group_size=50)
    r = c.get("/rows/kept?page=last&per=10", headers=html)
    assert re.search(r'id="total">(\d+)<', r.text).group(1) == str(n0 + extra.num_rows)
    assert "99999-00000.parquet" in r.text
    # stats.json no longer matches the files: the reasons are counted from the files
    rej = reference(copy, "rejected")[S.REJECT_REASON].to_pylist()
    r = c.get("/rows/rejected", headers=html)
    for reason in ("duplicate", "download_failed"):
        assert f'<option value="{reason}" >{reason} ({rej.count(reason)})</option>' in r.text
    ref = _sorted_ref(reference(copy, "kept"), S.CLIP_SCORE, True)
    r = c.get("/rows/kept?order=clip_score:desc&per=20", headers=html)
    assert re.findall(r'figure class="card" data-uid="([0-9a-fx]+)"', r.text) == [k[0] for k in ref[:20]]


def test_pager_links_and_hostile_cursors(out, tmp_path):
    from fastapi.testclient import TestClient

    from curate.serve.app import create_app

    c = TestClient(create_app(out, tmp_path / "subsets", allowed_hosts=["testserver"]))
    html = {"accept": "text/html"}
    ref = ref_keys(reference(out, "kept"))
    r = c.get("/rows/kept?goto=3&per=10", headers=html)  # the jump form: 1-based
    uids = re.findall(r'figure class="card" data-uid="([0-9a-f]+)"', r.text)
    assert uids == [k[0] for k in ref[20:30]] and 'id="page-no">3<' in r.text
    nxt = re.search(r'id="next" href="\?([^"]+)"', r.text).group(1).replace("&amp;", "&")
    uids = re.findall(r'figure class="card" data-uid="([0-9a-f]+)"', c.get("/rows/kept?" + nxt, headers=html).text)
    assert uids == [k[0] for k in ref[30:40]]
    r = c.get("/rows/rejected?reason=duplicate&per=10", headers=html)
    nxt = re.search(r'id="next" href="\?([^"]+)"', r.text).group(1).replace("&amp;", "&")
    assert "after=" in nxt and "page=" not in nxt  # a filtered view pages by cursor
    for bad, text in (("after=nocolon", "bad cursor"), ("after=x/y:1", "bad cursor"),
                      ("order=clip_score:desc&after=abc", "bad cursor"), ("order=clip_score:desc&after=nan|u", "NaN"),
                      ("where=1%3D1)%20UNION%20SELECT%201%20--", "not a condition"),
                      ("where=no_such_column%20%3E%201", "no_such_column")):
        r = c.get("/rows/kept?" + bad)
        assert r.status_code == 400 and text in r.text and r.text.count("\n") <= 1, (bad, r.text)
    # a cursor naming a file that is gone: the page goes on from where that file was
    r = c.get("/rows/kept?after=00003-00000.parquetX:5&per=5", headers=html)
    first = re.findall(r'figure class="card" data-uid="([0-9a-f]+)"', r.text)[0]
    assert first == next(k[0] for k in ref if k[1] == "00004-00000.parquet")


def test_curate_index_writes_the_table_and_a_run_end_hook_skips_outputs_without_dedup(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_helpers import make_output

    from curate.cli import main
    from curate.dup_groups import DuplicateGroups, write_after_run

    out = make_output(tmp_path / "out")
    assert main(["index", str(out)]) == 0
    assert f"duplicate groups: 3 groups, 3 rejected copies -> {out.resolve() / 'duplicate_groups'}" in \
        capsys.readouterr().out
    t = DuplicateGroups(out / "duplicate_groups")
    assert t.total == 3 and {g["members"] for g in t.page(0, 3)} == {1}
    plain = make_output(tmp_path / "plain", drop=(S.DUPLICATE_OF, S.DUPLICATE_KIND))
    write_after_run(plain)
    assert not (plain / "duplicate_groups").exists()
    write_after_run(out)  # up to date: left as it is
    assert DuplicateGroups(out / "duplicate_groups").manifest == t.manifest
