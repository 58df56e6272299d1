"""DuckDB over a run's Parquet output, read in place (nothing is copied or imported).

``connect(OUT)`` returns a DuckDB connection with three views over the files:

* ``kept``     -- ``OUT/data/*.parquet``
* ``rejected`` -- ``OUT/rejected/*.parquet``
* ``samples``  -- both, unioned by column name (``reject_reason IS NULL`` for kept rows)

The views glob the directories at query time, so a query always sees the files as they
are.  An empty ``data/`` or ``rejected/`` gives a typed empty view (the run's output
schema).  Embeddings are stored as Arrow ``list<float16>``; DuckDB reads Parquet float16
as ``FLOAT``, so ``image_embedding`` / ``text_embedding`` are ``FLOAT[]`` columns and
``list_cosine_similarity(image_embedding, text_embedding)`` works on them directly.

``output_stats(OUT)`` recomputes stats.json's per-stage counts from the files (what
``curate stats`` prints).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate import schema as S
from curate.io.files import InputError
from curate.io.sql import sql_string
from curate.layout import Layout
from curate.stats import funnel, run_summary

log = logging.getLogger(__name__)

VIEWS = ("kept", "rejected", "samples")
_GLOB_CHARS = set("*?[]{}")


def parquet_files(directory: Path) -> list[Path]:
    """The finished Parquet files of one output directory (temp files of writers excluded)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


def _source(directory: Path, files: list[Path]) -> str:
    """A read_parquet() list for one directory: its glob, or the file names if the path has glob characters."""
    if _GLOB_CHARS & set(str(directory)):
        return ", ".join(sql_string(str(f)) for f in files)
    return sql_string(str(directory / "*.parquet"))


#: the column scan_sql(..., with_file=True) adds: the file each row comes from (with DuckDB's file_row_number)
FILE_COLUMN = "_curate_file"


def scan_sql(layout: Layout, which: str, with_file: bool = False) -> str | None:
    """``read_parquet([...], union_by_name=true)`` over ``which`` in VIEWS; None when it has no files."""
    dirs = {"kept": [layout.data], "rejected": [layout.rejected], "samples": [layout.data, layout.rejected]}[which]
    parts = [_source(d, files) for d in dirs if (files := parquet_files(d))]
    if not parts:
        return None
    extra = f", filename = '{FILE_COLUMN}'" if with_file else ""
    return f"read_parquet([{', '.join(parts)}], union_by_name = true{extra})"


def output_schema(layout: Layout) -> pa.Schema:
    """The run's output schema: from the run's work dir, else a Parquet file, else the contract's base columns."""
    saved = layout.work / "output_schema.arrow"
    if saved.exists():
        try:
            return pa.ipc.read_schema(pa.py_buffer(saved.read_bytes()))
        except (OSError, pa.ArrowInvalid):
            pass
    files = parquet_files(layout.data) + parquet_files(layout.rejected)
    if files:
        from curate.io.remote import parquet_file

        return parquet_file(files[0]).schema_arrow
    return pa.schema([S.field(c) for c in S.BASE_COLUMNS + S.REJECT_COLUMNS])


def duckdb_type(t: pa.DataType) -> str:
    """The DuckDB type a Parquet column of Arrow type ``t`` is read as (float16 reads as FLOAT)."""
    simple = [(pa.types.is_boolean, "BOOLEAN"), (pa.types.is_float16, "FLOAT"), (pa.types.is_float32, "FLOAT"),
              (pa.types.is_float64, "DOUBLE"), (pa.types.is_string, "VARCHAR"), (pa.types.is_large_string, "VARCHAR"),
              (pa.types.is_binary, "BLOB"), (pa.types.is_large_binary, "BLOB"), (pa.types.is_date, "DATE"),
              (pa.types.is_timestamp, "TIMESTAMP")]
    for test, name in simple:
        if test(t):
            return name
    if pa.types.is_integer(t):
        base = {8: "TINYINT", 16: "SMALLINT", 32: "INTEGER", 64: "BIGINT"}[t.bit_width]
        return ("U" + base) if pa.types.is_unsigned_integer(t) else base
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return duckdb_type(t.value_type) + "[]"
    if pa.types.is_struct(t):
        return "STRUCT(" + ", ".join(f'"{f.name}" {duckdb_type(f.type)}' for f in t) + ")"
    return "VARCHAR"


def _empty_select(schema: pa.Schema) -> str:
    cols = ", ".join(f'CAST(NULL AS {duckdb_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {cols} LIMIT 0"


def connect(output_dir: str | Path, database: str = ":memory:", threads: int | None = None):
    """A DuckDB connection with the views ``kept``, ``rejected`` and ``samples`` over ``output_dir``."""
    import duckdb

    from curate.io.remote import output_root, register

    layout = Layout(output_root(output_dir))
    if not layout.root.is_dir():
        raise InputError(f"{output_dir}: no such output directory")
    if not layout.data.is_dir() and not layout.rejected.is_dir():
        raise InputError(f"{output_dir}: not a curate output (no data/ or rejected/ directory)")
    con = duckdb.connect(database)
    register(con, layout.root)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    empty = None
    for view in VIEWS:
        source = scan_sql(layout, view)
        if source is None:
            empty = empty or _empty_select(output_schema(layout))
            con.execute(f"CREATE OR REPLACE VIEW {view} AS {empty}")
        else:
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {source}")
    return con


def query(output_dir: str | Path, sql: str) -> pa.Table:
    """Run one SQL query over an output; returns a pyarrow Table."""
    con = connect(output_dir)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def columns(con) -> list[str]:
    """Column names of the ``samples`` view."""
    return list(con.sql("SELECT * FROM samples LIMIT 0").columns)


# -- stats from the files ------------------------------------------------------------------------
def _stage_order(layout: Layout, saved: dict[str, Any] | None) -> list[str]:
    if saved:
        return [st["id"] for st in saved.get("stages", [])]
    if layout.config.exists():
        import yaml

        cfg = yaml.safe_load(layout.config.read_text()) or {}
        ids = [st.get("id") or st.get("stage") for st in cfg.get("stages") or []]
        return ["input", "unique_uid", *ids]
    return []


def output_stats(output_dir: str | Path) -> dict[str, Any]:
    """stats.json's structure, with every count recomputed from the Parquet files through DuckDB.

    Stage order, seconds, ``info`` and run facts come from stats.json when present (else the
    order from config.resolved.yaml).  A count that differs from stats.json is logged.
    """
    from curate.io.remote import output_root

    layout = Layout(output_root(output_dir))
    saved = json.loads(layout.stats.read_text()) if layout.stats.exists() else None
    con = connect(layout.root)
    try:
        total, kept = con.execute("SELECT count(*), count(*) FILTER (WHERE reject_reason IS NULL) "
                                  "FROM samples").fetchone()
        rej_rows = con.execute("SELECT reject_stage, reject_reason, count(*) FROM rejected "
                               "GROUP BY ALL ORDER BY ALL").fetchall()
        err_rows = con.execute("SELECT reject_stage, error_type, count(*) FROM rejected WHERE error_type IS NOT NULL "
                               "GROUP BY ALL ORDER BY ALL").fetchall() if S.ERROR_TYPE in columns(con) else []
    finally:
        con.close()
    rejected: dict[str, Counter] = {}
    errors: dict[str, Counter] = {}
    for st, reason, n in rej_rows:
        rejected.setdefault(st or "?", Counter())[reason or "?"] += n
    for st, et, n in err_rows:
        errors.setdefault(st or "?", Counter())[et] += n
    order = _stage_order(layout, saved)
    order += sorted(set(rejected) - set(order))
    old = {st["id"]: st for st in (saved or {}).get("stages", [])}

    def extra(sid: str) -> dict[str, Any]:
        o = old.get(sid, {})
        return {"stage": o.get("stage", sid), "seconds": o.get("seconds", 0.0), "info": o.get("info"),
                "thresholds": o.get("thresholds")}

    stages = funnel(order, total, rejected, errors, extra)
    for entry in stages:
        for key in ("rows_in", "rows_out", "rejected"):
            sid = entry["id"]
            if sid in old and old[sid].get(key) != entry[key]:
                log.warning("%s: stage %s %s is %s in the files but %s in stats.json",
                            layout.root, sid, key, entry[key], old[sid].get(key))
    run = dict((saved or {}).get("run", {}))
    run.setdefault("runner", "unknown")
    run.setdefault("wall_seconds", 0.0)
    summary = run_summary(total, stages)
    if summary["kept"] != kept:  # a rejected row without reject_stage would be counted by neither
        summary.update(kept=kept, rejected=total - kept)
    run.update(summary)
    return {"run": run, "stages": stages}
