"""Re-filter a finished output on its stored columns, without running any model again.

``refilter(OUT, DEST, "clip_score >= 0.25 AND caption_perplexity <= 3000")`` writes a
complete curate output to DEST: kept rows of OUT that satisfy the SQL condition go to
``DEST/data``; the others go to ``DEST/rejected`` with ``reject_reason`` (default
``refiltered``) and ``reject_stage`` (default ``refilter``), next to OUT's rejected rows.
stats.json gains one stage entry, so ``curate stats``/``report``/``query`` work on DEST.
A condition that is NULL for a row (a missing score) rejects it.

Only tightening is exact: rows an earlier filter rejected never reached the later stages
(their later columns are null), so loosening a threshold needs a re-run from that filter.
Files are processed one at a time (bounded memory) and keep their Arrow types (float16
embeddings stay float16).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.files import ROW_GROUP_BYTES, ROW_GROUP_ROWS, InputError, write_json_atomic, write_parquet_atomic
from curate.layout import Layout
from curate.query import parquet_files
from curate.stats import stage_line


def _mask(con, path: Path, where: str, rows: int) -> pa.Array:
    """Whether each row of one Parquet file satisfies ``where`` (NULL counts as no), in file order."""
    try:
        got = con.execute(f"SELECT file_row_number, coalesce(({where}), false) FROM read_parquet($path) "
                          "ORDER BY file_row_number", {"path": str(path)}).fetchall()
    except Exception as e:  # duckdb.Error: the condition is the user's
        raise InputError(f"refilter: {' '.join(str(e).split())}") from None
    keep = [False] * rows
    for i, ok in got:
        keep[i] = bool(ok)
    return pa.array(keep, pa.bool_())


def _mark(table: pa.Table, reason: str, stage_id: str, detail: str) -> pa.Table:
    n = table.num_rows
    for name, value in ((S.REJECT_REASON, reason), (S.REJECT_STAGE, stage_id), (S.REJECT_DETAIL, detail)):
        col = pa.array([value] * n, table.schema.field(name).type if name in table.column_names else pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def refilter(output_dir: str | Path, dest: str | Path, where: str, reason: str = "refiltered",
             stage_id: str = "refilter", overwrite: bool = False, compression: str = "zstd",
             readonly_sql: bool = False, row_group_rows: int = ROW_GROUP_ROWS,
             row_group_bytes: int = ROW_GROUP_BYTES) -> dict[str, Any]:
    """Write the subset of ``output_dir``'s kept rows satisfying ``where`` as a new output at ``dest``.

    ``readonly_sql``: evaluate ``where`` in a DuckDB connection that can read nothing but the source's
    ``data/`` (curate.sql_guard; for conditions from someone else, e.g. ``curate serve``).
    ``row_group_rows`` / ``row_group_bytes``: the row groups of the files written, as ``output.row_group_*``
    bound a run's (a source's ``rejected/`` file with no kept row is copied as it is)."""
    import duckdb

    src = Layout(Path(output_dir).expanduser().resolve())
    dst = Layout(Path(dest).expanduser().resolve())
    if not src.data.is_dir():
        raise InputError(f"refilter: {src.root} has no data/ directory")
    if dst.root == src.root:
        raise InputError("refilter: the destination must differ from the source output")
    if dst.root.exists() and any(dst.root.iterdir()):
        if not overwrite:
            raise InputError(f"refilter: {dst.root} is not empty; pass overwrite=True")
        first = next(iter(parquet_files(src.data)), None)
        if first is not None:  # a bad condition must fail before the old destination is deleted
            with duckdb.connect() as con:
                _mask(con, first, where, pq.read_metadata(first).num_rows)
        shutil.rmtree(dst.root)
    t0 = time.perf_counter()
    detail = f"refilter: not ({where})"
    con = duckdb.connect()
    if readonly_sql:
        from curate.sql_guard import lock_down

        lock_down(con, [src.data])
    kept_in = kept_out = 0
    try:
        for f in parquet_files(src.data):
            table = pq.read_table(f)
            mask = _mask(con, f, where, table.num_rows)
            kept_in += table.num_rows
            keep = table.filter(mask)
            kept_out += keep.num_rows
            write_parquet_atomic(keep, dst.data / f.name, compression, row_group_rows, row_group_bytes)
            dropped = _mark(table.filter(pc.invert(mask)), reason, stage_id, detail)
            old = src.rejected / f.name
            if old.exists():
                dropped = pa.concat_tables([pq.read_table(old), dropped], promote_options="permissive")
            write_parquet_atomic(dropped, dst.rejected / f.name, compression, row_group_rows, row_group_bytes)
        for f in parquet_files(src.rejected):  # shards whose rows were all rejected before
            if not (dst.rejected / f.name).exists():
                shutil.copyfile(f, dst.rejected / f.name)
    finally:
        con.close()
    stats = json.loads(src.stats.read_text()) if src.stats.exists() else {"run": {}, "stages": []}
    removed = kept_in - kept_out
    stats["stages"].append(stage_line("refilter", stage_id, kept_in, {reason: removed} if removed else {},
                                      seconds=time.perf_counter() - t0,
                                      info={"where": where, "source": str(src.root)}))
    run = stats["run"]
    by_reason = dict(run.get("rejected_by_reason") or {})
    if removed:
        by_reason[reason] = by_reason.get(reason, 0) + removed
    run.update({"kept": kept_out, "rejected": run.get("rejected", 0) + removed,
                "rejected_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))})
    write_json_atomic(stats, dst.stats)
    if src.config.exists():
        dst.config.write_text(f"# re-filtered from {src.root} keeping rows where: {where}\n" + src.config.read_text())
    return {"source": str(src.root), "dest": str(dst.root), "where": where, "kept_before": kept_in,
            "kept_after": kept_out, "removed": removed}
