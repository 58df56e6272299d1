"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import glob
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def read_dir(path: Path) -> pa.Table:
    files = sorted(glob.glob(str(Path(path) / "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def rows_by_uid(table: pa.Table, drop: tuple[str, ...] = ("source_file",)) -> list[dict]:
    t = table.drop_columns([c for c in drop if c in table.column_names])
    rows = t.to_pylist()
    return sorted(rows, key=lambda r: (r["uid"], r.get("source_row") or -1))


def stage_counts(output: Path) -> list[tuple]:
    stats = json.loads((Path(output) / "stats.json").read_text())
    return [(s["id"], s["rows_in"], s["rows_out"], s["rejected"], s["errors"]) for s in stats["stages"]]


def manifest(site: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(site) / "manifest.jsonl").read_text().splitlines() if x.strip()]


@contextmanager
def storage_restored():
    """curate.io.fs's storage settings (process-wide, and CURATE_STORAGE for child processes) as they were
    before the block, whatever it set."""
    from curate.io import fs

    old_env, old = os.environ.get(fs.ENV), fs._storage
    try:
        yield
    finally:
        fs._storage = old
        if old_env is None:
            os.environ.pop(fs.ENV, None)
        else:
            os.environ[fs.ENV] = old_env
