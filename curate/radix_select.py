"""Exact order statistics of a float32 column over many parquet files, in bounded memory.

``select_rank(paths, column, rank_of)`` returns the value of the rows not yet
rejected (non-null, non-NaN) at a 0-based ascending rank, exactly as
``np.sort(values)[rank]`` would, without ever holding or sorting the column:
float32 values are mapped to uint32 keys whose unsigned order is the float
order; one pass counts the high 16 bits of the keys (per chunk of files, in
parallel under Ray), a second pass counts the low 16 bits inside the one
high bucket that holds the rank.  Memory: two sparse 65,536-bucket
histograms, whatever the corpus size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io.views import read_view, view_connection

_SIGN = np.uint32(0x80000000)
_LOW = np.uint32(0xFFFF)
_SHIFT = np.uint32(16)


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (negative floats: all bits flipped; others: sign bit set)."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where((raw & _SIGN) != 0, ~raw, raw | _SIGN).astype(np.uint32)


def key_value(key: int) -> float:
    """Inverse of :func:`sortable_keys` for one key."""
    raw = (key ^ 0x80000000) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([raw], dtype=np.uint32).view(np.float32)[0])


def active_values(table: pa.Table, column: str) -> np.ndarray:
    """float32 values of ``column`` on rows not rejected yet, nulls and NaN dropped."""
    v = table[column]
    keep = pc.is_valid(v)
    if S.REJECT_REASON in table.column_names:
        keep = pc.and_(keep, pc.is_null(table[S.REJECT_REASON]))
    x = v.filter(keep).to_numpy().astype(np.float32, copy=False)
    return x[~np.isnan(x)]


def _bucket_counts(args: tuple[list[str], str, int | None]) -> dict[int, int]:
    """Counts of high 16-bit key buckets, or with ``high`` given, of low 16 bits inside that bucket."""
    paths, column, high = args
    counts: dict[int, int] = {}
    con = view_connection()  # one for the task's shards
    try:
        for path in paths:  # one shard's fit view (or file) at a time
            t = read_view(path, [column, S.REJECT_REASON], con)  # a shard that never made `column` lacks it
            for lo in range(0, t.num_rows, 262_144):
                keys = sortable_keys(active_values(t.slice(lo, 262_144), column))
                sub = keys >> _SHIFT if high is None else keys[(keys >> _SHIFT) == np.uint32(high)] & _LOW
                uniq, n = np.unique(sub, return_counts=True)
                for k, c in zip(uniq.tolist(), n.tolist()):
                    counts[k] = counts.get(k, 0) + c
    finally:
        con.close()
    return counts


def _add(parts: list[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for part in parts:
        for k, c in part.items():
            out[k] = out.get(k, 0) + c
    return out


def _locate(counts: dict[int, int], rank: int) -> tuple[int, int]:
    """(bucket holding ascending rank ``rank``, rank inside that bucket)."""
    for k in sorted(counts):
        if rank < counts[k]:
            return k, rank
        rank -= counts[k]
    raise IndexError("rank beyond the number of values")


def select_rank(paths: list[str], column: str, rank_of: Callable[[int], int | None],
                run: Callable[[Callable, list], list] | None = None, parallelism: int = 16) -> tuple[int, float | None]:
    """(N, value at ascending 0-based rank ``rank_of(N)``), N = eligible values; None when no such rank.

    ``run(fn, items)`` maps ``fn`` over items (``FitContext.map``: Ray tasks under the Ray runner), in
    ``4 * parallelism`` tasks at most (64 at most): a task reads its shards through one DuckDB connection.
    """
    run = run or (lambda fn, items: [fn(x) for x in items])
    n_chunks = max(1, min(len(paths), 64, 4 * max(1, parallelism)))
    chunks = [c for c in (paths[i::n_chunks] for i in range(n_chunks)) if c]
    high = _add(run(_bucket_counts, [(c, column, None) for c in chunks]))
    n = sum(high.values())
    rank = rank_of(n)
    if rank is None or not 0 <= rank < n:
        return n, None
    bucket, inner = _locate(high, rank)
    low = _add(run(_bucket_counts, [(c, column, bucket) for c in chunks]))
    sub, _ = _locate(low, inner)
    return n, key_value((bucket << 16) | sub)
