"""Where a shard's rows live between segments: live rows only, each column written once.

A work shard starts as its ingest file (the *base*).  Every row of it has a position
``__pos`` there.  Segment ``k`` reads the rows still live at its start and writes a *column
group* ``_work/seg-k/SHARD~*.parquet`` (flat: a folder per shard and segment would cost a
directory block, more than a small shard's column group): for exactly those rows, ``__pos``, the columns its
stages produce and the reject columns.  So

* a row rejected in segment ``k`` leaves the flow there: later segments never read or write
  it again; its columns are those of the base and of the groups up to ``k``;
* a column is written once, by the segment that made it: image bytes are written by the
  download segment and by the final output, never by the segments between them.

The rows entering segment ``k`` are assembled from the base and the groups ``< k`` by
position (reads only).  A global stage's ``fit`` reads a *view* per shard
(``_work/view-k/SHARD.parquet``): the live rows with their light columns (no image bytes,
no embeddings unless the stage names them), written when the previous segment finished
the shard.  Groups may consist of several part files (one per Ray batch); parts are named
by their positions, so a retried write replaces its own part and duplicate rows collapse.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema as S
from curate.io.files import write_parquet_atomic
from curate.layout import Layout

POS = "__pos"
REFS = "curate.refs"  # fit view metadata: {column: [group part files holding it, relative to _work/]}


def is_heavy(t: pa.DataType) -> bool:
    """Column types a view leaves out unless asked for: bytes and vectors."""
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_list(t)
            or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def group_files(layout: Layout, k: int, shard: str) -> list[Path]:
    """The part files of segment ``k``'s column group of a shard, in position order."""
    return sorted(layout.segment_out(k).glob(f"{glob.escape(shard)}~*.parquet"))


def remove_group(layout: Layout, k: int, shard: str) -> None:
    """Drop what an interrupted run wrote of a shard's column group."""
    for f in group_files(layout, k, shard):
        f.unlink(missing_ok=True)


def view_path(layout: Layout, k: int, shard: str) -> Path:
    return layout.work / f"view-{k}" / f"{shard}.parquet"


def _columns(path: str | Path, heavy_kept: list[str] | None) -> list[str] | None:
    """Columns to read: all (None), or all but the heavy ones not in ``heavy_kept``."""
    if heavy_kept is None:
        return None
    return [f.name for f in pq.read_schema(path) if not is_heavy(f.type) or f.name in heavy_kept]


def read_base(path: str | Path, heavy_kept: list[str] | None = None) -> pa.Table:
    t = pq.read_table(path, columns=_columns(path, heavy_kept))
    return t.append_column(POS, pa.array(np.arange(t.num_rows, dtype=np.int64)))


def read_group(layout: Layout, k: int, shard: str, heavy_kept: list[str] | None = None) -> pa.Table | None:
    """Segment ``k``'s column group of a shard, sorted by position, duplicate positions collapsed."""
    files = group_files(layout, k, shard)
    if not files:
        return None
    t = pa.concat_tables([pq.read_table(f, columns=_columns(f, heavy_kept)) for f in files],
                         promote_options="permissive").sort_by(POS)
    pos = t[POS].to_numpy()
    if len(pos) > 1 and (pos[1:] == pos[:-1]).any():  # a retried batch written twice: identical rows
        keep = np.r_[True, pos[1:] != pos[:-1]]
        t = t.filter(pa.array(keep))
    return t


def group_columns(table: pa.Table, produced: Iterable[str]) -> list[str]:
    return [POS] + [c for c in dict.fromkeys(produced) if c in table.column_names and c not in S.REJECT_COLUMNS] \
        + [c for c in S.REJECT_COLUMNS if c in table.column_names]


def write_group(layout: Layout, k: int, shard: str, table: pa.Table, produced: Iterable[str],
                compression: str) -> str:
    """One part of segment ``k``'s column group (named by its positions: a rewrite replaces it)."""
    t = table.select(group_columns(table, produced)).sort_by(POS)
    pos = t[POS]
    lo, hi = (pc.min(pos).as_py(), pc.max(pos).as_py()) if t.num_rows else (0, -1)
    path = layout.segment_out(k) / f"{shard}~{lo:010d}-{hi:010d}-{t.num_rows}.parquet"
    write_parquet_atomic(t, path, compression)
    return str(path)


def _take(t: pa.Table, pos: pa.Array) -> pa.Table:
    idx = pc.index_in(pos, value_set=t[POS])
    if idx.null_count:
        raise RuntimeError(f"{idx.null_count} rows missing from a column group -- the work folder is damaged")
    return t.take(idx)


def _overlay(t: pa.Table, g: pa.Table) -> pa.Table:
    """Columns of group ``g`` (same rows, same order) set on ``t``; the later group wins."""
    for name in g.column_names:
        if name == POS:
            continue
        col = g[name]
        i = t.schema.get_field_index(name)
        t = t.set_column(i, pa.field(name, col.type), col) if i >= 0 else t.append_column(pa.field(name, col.type), col)
    return t


def live(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t[S.REJECT_REASON]))


class ShardRows:
    """The rows of one shard across segments (reads the base and the groups lazily, once each)."""

    def __init__(self, layout: Layout, shard: str, base_path: str | Path, heavy_kept: list[str] | None = None) -> None:
        """``heavy_kept``: read only the light columns and these heavy ones (None: every column)."""
        self.layout, self.shard, self.base_path, self.heavy_kept = layout, shard, base_path, heavy_kept
        self._base: pa.Table | None = None
        self._groups: dict[int, pa.Table | None] = {}

    def base(self) -> pa.Table:
        if self._base is None:
            self._base = read_base(self.base_path, self.heavy_kept)
        return self._base

    def group(self, k: int) -> pa.Table:
        if k not in self._groups:
            self._groups[k] = read_group(self.layout, k, self.shard, self.heavy_kept)
        g = self._groups[k]
        if g is None:
            raise RuntimeError(f"shard {self.shard}: no output of segment {k} -- the work folder is damaged")
        return g

    def live_positions(self, k: int) -> pa.Array:
        """Positions of the rows live at the start of segment ``k``."""
        src = self.base() if k == 0 else self.group(k - 1)
        return live(src)[POS].combine_chunks()

    def rows(self, pos: pa.Array, upto: int) -> pa.Table:
        """Rows at ``pos`` with the columns of the base and of groups ``0..upto-1``."""
        t = _take(self.base(), pos)
        for j in range(upto):
            t = _overlay(t, _take(self.group(j), pos))
        return t

    def entering(self, k: int) -> pa.Table:
        """The rows entering segment ``k`` (live at its start), every column they have."""
        return self.rows(self.live_positions(k), k)

    def rejected_before(self, k: int) -> list[pa.Table]:
        """Rows rejected at ingest or in segments ``< k``, each with the columns it had then."""
        out = [self.base().filter(pc.is_valid(self.base()[S.REJECT_REASON]))]
        for j in range(k):
            g = self.group(j)
            pos = g.filter(pc.is_valid(g[S.REJECT_REASON]))[POS].combine_chunks()
            if len(pos):
                out.append(self.rows(pos, j + 1))
        return [t for t in out if t.num_rows]


def _holders(layout: Layout, k: int, shard: str, column: str) -> list[Path]:
    """Part files of the latest column group before segment ``k`` that made ``column`` (none: not made by one)."""
    for j in range(k - 1, -1, -1):
        files = group_files(layout, j, shard)
        having = [f for f in files if column in pq.read_schema(f).names]
        if having:
            return having
    return []


def view_sources(layout: Layout, k: int, shard: str, columns: list[str], schema: pa.Schema) -> dict[str, list[Path]]:
    """Heavy columns (embeddings) of segment ``k``'s fit view that an earlier column group holds:
    column -> those part files.  The view references them instead of copying them, so they need not
    be read to write it."""
    out = {}
    for c in dict.fromkeys(columns):
        if c in schema.names and is_heavy(schema.field(c).type):
            files = _holders(layout, k, shard, c)
            if files:
                out[c] = files
    return out


def write_view(layout: Layout, k: int, shard: str, live_rows: pa.Table, columns: list[str], schema: pa.Schema,
               compression: str, sources: dict[str, list[Path]]) -> None:
    """The fit view of segment ``k`` for a shard: its live rows with the ``columns`` its global stage's fit reads.

    Every view has the same columns: one the rows lack (a shard none of whose rows reached the stages
    that make it) is added as nulls of the pipeline ``schema``'s type.  The columns in ``sources``
    (:func:`view_sources`) are not copied: the view keeps ``__pos`` and names their group files in its
    metadata (``REFS``); :func:`view_refs` / :func:`view_schema` resolve them."""
    t = live_rows
    for c in dict.fromkeys(columns):
        if c not in t.column_names and c in schema.names and c not in sources:
            t = t.append_column(schema.field(c), pa.nulls(t.num_rows, schema.field(c).type))
    cols = [c for c in dict.fromkeys(columns) if c in t.column_names and c not in sources]
    out = t.select(cols + ([POS] if sources else []))
    if sources:
        refs = {c: [str(f.relative_to(layout.work)) for f in files] for c, files in sources.items()}
        out = out.replace_schema_metadata({REFS: json.dumps(refs)})
    write_parquet_atomic(out, view_path(layout, k, shard), compression)


def view_refs(path: str | Path) -> dict[str, list[str]]:
    """Columns a fit view holds by reference: column -> the group part files with its values (by ``__pos``)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(REFS.encode())
    if not raw:
        return {}
    work = Path(path).resolve().parent.parent
    return {c: [str(work / f) for f in files] for c, files in json.loads(raw).items()}


def view_schema(path: str | Path) -> pa.Schema:
    """Schema of a fit input as its fit sees it: a view's referenced columns included."""
    schema = pq.read_schema(path)
    for c, files in view_refs(path).items():
        schema = schema.append(pq.read_schema(files[0]).field(c))
    return schema


def live_count(path: str | Path) -> int:
    """Rows of an ingest shard not rejected at ingest (from the Parquet footer's null count when present)."""
    md = pq.read_metadata(path)
    names = md.schema.to_arrow_schema().names
    if S.REJECT_REASON not in names:
        return md.num_rows
    j = names.index(S.REJECT_REASON)
    nulls = 0
    for r in range(md.num_row_groups):
        st = md.row_group(r).column(j).statistics
        if st is None or not st.has_null_count:
            col = pq.read_table(path, columns=[S.REJECT_REASON])[S.REJECT_REASON]
            return col.null_count
        nulls += st.null_count
    return nulls
