"""Hostile input (issue #9, items 6-7): a resume over a changed input is refused, bad bytes and
over-long records are one rejected row each, and a full disk is a one-line error naming the file.

Every test also checks the accounting: each input record is exactly once in data/ or rejected/.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import curate
from curate.io.files import InputError
from curate.io.manifest import file_id, file_key
from helpers import read_dir, rows_by_uid

ROWS = 12


def _cfg(path, out, **inp) -> dict:
    return {"input": {"path": str(path), "shard_size": 5, **inp}, "output": {"path": str(out)}, "stages": []}


def _rows(out: Path) -> list[dict]:
    rows = read_dir(out / "data").to_pylist() + read_dir(out / "rejected").to_pylist()
    return sorted(rows, key=lambda r: (r["source_file"], r["source_row"]))


def _accounting(out: Path, expected: dict[str, int | list[int]]) -> list[dict]:
    """Each record of each file (name -> record count or source_rows) is exactly once in the output."""
    rows = _rows(out)
    got = [(Path(r["source_file"]).name, r["source_row"]) for r in rows]
    assert len(got) == len(set(got)), "a row is in the output twice"
    want = [(f, i) for f, n in expected.items() for i in (range(n) if isinstance(n, int) else n)]
    assert sorted(got) == sorted(want)
    return rows


def _jsonl(path: Path, n: int = ROWS) -> Path:
    path.write_text("".join(json.dumps({"url": f"http://x.example/{path.stem}/{i}.jpg",
                                        "caption": f"photo {i} of {path.stem}"}) + "\n" for i in range(n)))
    return path


def _input_dir(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    _jsonl(d / "a.jsonl")
    _jsonl(d / "b.jsonl")
    return d


# -- the input manifest: a resume over a changed input is refused -----------------------------

def _add(d: Path) -> str:
    _jsonl(d / "c.jsonl")
    return f"added {d / 'c.jsonl'}"


def _remove(d: Path) -> str:
    (d / "b.jsonl").unlink()
    return f"removed {d / 'b.jsonl'}"


def _rewrite(d: Path) -> str:
    size = (d / "a.jsonl").stat().st_size
    _jsonl(d / "a.jsonl", ROWS + 1)
    return f"rewritten {d / 'a.jsonl'} (size {size} -> {(d / 'a.jsonl').stat().st_size}, mtime changed)"


def _touch(d: Path) -> str:  # same size, same name, new mtime: rewritten in place
    st = (d / "a.jsonl").stat()
    _jsonl(d / "a.jsonl")
    os.utime(d / "a.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    return f"rewritten {d / 'a.jsonl'} (mtime changed)"


def _glob_other(d: Path) -> str:  # the glob now matches another file (same content, other name)
    (d / "b.jsonl").rename(d / "b2.jsonl")
    return f"added {d / 'b2.jsonl'}, removed {d / 'b.jsonl'}"


CHANGES = {"added": _add, "removed": _remove, "rewritten": _rewrite, "touched": _touch, "glob": _glob_other}


def _counts(d: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in d.glob("*.jsonl")}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_over_changed_input_is_refused(tmp_path, change):
    d = _input_dir(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(d / "*.jsonl", out)
    curate.run(cfg)
    before = _counts(d)
    what = CHANGES[change](d)
    with pytest.raises(InputError) as err:
        curate.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"input changed since this output was started: {what}; " in msg, msg
    assert "output.overwrite=true" in msg
    _accounting(out, before)  # the output is untouched


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_overwrite_after_a_change_starts_over(tmp_path, change):
    d = _input_dir(tmp_path)
    out = tmp_path / "out"
    curate.run(_cfg(d / "*.jsonl", out))
    CHANGES[change](d)
    res = curate.run(_cfg(d / "*.jsonl", out), **{"output.overwrite": True})
    fresh = curate.run(_cfg(d / "*.jsonl", tmp_path / "fresh"))
    _accounting(out, _counts(d))
    for sub in ("data", "rejected"):
        assert sorted(p.name for p in (out / sub).glob("*.parquet")) == \
            sorted(p.name for p in (fresh.output / sub).glob("*.parquet"))
        if list((out / sub).glob("*.parquet")):
            assert rows_by_uid(read_dir(out / sub)) == rows_by_uid(read_dir(fresh.output / sub))
    assert res.stats["run"]["rows_in"] == fresh.stats["run"]["rows_in"] == sum(_counts(d).values())
    manifest = json.loads((out / "_work" / "input_manifest.json").read_text())
    assert [Path(e["path"]).name for e in manifest["files"]] == sorted(_counts(d))


def test_same_input_resumes_even_with_overwrite(tmp_path, caplog):
    d = _input_dir(tmp_path)
    out = tmp_path / "out"
    curate.run(_cfg(d, out))
    caplog.set_level("INFO", logger="curate.pipeline")
    curate.run(_cfg(d, out), **{"output.overwrite": True})
    assert "resuming the run" in caplog.text
    _accounting(out, _counts(d))


def test_refusal_is_one_line_on_the_cli(tmp_path):
    d = _input_dir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(d, tmp_path / "out")))
    cmd = [sys.executable, "-m", "curate.cli", "-q", "run", str(cfg)]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0
    what = _add(d)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert what in r.stderr


def test_ingest_markers_are_keyed_by_file(tmp_path):
    from curate.config import InputConfig
    from curate.layout import Layout
    from curate.runners.base import ingest_task

    d = _input_dir(tmp_path)
    out = tmp_path / "out"
    curate.run(_cfg(d, out))
    manifest = json.loads((out / "_work" / "input_manifest.json").read_text())
    assert manifest["version"] == 1
    assert [(Path(e["path"]).name, e["size"]) for e in manifest["files"]] == \
        [("a.jsonl", (d / "a.jsonl").stat().st_size), ("b.jsonl", (d / "b.jsonl").stat().st_size)]
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_work" / "done" / "ingest").glob("*.json")}
    assert set(markers) == {file_key(e) for e in manifest["files"]}
    for e in manifest["files"]:
        m = markers[file_key(e)]
        fid = file_id(e, str(d))
        assert m["file"] == e and m["file_id"] == fid
        assert all(s["shard"].startswith(f"{fid}-") for s in m["shards"])
    # shard ids come from the file's path relative to input.path: not from its position among the files
    assert file_id(manifest["files"][0], str(d)) == file_id({"path": str(tmp_path / "elsewhere" / "a.jsonl")},
                                                            str(tmp_path / "elsewhere"))
    assert len({file_id(e, str(d)) for e in manifest["files"]}) == 2
    # a marker is reused only for the same file under the same id: else the file is ingested again
    a = manifest["files"][0]
    cfg = InputConfig(path=str(d), shard_size=5)
    assert [s["shard"] for s in ingest_task((file_id(a, str(d)), a, cfg, Layout(out), "zstd", None))] == \
        [s["shard"] for s in markers[file_key(a)]["shards"]]
    again = ingest_task(("00000000000000ab", a, cfg, Layout(out), "zstd", None))
    assert [s["shard"] for s in again] == ["00000000000000ab-00000", "00000000000000ab-00001",
                                          "00000000000000ab-00002"]


@pytest.mark.ray
def test_resume_refusal_on_ray(ray_cluster, tmp_path):
    d = _input_dir(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(d, out)
    cfg["runner"] = {"kind": "ray"}
    res = curate.run(cfg)
    assert res.stats["run"]["runner"] == "ray"
    what = _rewrite(d)
    with pytest.raises(InputError, match="input changed since this output was started: " + what.replace("(", r"\(")
                       .replace(")", r"\)")):
        curate.run(cfg)
    _accounting(out, {"a.jsonl": ROWS, "b.jsonl": ROWS})


# -- bad bytes: one invalid_encoding row each, the other rows kept, right source_row -------------

RECORDS = [("http://x.example/0.jpg", "zero"), ("http://x.example/1.jpg", b"caf\xe9 au lait"),
           ("http://x.example/2.jpg", "two \u00e9t\u00e9"), ("http://x.example/3.jpg", "three")]


def _text_file(path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        lines = [json.dumps({"url": u, "caption": c}, ensure_ascii=False).encode() if isinstance(c, str)
                 else b'{"url": "%s", "caption": "%s"}' % (u.encode(), c) for u, c in RECORDS]
        data = b"\n".join(lines) + b"\n"
    else:
        sep = b"\t" if fmt == "tsv" else b","
        lines = [sep.join([b"url", b"caption"])]
        lines += [sep.join([u.encode(), c if isinstance(c, bytes) else c.encode()]) for u, c in RECORDS]
        data = b"\r\n".join(lines) + b"\r\n"
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def _assert_one_invalid_encoding(out: Path, name: str, row: int = 1, n: int = 4) -> dict:
    rows = _accounting(out, {name: n})
    got = {r["source_row"]: r["reject_reason"] for r in rows}
    assert got == {i: ("invalid_encoding" if i == row else None) for i in range(n)}, got
    bad = rows[row]
    assert bad["error_type"] == "encoding_error"
    assert f"{name} row {row}" in bad["reject_detail"]
    return bad


@pytest.mark.parametrize("name", ["in.csv", "in.tsv", "in.jsonl", "in.csv.gz", "in.tsv.gz", "in.jsonl.gz"])
def test_invalid_utf8_is_one_rejected_row(tmp_path, name):
    path = tmp_path / name
    _text_file(path, name.split(".")[1])
    curate.run(_cfg(path, tmp_path / "out"))
    bad = _assert_one_invalid_encoding(tmp_path / "out", name)
    assert bad["caption"] == "caf\ufffd au lait"  # shown, never silently "fixed" into a kept row
    kept = [r["caption"] for r in _rows(tmp_path / "out") if r["reject_reason"] is None]
    assert kept == ["zero", "two \u00e9t\u00e9", "three"]


@pytest.mark.parametrize("column", ["caption", "dictionary caption", "carried"])
def test_invalid_utf8_in_parquet_strings(tmp_path, column):
    path = tmp_path / "in.parquet"
    bad = pa.array([b"zero", b"caf\xe9", b"two", b"three"], pa.binary()).view(pa.string())
    with pytest.raises(pa.ArrowInvalid):
        bad.validate(full=True)  # pyarrow lets such a file exist
    good = pa.array(["zero", "one", "two", "three"])
    cols = {"url": [u for u, _ in RECORDS], "caption": good if column == "carried" else bad, "note": good}
    if column == "dictionary caption":
        cols["caption"] = bad.dictionary_encode()
    elif column == "carried":
        cols["note"] = bad
    pq.write_table(pa.table(cols), path)
    curate.run(_cfg(path, tmp_path / "out"))
    row = _assert_one_invalid_encoding(tmp_path / "out", "in.parquet")
    assert row["note" if column == "carried" else "caption"] == "caf\ufffd"
    assert ("note" if column == "carried" else "caption") in row["reject_detail"]


def test_undecodable_jsonl_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"url": "http://x.example/0.jpg", "caption": "ok"}\n'
                     b'{"url": "http://x.example/1.jpg", "caption": "\xff\xfe broken\n'  # bad bytes, bad JSON
                     b'\n'
                     b'{"url": "http://x.example/3.jpg", "caption": "lone \\ud800 surrogate"}\n'
                     b'{"url": "http://x.example/4.jpg", "caption": "ok too"}\n')
    curate.run(_cfg(path, tmp_path / "out"))
    rows = _accounting(tmp_path / "out", {"in.jsonl": [0, 1, 3, 4]})  # line 2 is blank: no row
    got = {r["source_row"]: (r["reject_reason"], r["error_type"]) for r in rows}
    assert got == {0: (None, None), 1: ("invalid_encoding", "encoding_error"),
                   3: ("invalid_encoding", "encoding_error"), 4: (None, None)}


# -- source_row and bounded records ------------------------------------------------------------

def test_csv_source_row_after_malformed_records_and_quoted_newlines(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('url,caption\n'
                    'http://x.example/0.jpg,zero\n'
                    'http://x.example/1.jpg,one,extra\n'             # 1: too many fields
                    'http://x.example/2.jpg,"two\nlines, quoted"\n'  # 2: one record on two lines
                    'http://x.example/3.jpg\n'                       # 3: too few fields
                    '\n'                                             # blank: not a record
                    'http://x.example/4.jpg,"four\n\n\nlines"\n'     # 4
                    'http://x.example/5.jpg,five\n')                 # 5
    curate.run(_cfg(path, tmp_path / "out"))
    rows = _rows(tmp_path / "out")
    assert {r["source_row"]: r["reject_reason"] for r in rows} == \
        {0: None, 1: "malformed_row", 2: None, 3: "malformed_row", 4: None, 5: None}
    by_row = {r["source_row"]: r for r in rows}
    assert by_row[2]["caption"] == "two\nlines, quoted" and by_row[5]["caption"] == "five"
    assert "expected 2 fields, got 3" in by_row[1]["reject_detail"]
    assert "in.csv row 3: expected 2 fields, got 1" in by_row[3]["reject_detail"]


@pytest.mark.parametrize("name", ["in.jsonl", "in.csv"])
def test_overlong_line_is_one_malformed_row(tmp_path, name):
    path = tmp_path / name
    long_caption = "x" * 5000
    recs = [("http://x.example/0.jpg", "zero"), ("http://x.example/1.jpg", long_caption),
            ("http://x.example/2.jpg", "two")]
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in recs))
    else:
        path.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in recs))
    curate.run(_cfg(path, tmp_path / "out", max_line_bytes=2048))
    rows = _accounting(tmp_path / "out", {name: 3})
    assert [r["reject_reason"] for r in rows] == [None, "malformed_row", None]
    assert "line longer than 2048 bytes" in rows[1]["reject_detail"]


def test_caption_and_url_too_long(tmp_path):
    path = tmp_path / "in.jsonl"
    recs = [{"url": "http://x.example/0.jpg", "caption": "fine"},
            {"url": "http://x.example/1.jpg", "caption": "y" * 10_000_000},  # a hostile 10 MB caption
            {"url": "http://x.example/" + "p" * 9000, "caption": "long url"},
            {"url": "http://x.example/3.jpg", "caption": "z" * 10_000}]      # at the limit: kept
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    curate.run(_cfg(path, out))
    rows = _accounting(out, {"in.jsonl": 4})
    assert [r["reject_reason"] for r in rows] == [None, "caption_too_long", "url_too_long", None]
    assert len(rows[1]["caption"]) == 10_000 and "10000000 characters" in rows[1]["reject_detail"]
    assert "stored truncated to 10000" in rows[1]["reject_detail"]
    assert len(rows[2]["url"]) == 8192 and "input.max_url_chars=8192" in rows[2]["reject_detail"]
    assert sum(p.stat().st_size for p in (out / "rejected").glob("*.parquet")) < 200_000


# -- a full disk: one line naming the file, no traceback, no temp file ---------------------------

def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_disk_full_names_the_file(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(path, out, shard_size=1000)))
    r = subprocess.run([sys.executable, "-m", "curate.cli", "-q", "run", str(cfg)], capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_file_size)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {out}/" in lines[0] and "File too large" in lines[0], lines[0]
    assert not list(out.rglob("*.tmp"))


def test_atomic_writers_name_the_file(tmp_path):
    from curate.io.files import write_json_atomic, write_parquet_atomic, write_text_atomic

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    for write in (lambda p: write_json_atomic({"a": 1}, p), lambda p: write_text_atomic("x", p),
                  lambda p: write_parquet_atomic(pa.table({"a": [1]}), p)):
        with pytest.raises(OSError, match=f"cannot write {blocker}/sub/f: ") as err:
            write(blocker / "sub" / "f")
        assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["not_a_dir"]
