"""Corpora that grow (#27): ``--append`` new input files, ``--retry-failed`` downloads, and a row's finished work
reused (the row cache) -- each compared with a fresh run of the same config on the same input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import demo_config
from helpers import read_dir, rows_by_uid, stage_counts

TRANSIENT = ("timeout", "connection_error", "connection_refused", "dns_error", "ssl_error", "http_429")


def _same_output(a: Path, b: Path) -> None:
    for sub in ("data", "rejected"):
        x, y = rows_by_uid(read_dir(a / sub)), rows_by_uid(read_dir(b / sub))
        assert len(x) == len(y), f"{sub}/: {len(x)} rows vs {len(y)}"
        diff = [r["uid"] for r, s in zip(x, y) if r != s]
        assert not diff, f"{sub}/ differs in {len(diff)} rows, e.g. {diff[:3]}"
    assert stage_counts(a) == stage_counts(b)


def _computed(out: Path) -> dict[str, int]:
    stats = json.loads((out / "stats.json").read_text())
    return {s["id"]: s["rows_computed"] for s in stats["stages"] if "rows_computed" in s}


def _split_input(demo_input: Path, folder: Path, new_rows: int) -> tuple[Path, object]:
    """The session corpus as one input file ``b.parquet`` in ``folder`` but its last ``new_rows`` rows; returns
    the file those rows go to (``a.parquet``: it sorts first, before every shard already made) and them."""
    t = pq.read_table(demo_input)
    folder.mkdir()
    pq.write_table(t.slice(0, t.num_rows - new_rows), folder / "b.parquet")
    return folder / "a.parquet", t.slice(t.num_rows - new_rows)


def _paths(urls) -> set[str]:
    return {urlsplit(u).path for u in urls if u}


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_append_processes_only_the_new_rows_and_equals_a_fresh_run(runner, demo_input, demo_server, tmp_path,
                                                                   request):
    import curate
    from curate.io.files import InputError

    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    over = {"runner.kind": runner, "input.shard_size": 50}
    added, new = _split_input(demo_input, tmp_path / "in", 40)
    out = tmp_path / "out"
    curate.run(demo_config(tmp_path / "in", out, **over))
    pq.write_table(new, added)

    with pytest.raises(InputError, match="--append"):  # a grown input without --append: refused, naming it
        curate.run(demo_config(tmp_path / "in", out, **over))
    before = len(demo_server.requested)
    res = curate.run(demo_config(tmp_path / "in", out, **over), append=True)
    fetched = demo_server.requested[before:]
    assert fetched and set(fetched) <= _paths(new["url"].to_pylist()), \
        "an append requests the new rows' URLs only"
    ran = _computed(out)
    assert 0 < ran["download"] <= new.num_rows and 0 < ran["clip_embed"] <= new.num_rows, ran
    assert 0 < ran["recaption"] <= new.num_rows and ran["caption_perplexity"] <= new.num_rows, ran
    assert res.stats["run"]["rows_in"] == pq.read_table(demo_input).num_rows

    fresh = tmp_path / "fresh"
    curate.run(demo_config(tmp_path / "in", fresh, **over))
    _same_output(out, fresh)
    shard_ids = sorted(p.stem for p in (out / "data").glob("*.parquet"))
    assert shard_ids == sorted(p.stem for p in (fresh / "data").glob("*.parquet"))

    # a file removed (or rewritten) stays refused, --append or not
    added.unlink()
    with pytest.raises(InputError, match="removed .*a.parquet.*--append takes added files only"):
        curate.run(demo_config(tmp_path / "in", out, **over), append=True)


def test_retry_failed_fetches_exactly_the_failed_urls_and_equals_a_run_on_the_healed_server(
        demo_input, demo_server, tmp_path):
    import curate

    urls = pq.read_table(demo_input)["url"].to_pylist()
    failing = sorted(_paths(urls[3::25]))
    out = tmp_path / "out"
    cfg = demo_config(demo_input, out, **{"input.shard_size": 50})
    demo_server.fail(failing)  # an origin that answers 503 to these for the first run
    try:
        curate.run(cfg)
    finally:
        demo_server.heal()
    rej = read_dir(out / "rejected").to_pylist()
    by_type = {}
    for r in rej:
        if r["reject_stage"] == "download":
            by_type.setdefault(r["error_type"], set()).add(urlsplit(r["url"]).path)
    assert set(failing) <= by_type.get("http_503", set())
    def is_transient(t):
        return t is not None and (t in TRANSIENT or t.startswith("http_5"))

    transient = set().union(*(p for t, p in by_type.items() if is_transient(t)))
    others = set().union(*(p for t, p in by_type.items() if not is_transient(t)))
    assert others, "the corpus has rows rejected for other reasons (they must not be fetched again)"

    before = len(demo_server.requested)
    curate.run(cfg, retry_failed=[])
    again = demo_server.requested[before:]
    assert set(again) == transient, "the retry fetches exactly the rows that failed with a transient error"
    assert not set(again) & others
    ran = _computed(out)
    assert ran["download"] == len([r for r in rej if r["reject_stage"] == "download"
                                   and urlsplit(r["url"]).path in transient])
    assert 0 < ran["clip_embed"] <= len(failing), ran

    fresh = tmp_path / "fresh"
    curate.run(demo_config(demo_input, fresh, **{"input.shard_size": 50}))
    _same_output(out, fresh)

    # only the listed types: a retry of http_404 fetches the 404s again, nothing else
    before = len(demo_server.requested)
    curate.run(cfg, retry_failed=["http_404"])
    assert set(demo_server.requested[before:]) == by_type.get("http_404", set())
    _same_output(out, fresh)


def test_a_changed_filter_reuses_every_row_it_does_not_let_through(demo_run_local, demo_input, tmp_path):
    """language.min_score lowered: segment 2 is redone, but clip_embed (before it, same inputs) runs on no row,
    and the later model stages only on the rows the filter now lets through."""
    import curate

    out = tmp_path / "out"
    shutil.copytree(demo_run_local.output, out)
    cfg = demo_config(demo_input, out)
    for st in cfg["stages"]:
        if st["stage"] == "language":
            st["min_score"] = 0.05
    res = curate.run(cfg)
    ran = _computed(out)
    assert ran["clip_embed"] == 0 and ran["phash"] == 0 and ran["download"] == 0, ran
    lang = {s["id"]: s for s in res.stats["stages"]}["language"]
    was = {s["id"]: s for s in json.loads((demo_run_local.output / "stats.json").read_text())["stages"]}["language"]
    assert lang["rows_out"] > was["rows_out"], "the lower threshold lets more rows through"
    assert ran["caption_perplexity"] <= lang["rows_out"] - was["rows_out"] + 2, ran
    fresh = tmp_path / "fresh"
    curate.run({**cfg, "output": {**cfg["output"], "path": str(fresh)}})
    _same_output(out, fresh)


def _done(out: Path, since: float) -> int:
    """Done markers written since ``since`` (the run removes those of the segments it redoes first: a folder
    may vanish while it is listed, which counts as empty)."""
    n = 0
    try:
        folders = [d for d in (out / "_work" / "done").iterdir() if d.name.startswith("seg-")]
    except FileNotFoundError:
        return 0
    for d in folders:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            try:
                n += name.endswith(".json") and (d / name).stat().st_mtime >= since
            except FileNotFoundError:
                continue
    return n


def _kill_then_finish(cmd: list[str], out: Path, after: int) -> subprocess.CompletedProcess:
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while _done(out, start) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400)


def test_an_append_and_a_retry_killed_half_way_resume_exactly(demo_input, demo_server, tmp_path):
    import curate

    added, new = _split_input(demo_input, tmp_path / "in", 60)
    out = tmp_path / "out"
    cfg = demo_config(tmp_path / "in", out, **{"input.shard_size": 20})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = [sys.executable, "-m", "curate.cli", "run", str(cfg_path)]
    failing = sorted(_paths(pq.read_table(demo_input)["url"].to_pylist()[5::30]))
    demo_server.fail(failing)
    try:
        curate.run(cfg)
        pq.write_table(new, added)
        # the append, killed once a few shards of its segments are done, then run again (still --append)
        res = _kill_then_finish(run + ["--append"], out, after=8)
    finally:
        demo_server.heal()
    assert res.returncode == 0, res.stderr[-2000:]
    # the retry of the rows that got 503 during the first run and the append, killed and run again
    res = _kill_then_finish(run + ["--retry-failed"], out, after=8)
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = tmp_path / "fresh"
    curate.run(demo_config(tmp_path / "in", fresh, **{"input.shard_size": 20}))
    _same_output(out, fresh)
    assert not list(out.rglob("*.tmp"))
    for seg in (out / "_work").glob("seg-*"):  # a finished shard keeps one generation of its column group
        gens: dict[str, set[str]] = {}
        for p in seg.glob("*.parquet"):
            gens.setdefault(p.name.split("~")[0], set()).add(p.name.split("~")[1])
        assert all(len(g) == 1 for g in gens.values()), (seg.name, gens)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.parquet")}


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_an_append_that_changes_no_decision_carries_every_old_shard(runner, demo_input, demo_server, tmp_path,
                                                                     request):
    """Appended rows that all fail to download change no fit: every old shard's column group of every segment is
    carried forward (its parts linked, no row read or run), its data/ and rejected/ files are not even rewritten,
    and the output is a fresh run's.  The carried groups are those of the older generation, byte for byte."""
    import curate

    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    over = {"runner.kind": runner, "input.shard_size": 50}
    t = pq.read_table(demo_input)
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(t, folder / "b.parquet")
    out = tmp_path / "out"
    curate.run(demo_config(folder, out, **over))
    before = {sub: _files(out / sub) for sub in ("data", "rejected")}
    def key(p: Path) -> tuple[str, str, str]:  # segment, shard, positions: the name less the generation
        return p.parent.name, p.name.split("~")[0], p.name.split("~", 2)[2]

    groups = {key(p): p.read_bytes() for p in (out / "_work").glob("seg-*/*.parquet")}
    lost = t.slice(0, 4)
    lost = lost.set_column(lost.schema.get_field_index("uid"), "uid",
                           pa.array([f"gone-{i}" for i in range(4)])) \
        .set_column(lost.schema.get_field_index("url"), "url",
                    pa.array([f"{demo_server.base_url}/no-such-photo-{i}.jpg" for i in range(4)]))
    pq.write_table(lost, folder / "a.parquet")
    curate.run(demo_config(folder, out, **over), append=True)

    old = {n[:-len(".parquet")] for n in before["data"]}
    for d in sorted((out / "_work" / "done").glob("seg-*")):
        markers = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
        assert {s for s, m in markers.items() if m.get("carried")} == old, d.name
    for sub in ("data", "rejected"):
        now = _files(out / sub)
        assert {n: now[n] for n in before[sub]} == before[sub], f"{sub}/ files of old shards were rewritten"
    carried = [p for p in (out / "_work").glob("seg-*/*.parquet") if key(p) in groups]
    assert len(carried) == len(groups)
    assert all(p.read_bytes() == groups[key(p)] for p in carried)
    ran = _computed(out)
    assert ran["download"] == 4 and ran["clip_embed"] == 0 and ran["recaption"] == 0, ran
    fresh = tmp_path / "fresh"
    curate.run(demo_config(folder, fresh, **over))
    _same_output(out, fresh)
    if runner == "ray":
        return
    # a file with a column no other file has: every shard's data/ and rejected/ get it (null in the old rows),
    # so the last segment keeps no old shard's files (its certificate names the output schema)
    more = lost.set_column(lost.schema.get_field_index("uid"), "uid", pa.array([f"more-{i}" for i in range(4)]))
    pq.write_table(more.append_column("license", pa.array(["cc-by"] * 4)), folder / "c.parquet")
    curate.run(demo_config(folder, out, **over), append=True)
    last = max((out / "_work" / "done").glob("seg-*"), key=lambda d: int(d.name[4:]))
    assert not [p for p in last.glob("*.json") if json.loads(p.read_text()).get("carried")]
    assert "license" in read_dir(out / "data").column_names
    fresh = tmp_path / "fresh2"
    curate.run(demo_config(folder, fresh, **over))
    _same_output(out, fresh)
