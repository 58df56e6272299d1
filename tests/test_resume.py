"""A run killed half-way and started again ends with the same output as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import demo_config
from helpers import read_dir, rows_by_uid, stage_counts


def _done(out: Path) -> int:
    return len(list((out / "_work" / "done").glob("seg-*/*.json")))


def test_kill_and_resume(demo_input, demo_run_local, tmp_path):
    out = tmp_path / "out"
    cfg = demo_config(demo_input, out, **{"input.shard_size": 20})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "curate.cli", "-q", "run", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while _done(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; use more shards"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _done(out)
    assert not (out / "stats.json").exists()
    # start again: finished shards are skipped
    res = subprocess.run([c for c in cmd if c != "-q"], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming the run" in res.stderr
    assert killed_at >= 3
    import re

    todo = [(int(a), int(b)) for a, b in re.findall(r"segment 0 \(.*\): (\d+) of (\d+) shards to do", res.stderr)]
    assert todo and todo[0][0] < todo[0][1], res.stderr[-2000:]
    # same content as the uninterrupted run of the same corpus (different shard size -> compare rows)
    ref = demo_run_local.output
    for sub in ("data", "rejected"):
        assert rows_by_uid(read_dir(out / sub)) == rows_by_uid(read_dir(ref / sub)), sub
    assert [c[1:] for c in stage_counts(out)] == [c[1:] for c in stage_counts(ref)]
    # no temp files or parts left behind
    assert not list(out.rglob("*.tmp"))


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    """A write killed between its temp file and the rename leaves ``.NAME.XXXXXXXX.tmp``: a run that builds on the
    output deletes those (and nothing else) in its local folders."""
    from curate.io.files import remove_stale_temps

    stale = [tmp_path / "_work" / "seg-0" / ".a~g1~0-19-20.parquet.0ae4ae1b.tmp",
             tmp_path / "_work" / "done" / "seg-2" / ".a.json.12345678.tmp", tmp_path / "data" / ".b.parquet.9abc.tmp"]
    kept = [tmp_path / "_work" / "seg-0" / "a~g1~0-19-20.parquet", tmp_path / "data" / ".hidden",
            tmp_path / "data" / "notes.tmp"]
    for f in stale + kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    assert remove_stale_temps(tmp_path / "_work", tmp_path / "data", None, tmp_path / "missing") == 3
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
