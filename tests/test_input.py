"""Input formats and bad input: per-row reasons where a row is at fault, one-line errors otherwise."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate
from curate.io.files import InputError
from helpers import read_dir


def _cfg(path, out, **inp):
    return {"input": {"path": str(path), **inp}, "output": {"path": str(out)}, "stages": []}


def _all_rows(out):
    rows = read_dir(out / "data").to_pylist() + read_dir(out / "rejected").to_pylist()
    return sorted(rows, key=lambda r: (r["source_file"], r["source_row"] if r["source_row"] is not None else 1e9))


def test_jsonl_gz_with_bad_rows(tmp_path):
    lines = [
        json.dumps({"url": "http://a.example/1.jpg", "caption": "a red apple on a table", "extra": 1}),
        "{not json",
        json.dumps({"url": None, "caption": "no url here"}),
        json.dumps({"url": "ftp://a.example/2.jpg", "caption": "ftp scheme"}),
        json.dumps({"url": "http://exa mple.com/x.jpg", "caption": "space in host"}),
        json.dumps({"url": "http://a.example/3.jpg", "caption": 42}),
        json.dumps({"url": "http://a.example/4.jpg"}),
        json.dumps({"url": "http://a.example/5.jpg", "caption": "   "}),
        json.dumps([1, 2]),
        json.dumps({"url": "http://a.example/1.jpg", "caption": "a red apple on a table"}),
    ]
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    res = curate.run(_cfg(path, tmp_path / "out"))
    rows = _all_rows(tmp_path / "out")
    assert len(rows) == len(lines)
    got = {r["source_row"]: r["reject_reason"] for r in rows}
    assert got == {0: None, 1: "malformed_row", 2: "missing_url", 3: "unsupported_scheme", 4: "malformed_url",
                   5: "invalid_caption", 6: "missing_caption", 7: "empty_caption", 8: "malformed_row",
                   9: "duplicate_uid"}
    bad = next(r for r in rows if r["source_row"] == 1)
    assert "row 1" in bad["reject_detail"] and "in.jsonl.gz" in bad["reject_detail"]
    assert res.stats["run"]["kept"] == 1


def test_csv_malformed_line_and_carried_columns(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('URL,TEXT,original_width\n'
                    'http://a.example/1.jpg,"a cat, sleeping",640\n'
                    'http://a.example/2.jpg,too,many,fields\n'
                    'http://a.example/3.jpg,"multi\nline caption",320\n')
    curate.run(_cfg(path, tmp_path / "out", url_col="URL", caption_col="TEXT"))
    rows = _all_rows(tmp_path / "out")
    assert len(rows) == 3
    kept = [r for r in rows if r["reject_reason"] is None]
    assert [r["caption"] for r in kept] == ["a cat, sleeping", "multi\nline caption"]
    # an input column named like a curate column is carried under input_<name>; CSV has no types: text
    assert [r["input_original_width"] for r in kept] == ["640", "320"]
    bad = [r for r in rows if r["reject_reason"] == "malformed_row"]
    assert len(bad) == 1 and "expected 3 fields, got 4" in bad[0]["reject_detail"]
    # source_row: the record index after the header (the malformed record counts, a quoted newline does not)
    assert [r["source_row"] for r in rows] == [0, 1, 2] and bad[0]["source_row"] == 1


def test_parquet_datacomp_style_uid(tmp_path):
    path = tmp_path / "dc.parquet"
    pq.write_table(pa.table({"uid": ["a" * 32, "b" * 32, "a" * 32, None],
                             "url": ["http://x.example/1.jpg"] * 4, "text": ["one two three"] * 4}), path)
    curate.run(_cfg(path, tmp_path / "out", caption_col="text", uid_col="uid"))
    got = [(r["uid"], r["reject_reason"]) for r in _all_rows(tmp_path / "out")]
    assert got == [("a" * 32, None), ("b" * 32, None), ("a" * 32, "duplicate_uid"), (None, "missing_uid")]


def test_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"link": ["http://x.example/1.jpg"], "caption": ["x y z"]}), path)
    with pytest.raises(InputError, match=r"in\.parquet: column 'url' not found"):
        curate.run(_cfg(path, tmp_path / "out"))


def test_cli_exit_2_one_line_for_user_mistakes(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"link": ["http://x.example/1.jpg"], "caption": ["x y z"]}), path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {{path: {path}}}\noutput: {{path: {tmp_path / 'o'}}}\nstages: [{{stage: download}}]\n")
    cases = [
        (["run", str(cfg)], "column 'url' not found"),
        (["run", str(cfg), "--set", "input.url_col=link", "--set", "stages.0.stage=nope"], "unknown stage 'nope'"),
        (["validate", str(cfg), "--set", "input.shard_size=0"], "input.shard_size"),
        (["validate", str(cfg), "--set", "stages.download.image_size=-1"], "image_size"),
        (["validate", str(cfg), "--set", "runner.kind=spark"], "runner.kind"),
        (["run", str(tmp_path / "missing.yaml")], "no such config file"),
        (["run", str(cfg), "--set", "input.path=/nonexistent/*.parquet"], "no parquet/csv/jsonl files"),
    ]
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_empty_input(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.csv").write_text("url,caption\n")
    with pytest.raises(InputError, match="hold no rows"):
        curate.run(_cfg(tmp_path, tmp_path / "out"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"url": "http://x.example/1.jpg", "caption": "a b c"}) + "\n")
    res = curate.run(_cfg(tmp_path, tmp_path / "out2"))
    assert res.stats["run"]["rows_in"] == 1
