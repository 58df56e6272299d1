"""Sorted views (issue #28; curate.serve.pages): a sort index per (view, column), paged by offset or keyset.

A sort index (:class:`SortIndex`) is one Parquet file of a view's rows in the order of one column --
``value`` (the column as DOUBLE), ``uid``, ``file``, ``row`` and the card columns, ascending, NULLS LAST,
ties by ``uid``, row groups of SORT_RG rows -- written once per (view, column) and state of the files
(:func:`build_sort_index`).  A page at any depth or after any keyset cursor (``VALUE|UID``) is then one or
two row-group reads (:func:`sorted_window`); a range filter on the sorted column is a slice of the index.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.rowgroups import RowGroups
from curate.io.sql import sql_string
from curate.serve.catalog import Snapshot, source_sql
from curate.serve.cursors import FILE_COL, Window, key_text

SORT_RG = 2048
KEYS = ("value", "uid")  # the columns a binary search over the index reads


class SortIndex:
    """One view's rows in the order of one column (see the module doc): asc, NULLS LAST, ties by uid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._groups = RowGroups(path, cache=32)  # a row group's keys and its full rows are cached apart
        self.pf = self._groups.pf
        md = self.pf.metadata
        self.starts = self._groups.starts
        self.n = self._groups.n
        self.nn = int(md.metadata.get(b"curate.non_null", b"0")) if md.metadata else 0
        self.carried = [c for c in self.pf.schema_arrow.names if c not in ("value", "uid", "file", "row")]

    def group(self, g: int, full: bool = False) -> pa.Table:
        """Row group ``g``: its keys (value, uid), or ``full``: every column."""
        return self._groups.group(g, None if full else KEYS)

    def slice(self, start: int, stop: int) -> pa.Table:
        """Index rows [start, stop) in ascending order, every column."""
        return self._groups.slice(start, stop)

    def _key(self, i: int) -> tuple:
        g = self._groups.group_of(i)
        t = self.group(g)
        j = i - int(self.starts[g])
        v = t.column("value")[j].as_py()
        return (1, 0.0, t.column("uid")[j].as_py()) if v is None else (0, v, t.column("uid")[j].as_py())

    def count_lt(self, key: tuple) -> int:
        """Index rows strictly before ``key`` ((0, value, uid), or (1, 0.0, uid) for NULL) in ascending order."""
        # binary search over row groups by their first row, then within one group
        glo, ghi = 0, len(self.starts) - 1
        while ghi - glo > 1:
            mid = (glo + ghi) // 2
            if self._key(int(self.starts[mid])) < key:
                glo = mid
            else:
                ghi = mid
        lo = int(self.starts[glo])
        t = self.group(glo) if self.n else None
        if t is None:
            return 0
        vals = t.column("value").to_pylist()
        uids = t.column("uid").to_pylist()
        keys = [(1, 0.0, u) if v is None else (0, v, u) for v, u in zip(vals, uids)]
        import bisect

        return lo + bisect.bisect_left(keys, key)

    def bound(self, value: float | None, uid: str, side: str) -> int:
        """Rows before (value, uid): ``lt`` strictly, ``le`` including it."""
        key = (1, 0.0, uid) if value is None else (0, float(value), uid)
        n = self.count_lt(key)
        if side == "le" and n < self.n and self._key(n) == key:
            n += 1
        return n

    def value_bound(self, value: float, side: str) -> int:
        """Non-null rows with value < ``value`` (``lt``) or <= ``value`` (``le``)."""
        if side == "lt":
            return self.count_lt((0, float(value), ""))
        return self.count_lt((0, float(value), "\U0010ffff" * 4))

    def rows(self, offset: int, count: int, desc: bool, lo: int = 0, hi: int | None = None) -> pa.Table:
        """``count`` rows from ``offset`` of the view in this order, restricted to index rows [lo, hi)
        (a range on the value: only non-null rows) -- or, without a range, the nulls after the rest."""
        if hi is not None:  # a value range: [lo, hi) only
            if desc:
                return self._rev(self.slice(max(lo, hi - offset - count), hi - offset))
            return self.slice(lo + offset, min(hi, lo + offset + count))
        nn = self.nn
        if not desc:
            return self.slice(offset, offset + count)
        parts = []
        if offset < nn:
            parts.append(self._rev(self.slice(max(0, nn - offset - count), nn - offset)))
        if offset + count > nn:
            parts.append(self.slice(max(nn, offset), offset + count))
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else self.slice(0, 0)

    @staticmethod
    def _rev(t: pa.Table) -> pa.Table:
        return t.take(pa.array(np.arange(t.num_rows - 1, -1, -1, dtype=np.int64))) if t.num_rows else t

    def offset_of(self, key: tuple[float | None, str], desc: bool, inclusive: bool, lo: int = 0,
                  hi: int | None = None) -> int:
        """How many rows of the ordered view (range [lo, hi) if given) come before the row ``key``
        (``inclusive``: up to and including it)."""
        value, uid = key
        if not desc or value is None:
            n = self.bound(value, uid, "le" if inclusive else "lt")
            return (min(max(n, lo), hi) - lo) if hi is not None else n
        # descending: the non-null part reversed; (value, uid desc)
        n_le = self.bound(value, uid, "le")
        n_lt = self.bound(value, uid, "lt")
        top = hi if hi is not None else self.nn
        first = top - (n_lt if inclusive else n_le)  # rows after it in ascending order come before it
        return max(0, first)


def sort_index_sql(src: str, column: str, carry: list[str] = ()) -> str:
    extra = "".join(f', "{c}"' for c in carry)
    return (f'SELECT CAST("{column}" AS DOUBLE) AS value, CAST(uid AS VARCHAR) AS uid, '
            f'parse_filename({FILE_COL}) AS file, CAST(file_row_number AS BIGINT) AS row{extra} '
            f'FROM {src} ORDER BY value ASC NULLS LAST, uid ASC')


def build_sort_index(con, snap: Snapshot, column: str, dest: Path, carry: list[str] = ()) -> Path:
    """Write the sort index of ``column`` over the snapshot's files to ``dest`` (atomically), carrying the
    ``carry`` columns (those some file has) so that a page of it is read from it alone."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    have = [i for i in range(len(snap.files)) if snap.has_column(i, column) and snap.has_column(i, S.UID)]
    carry = [c for c in carry if c not in ("value", "uid", "file", "row") and c != column
             and any(snap.files[i].schema.get_field_index(c) >= 0 for i in range(len(snap.files)))]
    if not have:
        empty = pa.table({"value": pa.array([], pa.float64()), "uid": pa.array([], pa.string()),
                          "file": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
        pq.write_table(empty.replace_schema_metadata({"curate.non_null": "0"}), tmp)
    else:
        sql = sort_index_sql(source_sql(snap, have, FILE_COL, True), column, carry)
        nn = con.execute(f'SELECT count("{column}") FROM {source_sql(snap, have)}').fetchone()[0]
        con.execute(f"COPY ({sql}) TO {sql_string(str(tmp))} (FORMAT parquet, ROW_GROUP_SIZE {SORT_RG}, "
                    f"COMPRESSION zstd, KV_METADATA {{'curate.non_null': '{int(nn)}'}})")
    os.replace(tmp, dest)
    return dest


def sorted_window(ix: SortIndex, snap: Snapshot, per: int, desc: bool, offset: int | None = None,
                  after: tuple | None = None, before: tuple | None = None, last: bool = False,
                  lo: float | None = None, hi: float | None = None) -> Window:
    """A page of a sorted view from its index (an optional value range [lo, hi] on the sorted column)."""
    rlo, rhi = 0, None
    if lo is not None or hi is not None:
        rlo = ix.value_bound(lo, "lt") if lo is not None else 0
        rhi = ix.value_bound(hi, "le") if hi is not None else ix.nn
        rhi = max(rhi, rlo)
    total = (rhi - rlo) if rhi is not None else ix.n
    if after is not None:
        offset = ix.offset_of(after, desc, True, rlo, rhi)
    elif before is not None:
        offset = max(0, ix.offset_of(before, desc, False, rlo, rhi) - per)
    elif last or (offset or 0) >= total:
        offset = max(0, (total - 1) // per * per)
    offset = max(0, min(offset or 0, max(0, total - 1)))
    t = ix.rows(offset, min(per, max(0, total - offset)), desc, rlo, rhi)
    idx = [snap.index.get(f, -1) for f in t.column("file").to_pylist()] if t.num_rows else []
    keep = [k for k, i in enumerate(idx) if i >= 0]
    w = Window(np.array([idx[k] for k in keep], np.int64),
               np.array([t.column("row")[k].as_py() for k in keep], np.int64), first=offset, total=total)
    if t.num_rows and len(keep) == t.num_rows and ix.carried:  # the cards come with the index: no other read
        cards = t.drop_columns(["value", "file", "row"]) \
            .append_column("_file", t.column("file")).append_column("_row", t.column("row"))
        w.cards = cards
    vals, uids = t.column("value").to_pylist() if t.num_rows else [], t.column("uid").to_pylist() if t.num_rows else []
    w.keys = [key_text(v, u) for v, u in zip(vals, uids)]
    w.has_prev, w.has_next = offset > 0, offset + t.num_rows < total
    if w.keys:
        w.before, w.after = w.keys[0], w.keys[-1]
    return w
