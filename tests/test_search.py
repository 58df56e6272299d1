"""curate index / curate search: the index choice, the build (streamed, uid mapping, recall), searches by
text, image and uid with the run's own CLIP model, --where, output formats, hostile input, read-only SQL."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema as S
from curate.cli import main
from curate.index_plan import FLAT_MAX_ROWS, parse_bytes, plan_index
from curate.query import connect


def test_plan_follows_size_and_memory_budget():
    assert plan_index(10_000, 512).factory == "Flat"
    assert plan_index(FLAT_MAX_ROWS - 1, 512, memory=4 << 30).kind == "flat"
    big = plan_index(FLAT_MAX_ROWS, 512, memory=4 << 30)  # at 1M rows: IVF-PQ, re-ranked in float16 (1 GiB fits)
    assert big.kind == "ivfpq" and big.factory == "IVF4096,PQ128x4fsr,Refine(SQfp16)"
    small = plan_index(100_000_000, 512, memory=4 << 30)  # 100M rows in 4 GiB: fewer PQ bytes, no re-ranking copy
    assert small.kind == "ivfpq" and not small.refine and small.pq_bytes < 128
    assert small.factory.startswith("IVF32768_HNSW32,") and small.estimated_bytes <= 4 << 30
    assert plan_index(500_000, 512, memory=100 << 20).kind == "ivfpq"  # flat does not fit 100 MiB
    assert plan_index(10, 8, kind="hnsw").factory == "HNSW32"
    assert plan_index(10, 8, factory="IVF4,Flat").kind == "custom"
    with pytest.raises(ValueError, match="raise --memory"):
        plan_index(10 ** 9, 512, memory=1 << 30)
    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512MB") == 512 * 10 ** 6 and parse_bytes(1024) == 1024
    with pytest.raises(ValueError):
        parse_bytes("lots")


def _synthetic_output(root: Path, files: int = 3, rows: int = 8000, d: int = 32) -> tuple[Path, np.ndarray, list]:
    """An output of clustered unit vectors (kept rows only), several files, a few rows without embedding."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, d))
    (root / "data").mkdir(parents=True)
    allx, alluid = [], []
    for f in range(files):
        x = (centres[rng.integers(0, 40, rows)] + 0.5 * rng.normal(size=(rows, d))).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x16 = x.astype(np.float16)
        uids = [f"f{f}-r{i}" for i in range(rows)]
        emb = pa.array([None if i % 997 == 5 else v for i, v in enumerate(x16)], pa.list_(pa.float16()))
        pq.write_table(pa.table({S.UID: uids, S.CAPTION: [f"caption {u}" for u in uids],
                                 S.CLIP_SCORE: pa.array(rng.random(rows), pa.float32()), S.IMAGE_EMBEDDING: emb}),
                       root / "data" / f"{f:05d}.parquet", row_group_size=3000)
        keep = [i % 997 != 5 for i in range(rows)]
        allx.append(x16.astype(np.float32)[keep])
        alluid += [u for u, k in zip(uids, keep) if k]
    return root, np.concatenate(allx), alluid


def test_ivfpq_index_maps_positions_to_uids_and_reports_recall(tmp_path, capsys):
    out, x, uids = _synthetic_output(tmp_path / "out")
    assert main(["index", str(out), "--kind", "ivfpq", "--target-recall", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "IVF" in printed and "recall@10" in printed and "vs exact search on 1000 sampled queries" in printed
    meta = json.loads((out / "index" / "index.json").read_text())
    e = meta["indices"]["kept.image"]
    assert e["kind"] == "ivfpq" and e["rows"] == len(uids) and e["dim"] == 32
    assert e["recall_at_10"] >= 0.9 and "nprobe" in e["params"]
    ids = pq.read_table(out / "index" / "kept.image.ids.parquet")
    assert ids.column("uid").to_pylist() == uids  # position i of the index is row i of the mapping
    # the mapping's (file, row) points at the row itself
    f, r = ids.column("file")[9000].as_py(), ids.column("row")[9000].as_py()
    assert pq.read_table(out / "data" / f).column(S.UID)[r].as_py() == uids[9000]
    # a row's own vector finds it first (checked on rows from every file)
    from curate.search import Searcher

    s = Searcher(out)
    for i in (0, 8100, len(uids) - 1):
        res = s.search(x[i], k=5)
        assert res.column("uid")[0].as_py() == uids[i] and res.column("score")[0].as_py() > 0.99
        assert res.column("rank").to_pylist() == [1, 2, 3, 4, 5]
        assert res.column(S.CAPTION)[0].as_py() == f"caption {uids[i]}"
    # recall of the tuned index measured independently against brute force on other queries
    q = x[np.random.default_rng(1).choice(len(x), 200, replace=False)]
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    idx = s.index("kept", "image")
    _, found = idx.index.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) >= 0.8
    # --where: more candidates are fetched until k rows satisfy it
    res = s.search(x[0], k=20, where=f"{S.CLIP_SCORE} < 0.05")
    assert res.num_rows == 20 and max(res.column(S.CLIP_SCORE).to_pylist()) < 0.05
    assert res.column("score").to_pylist() == sorted(res.column("score").to_pylist(), reverse=True)
    # locate=True (serve's cards): the same hits, each with the file and row it is stored at
    located = s.search(x[0], k=20, where=f"{S.CLIP_SCORE} < 0.05", locate=True)
    assert located.column("uid").to_pylist() == res.column("uid").to_pylist()
    assert len({f for f in located.column("_file").to_pylist()}) > 1  # hits from several files
    for f, r, u in zip(*(located.column(c).to_pylist() for c in ("_file", "_row", "uid"))):
        assert pq.read_table(out / "data" / f, columns=[S.UID]).column(0)[r].as_py() == u


def test_a_filtered_search_reads_the_conditions_columns_then_only_its_hits_whole(tmp_path, monkeypatch):
    """Candidates are read with the columns the condition names; the rows kept are then read whole.  Checked
    against the unfiltered exact search filtered here, and by the columns each read asked for."""
    from curate.row_reader import RowReader
    from curate.search import Searcher, where_columns

    assert where_columns("clip_score > 0.3 AND caption LIKE '%uid%'") == {"clip_score", "and", "caption", "like"}
    assert where_columns('"Clip_Score" > 0.3') == {"clip_score"}
    assert where_columns("COLUMNS('c.*') > 1") is None and where_columns("* > 1") is None
    out, x, uids = _synthetic_output(tmp_path / "out", rows=2000)
    assert main(["index", str(out), "--kind", "flat"]) == 0
    s = Searcher(out)
    full = s.search(x[3], k=len(uids)).to_pylist()  # every row, best first (exact)
    want = [r for r in full if r[S.CLIP_SCORE] < 0.05 and r[S.CAPTION] != "caption f0-r3"][:20]
    asked = []
    read = RowReader.read

    def spy(self, name, rows, columns=None):
        asked.append(None if columns is None else sorted(columns))
        return read(self, name, rows, columns)

    monkeypatch.setattr(RowReader, "read", spy)
    got = s.search(x[3], k=20, where=f"\"{S.CLIP_SCORE}\" < 0.05 AND caption <> 'caption f0-r3'").to_pylist()
    assert len(got) == 20 and [r["uid"] for r in got] == [r["uid"] for r in want]
    assert [{k: v for k, v in r.items() if k != "rank"} for r in got] == \
        [{k: v for k, v in r.items() if k != "rank"} for r in want]  # every column of the hits
    assert [r["rank"] for r in got] == list(range(1, 21))
    assert sorted({S.CLIP_SCORE, S.CAPTION}) in asked and None in asked, asked  # narrow reads, then whole rows


def _uid_of(con, sql: str) -> tuple:
    return con.execute(sql).fetchone()


def test_search_the_demo_output_by_uid_text_and_image(indexed_demo, tmp_path, capsys):
    out = indexed_demo
    meta = json.loads((out / "index" / "index.json").read_text())
    assert set(meta["indices"]) == {"kept.image", "kept.text", "rejected.image", "rejected.text"}
    con = connect(out)
    uid, caption, image = _uid_of(con, "SELECT uid, caption, image FROM kept ORDER BY uid LIMIT 1")
    n_kept = con.execute("SELECT count(*) FROM kept").fetchone()[0]
    # by uid: the row itself first
    assert main(["search", str(out), "--uid", uid, "-k", "5", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["uid"] for h in hits][0] == uid and hits[0]["score"] > 0.99 and len(hits) == 5
    assert set(hits[0]) == {"uid", "score", "caption", "url"}
    # by text, in the text index: the run's own text tower gives the stored caption embedding back
    from curate.search import search

    res = search(out, text=caption, k=3, modality="text")
    assert res.column("caption")[0].as_py() == caption and res.column("score")[0].as_py() > 0.99
    # by text across modalities, with a condition
    res = search(out, text="a photo of a dog", k=n_kept + 5, where="clip_score > 0")
    kept_pos = con.execute("SELECT count(*) FROM kept WHERE clip_score > 0").fetchone()[0]
    assert res.num_rows == kept_pos and all(v > 0 for v in res.column("clip_score").to_pylist())
    # by image: the stored bytes of a row find that row
    img = tmp_path / "q.jpg"
    img.write_bytes(image)
    assert main(["search", str(out), "--image", str(img), "-k", "3", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "uid,score,caption,url" and lines[1].startswith(uid + ",") and len(lines) == 4
    # rejected rows near a kept one ("what did the filters throw away near this image")
    res = search(out, uid=uid, k=3, view="rejected")
    assert res.num_rows == 3 and all(r is not None for r in res.column("reject_reason").to_pylist())
    con.close()


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + end


@pytest.mark.parametrize("args, message", [
    (["--uid", "no-such-uid"], "no row with uid"),
    (["--uid", "x", "--where", "1=1) UNION SELECT 1 --"], "not a condition"),
    (["--uid", "x", "-k", "0"], "k must be between"),
    (["--text", " "], "empty text"),
    (["--image", "{tmp}/garbage.jpg"], "decode_failed"),
    (["--image", "{tmp}/huge.png"], "image_too_large"),
    (["--image", "{tmp}/missing.jpg"], "no image file"),
    (["--uid", "{uid}", "--where", "no_such_column > 1"], "where:"),
    (["--uid", "{uid}", "--where", "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0"], "disabled by configuration"),
])
def test_search_errors_are_one_line(indexed_demo, tmp_path, capsys, args, message):
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 100)
    (tmp_path / "huge.png").write_bytes(_png_header(10_000, 6_000))
    con = connect(indexed_demo)
    uid = con.execute("SELECT min(uid) FROM kept").fetchone()[0]
    con.close()
    args = [a.format(tmp=tmp_path, uid=uid) for a in args]
    assert main(["search", str(indexed_demo), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: ") and message in err and err.count("\n") == 1, err


def test_search_without_an_index_names_the_command(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from explore_helpers import make_output

    out = make_output(tmp_path / "out")
    assert main(["search", str(out), "--uid", "x"]) == 2
    assert "run `curate index" in capsys.readouterr().err


@pytest.mark.parametrize("sql, message", [
    ("COPY kept TO '/tmp/curate-leak.csv'", "only SELECT"),
    ("ATTACH '/tmp/curate-other.db' AS o", "only SELECT"),
    ("CREATE TABLE t AS SELECT 1", "only SELECT"),
    ("INSERT INTO kept SELECT * FROM kept", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('/tmp/other/*.parquet')", "disabled by configuration"),
    ("SELECT * FROM read_text('{out}/stats.json')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('{out}/data/../../x.parquet')", "disabled by configuration"),
    ("INSTALL httpfs", "only SELECT"),
])
def test_readonly_sql_refuses_writes_attach_copy_and_other_files(indexed_demo, sql, message):
    from curate.sql_guard import SqlRefused, readonly_connect, run_select

    con = readonly_connect(indexed_demo)
    try:
        with pytest.raises(SqlRefused) as e:
            run_select(con, sql.format(out=indexed_demo))
        assert message in str(e.value) and "\n" not in str(e.value)
        names, rows, _ = run_select(con, "SELECT count(*) AS n FROM kept")  # still usable, reads the output
        assert names == ["n"] and rows[0][0] > 0
    finally:
        con.close()
    assert not Path("/tmp/curate-leak.csv").exists() and not Path("/tmp/curate-other.db").exists()
