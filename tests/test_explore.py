"""DuckDB views over the output, `curate query` / `curate stats`, exports and re-filtering."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from explore_helpers import make_output

from curate import schema as S
from curate.cli import main
from curate.io.files import InputError
from curate.query import connect, output_stats
from curate.stats import format_stats, load_stats


def _one(con, sql: str):
    return con.execute(sql).fetchall()[0][0]


def test_views_read_the_demo_output_in_place(demo_run_local):
    out, stats = demo_run_local.output, demo_run_local.stats
    con = connect(out)
    assert _one(con, "SELECT count(*) FROM duckdb_tables()") == 0  # nothing was copied into DuckDB
    assert {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()} == \
        {"kept", "rejected", "samples"}
    assert _one(con, "SELECT count(*) FROM kept") == stats["run"]["kept"]
    assert _one(con, "SELECT count(*) FROM rejected") == stats["run"]["rejected"]
    assert _one(con, "SELECT count(*) FROM samples") == stats["run"]["rows_in"]
    assert _one(con, "SELECT count(*) FROM kept WHERE reject_reason IS NOT NULL") == 0
    assert _one(con, "SELECT count(*) FROM rejected WHERE reject_reason IS NULL OR reject_stage IS NULL") == 0
    by_reason = dict(con.execute("SELECT reject_reason, count(*) FROM samples WHERE reject_reason IS NOT NULL "
                                 "GROUP BY 1").fetchall())
    assert by_reason == stats["run"]["rejected_by_reason"]
    kept_uids = set(pq.read_table(out / "data", columns=["uid"])["uid"].to_pylist())
    assert {r[0] for r in con.execute("SELECT uid FROM kept").fetchall()} == kept_uids
    con.close()


def test_float16_embeddings_and_empty_views(tmp_path):
    out = make_output(tmp_path / "out", rejected=False)
    con = connect(out)
    types = dict((r[0], r[1]) for r in con.execute("DESCRIBE kept").fetchall())
    assert types[S.IMAGE_EMBEDDING] == "FLOAT[]" and types[S.CLIP_SCORE] == "FLOAT"
    stored = pq.read_table(out / "data" / "00000.parquet", columns=[S.UID, S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING])
    assert stored.schema.field(S.IMAGE_EMBEDDING).type == pa.list_(pa.float16())
    got = dict(con.execute(f"SELECT uid, {S.IMAGE_EMBEDDING} FROM kept").fetchall())
    for uid, emb in zip(stored[S.UID].to_pylist(), stored[S.IMAGE_EMBEDDING].to_pylist()):
        assert got[uid] == [float(np.float16(x)) for x in emb]  # exact: float16 widened to FLOAT
    cos = con.execute(f"SELECT list_cosine_similarity({S.IMAGE_EMBEDDING}, {S.TEXT_EMBEDDING}) FROM kept").fetchall()
    assert len(cos) == 12 and all(-1.001 <= c[0] <= 1.001 for c in cos)
    # rejected/ is empty: a typed empty view with the same columns; samples = kept
    assert _one(con, "SELECT count(*) FROM rejected") == 0
    assert con.execute("DESCRIBE rejected").fetchall() == con.execute("DESCRIBE kept").fetchall()
    assert _one(con, "SELECT count(*) FROM samples") == 12
    con.close()
    gone = make_output(tmp_path / "gone", all_rejected=True)  # empty data/
    con = connect(gone)
    assert _one(con, "SELECT count(*) FROM kept") == 0 and _one(con, "SELECT count(*) FROM rejected") == 17
    assert dict((r[0], r[1]) for r in con.execute("DESCRIBE kept").fetchall())[S.TEXT_EMBEDDING] == "FLOAT[]"
    con.close()
    with pytest.raises(InputError, match="not a curate output"):
        connect(tmp_path)


def test_query_command_formats(demo_run_local, capsys):
    out = str(demo_run_local.output)
    sql = "SELECT uid, reject_reason, width FROM samples ORDER BY uid LIMIT 7"
    assert main(["query", out, sql]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[0].strip() == "uid" and table[-1] == "(7 rows)" and len(table) == 10
    assert main(["query", out, sql, "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    con = connect(out)
    expect = con.execute(sql).fetchall()
    assert rows[0] == ["uid", "reject_reason", "width"] and len(rows) == 8
    assert [r[0] for r in rows[1:]] == [e[0] for e in expect]
    assert main(["query", out, "SELECT uid, image FROM kept ORDER BY uid LIMIT 2", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    first = con.execute("SELECT uid, image FROM kept ORDER BY uid LIMIT 1").fetchall()[0]
    assert got[0]["uid"] == first[0] and base64.b64decode(got[0]["image"]) == first[1]
    con.close()
    assert main(["query", out, "SELECT no_such_column FROM kept"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: query:") and "no_such_column" in err and err.count("\n") == 1


def test_stats_are_counted_from_the_files(demo_run_local, tmp_path, capsys, caplog):
    out = demo_run_local.output
    assert main(["stats", str(out)]) == 0
    assert capsys.readouterr().out.strip() == format_stats(load_stats(out))  # same counts as stats.json
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("_demo", "report.html"))
    victim = sorted((copy / "rejected").glob("*.parquet"))[0]
    lost = pq.read_metadata(victim).num_rows
    victim.unlink()
    with caplog.at_level(logging.WARNING, logger="curate.query"):
        st = output_stats(copy)
    assert st["run"]["rows_in"] == demo_run_local.stats["run"]["rows_in"] - lost
    assert "in the files but" in caplog.text


def test_export_webdataset(demo_run_local, tmp_path, capsys):
    import webdataset as wds
    from PIL import Image

    out, dest = demo_run_local.output, tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--dest", str(dest), "--shard-size", "50"]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    con = connect(out)
    kept = {r[0]: r[1:] for r in con.execute("SELECT uid, image, caption FROM kept").fetchall()}
    field = manifest["caption_field"]
    text = dict(con.execute(f"SELECT uid, coalesce({field}, caption) FROM kept").fetchall())
    assert manifest["samples"] == len(kept) and all(s["samples"] <= 50 for s in manifest["shards"])
    assert len(manifest["shards"]) == -(-len(kept) // 50)
    seen = set()
    for sample in wds.WebDataset(manifest["url_pattern"], shardshuffle=False):  # brace pattern of all shards
        meta = json.loads(sample["json"])
        uid = meta["uid"]
        img_key = next(k for k in sample if k in ("jpg", "png", "webp"))
        assert sample[img_key] == kept[uid][0]
        Image.open(io.BytesIO(sample[img_key])).load()
        assert sample["txt"].decode() == text[uid] and meta["caption"] == kept[uid][1]
        assert "image" not in meta and S.IMAGE_EMBEDDING not in meta
        seen.add(uid)
    assert seen == set(kept)
    digest = [hashlib.sha256((dest / s["name"]).read_bytes()).hexdigest() for s in manifest["shards"]]
    assert main(["export", str(out), "--format", "webdataset", "--dest", str(dest), "--shard-size", "50"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "webdataset", "--dest", str(dest), "--shard-size", "50",
                 "--overwrite"]) == 0  # reproducible byte for byte
    assert digest == [hashlib.sha256((dest / s["name"]).read_bytes()).hexdigest() for s in manifest["shards"]]
    where = "width >= 100"
    assert main(["export", str(out), "--format", "webdataset", "--dest", str(tmp_path / "w2"), "--where", where]) == 0
    assert json.loads((tmp_path / "w2" / "manifest.json").read_text())["samples"] == \
        _one(con, f"SELECT count(*) FROM kept WHERE {where}")
    con.close()


def test_export_datacomp_uids(demo_run_local, tmp_path, capsys):
    syn = make_output(tmp_path / "syn")
    dest = tmp_path / "subset.npy"
    assert main(["export", str(syn), "--format", "datacomp-uids", "--dest", str(dest)]) == 0
    arr = np.load(dest)
    assert arr.dtype == np.dtype("u8,u8") and arr.shape == (12,)
    assert (np.sort(arr) == arr).all()  # DataComp's resharder needs them sorted
    uids = [r[0] for r in connect(syn).execute("SELECT uid FROM kept").fetchall()]
    expect = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    expect.sort()
    assert (arr == expect).all()
    assert {f"{a:016x}{b:016x}" for a, b in arr.tolist()} == set(uids)
    demo = str(demo_run_local.output)  # uids like demo-00001 are not 128-bit hex
    assert main(["export", demo, "--format", "datacomp-uids", "--dest", str(tmp_path / "d.npy")]) == 2
    assert "--hash-uids" in capsys.readouterr().err
    assert main(["export", demo, "--format", "datacomp-uids", "--dest", str(tmp_path / "d.npy"), "--hash-uids"]) == 0
    got = np.load(tmp_path / "d.npy")
    kept = [r[0] for r in connect(demo).execute("SELECT uid FROM kept").fetchall()]
    md5 = [hashlib.md5(u.encode()).hexdigest() for u in kept]
    assert sorted(f"{a:016x}{b:016x}" for a, b in got.tolist()) == sorted(md5)


def test_refilter_writes_a_complete_output(tmp_path):
    from curate.subset import refilter

    src = make_output(tmp_path / "src")
    res = refilter(src, tmp_path / "dst", "clip_score >= 0.35 AND caption_perplexity <= 400")
    con_src, con = connect(src), connect(tmp_path / "dst")
    expect = _one(con_src, "SELECT count(*) FROM kept WHERE clip_score >= 0.35 AND caption_perplexity <= 400")
    assert res["kept_after"] == expect == _one(con, "SELECT count(*) FROM kept") and 0 < expect < 12
    assert _one(con, "SELECT count(*) FROM samples") == _one(con_src, "SELECT count(*) FROM samples")
    assert _one(con, "SELECT count(*) FROM rejected WHERE reject_reason = 'refiltered' AND "
                     "reject_stage = 'refilter'") == 12 - expect
    t = pq.read_table(tmp_path / "dst" / "data" / "00000.parquet")
    assert t.schema.field(S.IMAGE_EMBEDDING).type == pa.list_(pa.float16())  # types kept
    st = output_stats(tmp_path / "dst")
    assert st["stages"][-1]["id"] == "refilter" and st["stages"][-1]["rows_out"] == expect
    assert st["run"]["kept"] == expect
    with pytest.raises(InputError, match="refilter"):
        refilter(src, tmp_path / "bad", "no_such_column > 1")
    with pytest.raises(InputError, match="not empty"):
        refilter(src, tmp_path / "dst", "TRUE")


def test_refilter_command(tmp_path, capsys):
    src = make_output(tmp_path / "src")
    dst = tmp_path / "strict"
    assert main(["refilter", str(src), str(dst), "--where", "clip_score >= 0.35", "--reason", "strict_clip"]) == 0
    expect = _one(connect(src), "SELECT count(*) FROM kept WHERE clip_score >= 0.35")
    assert f"{expect} of 12 kept rows satisfy the condition" in capsys.readouterr().out
    con = connect(dst)
    assert _one(con, "SELECT count(*) FROM kept") == expect
    assert _one(con, "SELECT count(*) FROM rejected WHERE reject_reason = 'strict_clip'") == 12 - expect
    assert main(["refilter", str(src), str(dst), "--where", "TRUE"]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(["refilter", str(src), str(dst), "--where", "no_such_column > 1", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("curate: error: refilter:")
    assert _one(connect(dst), "SELECT count(*) FROM kept") == expect  # a bad condition deleted nothing
