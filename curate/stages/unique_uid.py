"""Built-in global step run right after ingest: a uid may appear once.

The first occurrence (by input file, then row) is kept; later ones are
rejected with ``duplicate_uid``.  Done per hash partition of the uid with
DuckDB, so no process ever holds every uid.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io import fs
from curate.io.sql import arrow
from curate.registry import register
from curate.stage import GlobalStage, Resources, StageParams

log = logging.getLogger(__name__)

ROWS_PER_PARTITION = 20_000_000


class UniqueUidParams(StageParams):
    stage: Literal["unique_uid"] = "unique_uid"


def _partition(args: tuple[list[str], str, int, int]) -> tuple[str, int] | None:
    """Rows of hash partition ``p`` of the uids whose uid was seen before: written to ``out`` (a local path
    or a URI); returns (``out``, its rows), or None when there are none."""
    files, out, p, parts = args
    import duckdb

    con = duckdb.connect()
    fs.register(con, files[:1])  # inputs on object storage: read through their fsspec filesystem
    con.execute("SET threads = 2")
    sql = f"""
        SELECT {S.SHARD}, {S.SOURCE_ROW}, {S.UID}, first_file, first_row FROM (
            SELECT {S.SHARD}, {S.SOURCE_ROW}, {S.UID},
                   row_number() OVER w AS rn,
                   first_value({S.SOURCE_FILE}) OVER w AS first_file,
                   first_value({S.SOURCE_ROW}) OVER w AS first_row
            FROM read_parquet($files)
            WHERE {S.REJECT_REASON} IS NULL AND hash({S.UID}) % $parts = $p
            WINDOW w AS (PARTITION BY {S.UID} ORDER BY {S.SHARD}, {S.SOURCE_ROW}
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
        ) WHERE rn > 1
    """
    table = arrow(con.sql(sql, params={"files": files, "parts": parts, "p": p}))
    if table.num_rows == 0:
        return None
    fs.write_table(table, out)
    return out, table.num_rows


_CACHE_SHARDS = 8


@register
class UniqueUid(GlobalStage):
    name = "unique_uid"
    Params = UniqueUidParams
    needs = (S.UID, S.SHARD, S.SOURCE_ROW)
    default_resources = Resources(num_cpus=0.25, batch_size=65536)

    def fit(self, ctx) -> Any:
        parts = max(1, math.ceil((ctx.total_rows or 0) / ROWS_PER_PARTITION))
        work = fs.as_path(ctx.work_dir)
        jobs = [(list(ctx.paths), str(work / f"dup-{p:04d}.parquet"), p, parts) for p in range(parts)]
        found = [o for o in ctx.map(_partition, jobs) if o]
        outs = [o for o, _ in found]
        n = sum(rows for _, rows in found)
        if n:
            log.warning("%d rows have a uid seen earlier in the input: rejected as duplicate_uid", n)
        return {"files": outs, "count": n}

    def setup(self) -> None:
        # duplicates of the last few shards this worker saw: bounded, whatever the number of batches
        self._cache: OrderedDict[str, dict[int, tuple[str, int]]] = OrderedDict()

    def _dups_for(self, shards: list[str]) -> dict[tuple[str, int], tuple[str, int]]:
        files = (self.state or {}).get("files") or []
        missing = [s for s in shards if s not in self._cache]
        if missing and files:  # the few partition files (local or URIs), only the row groups of these shards
            t = pa.concat_tables([fs.read_table(f, filters=[(S.SHARD, "in", missing)]) for f in files])
            for s in missing:
                self._cache[s] = {}
            for sh, row, ff, fr in zip(t[S.SHARD].to_pylist(), t[S.SOURCE_ROW].to_pylist(),
                                       t["first_file"].to_pylist(), t["first_row"].to_pylist()):
                self._cache[sh][row] = (ff, fr)
        out = {}
        for s in shards:
            for row, first in self._cache.get(s, {}).items():
                out[(s, row)] = first
        while len(self._cache) > max(_CACHE_SHARDS, len(shards)):
            self._cache.popitem(last=False)
        return out

    def process(self, table: pa.Table) -> pa.Table:
        if not (self.state or {}).get("count"):
            return table
        shards = pc.unique(table[S.SHARD]).to_pylist()
        dups = self._dups_for(shards)
        if not dups:
            return table
        keys = zip(table[S.SHARD].to_pylist(), table[S.SOURCE_ROW].to_pylist())
        firsts = [dups.get(k) for k in keys]
        mask = [f is not None for f in firsts]
        detail = [None if f is None else f"same uid as {Path(f[0]).name} row {f[1]}" for f in firsts]
        return self.reject(table, mask, "duplicate_uid", detail)
