"""Bounded-memory plumbing of the dedup stages: DuckDB hash shuffles and the decision files.

*Shuffle.*  ``shuffle`` runs a SELECT over every input file in ``ctx.map`` tasks (groups of
files) and writes its rows hash-partitioned by a key column with DuckDB's
``COPY ... PARTITION_BY``; each partition is then reduced by one task reading only its own
files.  Total I/O is linear in the corpus and no task holds more than about one partition
(``rows_per_partition`` rows).  With a single partition the reduce reads the inputs directly.

*Decisions.*  Removed rows are written as ``(_shard, uid, duplicate_of, detail)`` parts,
bucketed by ``crc32(_shard) % buckets`` (one bucket per ``SHARDS_PER_BUCKET`` work shards),
then compacted to one file per bucket sorted by shard.  ``DecisionReader`` (used by
``process``) opens only the bucket of the shards in its batch, reading only their row groups,
and caches a bounded number of shards.

*Where.*  Every file here lives in the stage's work folder, a local ``Path`` or a ``UPath`` on
object storage (:mod:`curate.io.fs`): tasks get paths as strings and turn them back with
``fs.as_path``; a partition's files are found by one listing of its own folder (one LIST by key
prefix on object storage), never of the whole work folder.  DuckDB reads and writes URIs through
the fsspec filesystem registered on its connection; its spill folder is local scratch.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import weakref
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io import fs
from curate.io.sql import arrow, sql_list
from curate.io.views import view_refs, view_sql

log = logging.getLogger(__name__)

SHARDS_PER_BUCKET = 16
#: files per shuffle map task (each reads its files once)
FILES_PER_MAP_TASK = 64
DUCKDB_MEMORY_LIMIT = os.environ.get("CURATE_DUCKDB_MEMORY", "2GB")
DETAIL = "detail"
DECISION_SCHEMA = pa.schema([pa.field(S.SHARD, pa.string()), pa.field(S.UID, pa.string()),
                             pa.field(S.DUPLICATE_OF, pa.string()), pa.field(DETAIL, pa.string())])
_CACHE_SHARDS = 64


def threads() -> int:
    """Threads for one task: Ray sets OMP_NUM_THREADS to a task's CPUs; locally all cores."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))


def duckdb_connect(work_dir: Any, paths: Any = ()):
    """A DuckDB connection for a fit task: its spill folder is ``work_dir/duckdb_tmp``, or, for a work
    folder on object storage, a local scratch folder of this connection (removed with it); URIs among
    ``work_dir`` and ``paths`` (fit inputs) are readable and writable through their fsspec filesystems."""
    import duckdb

    if fs.is_uri(work_dir):
        tmp = tempfile.mkdtemp(prefix="curate-duckdb-")
    else:
        tmp = str(Path(work_dir) / "duckdb_tmp")
        os.makedirs(tmp, exist_ok=True)
    con = duckdb.connect(config={"temp_directory": tmp, "memory_limit": DUCKDB_MEMORY_LIMIT})
    if fs.is_uri(work_dir):
        weakref.finalize(con, shutil.rmtree, tmp, True)
    fs.register(con, [work_dir, *paths])
    con.execute(f"SET threads = {threads()}")
    con.execute("SET preserve_insertion_order = false")
    return con


def read_sql(paths: list[str]) -> str:
    """A DuckDB FROM-clause over fit inputs: plain Parquet files, or a runner's fit views (each resolved
    by :func:`curate.io.views.view_sql`: columns joined by position from where they were made)."""
    if not paths or not view_refs(paths[0]):  # fit inputs are all views or all plain files
        return f"read_parquet({sql_list(paths)}, union_by_name = true)"
    return "(" + " UNION ALL BY NAME ".join(f"SELECT * FROM {view_sql(p)}" for p in paths) + ")"


def duckdb_partition(values: np.ndarray, parts: int) -> np.ndarray:
    """``hash(v) % parts`` of uint64 values, computed by DuckDB: the partition ``shuffle`` gives them."""
    if parts == 1 or len(values) == 0:
        return np.zeros(len(values), np.int64)
    import duckdb

    con = duckdb.connect()
    con.register("_v", pa.table({"v": pa.array(np.asarray(values, np.uint64), pa.uint64())}))
    out = arrow(con.sql(f"SELECT CAST(hash(v) % {int(parts)} AS BIGINT) AS p FROM _v"))["p"].to_numpy()
    con.close()
    return out


def n_partitions(rows: int | None, rows_per_partition: int) -> int:
    return max(1, math.ceil((rows or 0) / rows_per_partition))


def file_groups(paths: list[str], per_group: int = FILES_PER_MAP_TASK) -> list[list[str]]:
    return [paths[i:i + per_group] for i in range(0, len(paths), per_group)] or [[]]


def _shuffle_map(args: tuple[list[str], str, int, str, str]) -> None:
    files, select, parts, out, work = args
    con = duckdb_connect(work, files[:1])
    sql = select.format(src=read_sql(files))
    con.execute(f"COPY (SELECT *, hash(_k) % {parts} AS _p FROM ({sql})) TO '{out}' "
                "(FORMAT parquet, PARTITION_BY (_p), OVERWRITE_OR_IGNORE true)")
    con.close()


def shuffle(ctx: Any, select: str, parts: int, out: Any) -> list[str | None]:
    """Hash-partition the rows of ``select`` (a SELECT over ``{src}`` with a ``_k`` column) by ``_k``.

    Returns one DuckDB FROM-clause per partition (None when a partition got no rows); it reads the
    fit inputs (parts == 1) or files under ``out``: a connection made by :func:`duckdb_connect` with
    ``ctx.work_dir`` and ``ctx.paths`` reads it.
    """
    if parts == 1:
        return [f"({select.format(src=read_sql(ctx.paths))})"] if ctx.paths else [None]
    out = fs.as_path(out)
    fs.remove(out)
    fs.makedirs(out)
    jobs = [(g, select, parts, str(out / f"m{j:05d}"), str(ctx.work_dir))
            for j, g in enumerate(file_groups(ctx.paths))]
    ctx.map(_shuffle_map, jobs)
    by_part: dict[int, list[str]] = {}
    for f in fs.listdir(out, suffix=".parquet", recursive=True):  # one listing: mNNNNN/_p=P/*.parquet
        d = f.parent.name
        if d.startswith("_p="):
            by_part.setdefault(int(d[3:]), []).append(str(f))
    sources: list[str | None] = []
    for p in range(parts):
        files = sorted(by_part.get(p, []))
        sources.append(f"read_parquet({sql_list(files)}, hive_partitioning = false)" if files else None)
    return sources


# -- partitioned parquet parts ------------------------------------------------------------
def write_partitioned(table: pa.Table, part: np.ndarray, out: Any, name: str) -> None:
    """Write the rows of ``table`` to ``out/pNNNNN/name.parquet`` by their partition number (``out``: a
    path or its string, local or a URI)."""
    if table.num_rows == 0:
        return
    out = fs.as_path(out)
    small = part.astype(np.int16) if part.max(initial=0) < 2**15 else part
    order = np.argsort(small, kind="stable")  # radix sort for 16-bit ids
    sp = part[order]
    cuts = np.flatnonzero(np.diff(sp)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(sp)]):
        d = out / f"p{int(sp[lo]):05d}"
        fs.makedirs(d)
        fs.write_table(table.take(pa.array(order[lo:hi])), d / f"{name}.parquet", compression="none")


def partition_files(out: Any, p: int) -> list[str]:
    """The files of partition ``p`` under ``out`` (one listing of its folder), sorted."""
    out = fs.as_path(out)
    return [str(f) for f in fs.listdir(out / f"p{p:05d}", suffix=".parquet")]


def partitions(out: Any) -> list[int]:
    """The partition numbers with files under ``out`` (one listing of its sub-folders)."""
    out = fs.as_path(out)
    return sorted(int(d.name[1:]) for d in fs.subdirs(out, prefix="p") if d.name[1:].isdigit())


def read_files(files: list[str], **kw: Any) -> list[pa.Table]:
    """Every file of ``files`` (local paths or URIs) as a table."""
    return [fs.read_table(f, **kw) for f in files]


def shard_bucket(shards: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Bucket of every row's shard: ``crc32(shard) % buckets`` (the same in every process)."""
    enc = pc.dictionary_encode(shards)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    per = np.array([zlib.crc32(s.encode()) % buckets for s in enc.dictionary.to_pylist()], np.int64)
    return per[enc.indices.to_numpy(zero_copy_only=False)] if len(per) else np.zeros(0, np.int64)


# -- decisions ----------------------------------------------------------------------------
def decisions_table(shards: Any, uids: Any, dup_of: Any, detail: Any) -> pa.Table:
    return pa.Table.from_arrays([pa.array(x, pa.string()) if not isinstance(x, (pa.Array, pa.ChunkedArray))
                                 else x.cast(pa.string()) for x in (shards, uids, dup_of, detail)],
                                schema=DECISION_SCHEMA)


def write_decisions(table: pa.Table, parts_dir: Any, name: str, buckets: int) -> int:
    """Write removed rows of one task as parts bucketed by shard; returns the row count."""
    if table.num_rows:
        write_partitioned(table, shard_bucket(table[S.SHARD], buckets), fs.as_path(parts_dir), name)
    return table.num_rows


def n_buckets(n_shards: int) -> int:
    return max(1, math.ceil(n_shards / SHARDS_PER_BUCKET))


def _compact(args: tuple[str, int, str]) -> int:
    parts_dir, b, out = args
    files = partition_files(parts_dir, b)
    if not files:
        return 0
    t = pa.concat_tables(read_files(files)).sort_by([(S.SHARD, "ascending"), (S.UID, "ascending")])
    fs.write_table(t, out, row_group_size=8192)  # whole or not at all (a temp file renamed; an object upload)
    return t.num_rows


def compact_decisions(ctx: Any, parts_dir: Any, buckets: int) -> dict[str, Any]:
    """One sorted file per shard bucket under ``work_dir/decisions``; returns the reader's state."""
    out = fs.as_path(ctx.work_dir) / "decisions"
    fs.remove(out)
    fs.makedirs(out)
    parts_dir = fs.as_path(parts_dir)
    todo = [b for b in partitions(parts_dir) if b < buckets]
    counts = ctx.map(_compact, [(str(parts_dir), b, str(out / f"b{b:05d}.parquet")) for b in todo])
    fs.remove(parts_dir)
    return {"dir": str(out), "buckets": buckets, "rows": int(sum(counts))}


class DecisionReader:
    """``process``-side lookup of removed rows: reads only the bucket files of the batch's shards."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        self.state = state or {}
        self._cache: OrderedDict[str, dict[str, tuple[str, str]]] = OrderedDict()

    def _load(self, shards: list[str]) -> None:
        missing = [s for s in shards if s not in self._cache]
        if not missing or not self.state.get("rows"):
            return
        buckets = self.state["buckets"]
        for s in missing:
            self._cache[s] = {}
        by_bucket: dict[int, list[str]] = {}
        for s in missing:
            by_bucket.setdefault(zlib.crc32(s.encode()) % buckets, []).append(s)
        folder = fs.as_path(self.state["dir"])
        for b, shs in by_bucket.items():
            try:  # a bucket without removed rows has no file (no request made to check first)
                t = fs.read_table(folder / f"b{b:05d}.parquet", filters=[(S.SHARD, "in", shs)])
            except FileNotFoundError:
                continue
            for sh, uid, dup, det in zip(*(t[c].to_pylist() for c in DECISION_SCHEMA.names)):
                self._cache[sh][uid] = (dup, det)
        while len(self._cache) > max(_CACHE_SHARDS, len(shards)):
            self._cache.popitem(last=False)

    def lookup(self, shards: pa.ChunkedArray, uids: pa.ChunkedArray) -> tuple[list, list, list] | None:
        uniq = pc.unique(shards).to_pylist()
        self._load(uniq)
        if not any(self._cache.get(s) for s in uniq):
            return None
        hits = [self._cache[s].get(u) for s, u in zip(shards.to_pylist(), uids.to_pylist())]
        return ([h is not None for h in hits], [h[0] if h else None for h in hits],
                [h[1] if h else None for h in hits])
