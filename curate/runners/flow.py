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
(``_work/view-k/SHARD.parquet``, written when the previous segment finished the shard) that
copies no column: it holds the positions of the live rows and names, per column the fit reads,
the base or column group holding it; :func:`curate.io.views.view_sql` (where fit inputs are read)
joins them by position in DuckDB.  Groups may consist of several part files (one per Ray batch); parts are named
by their positions, so a retried write replaces its own part and duplicate rows collapse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.io import fs
from curate.io.files import write_parquet_atomic
from curate.io.views import BASE, POS, REFS, first_per_position
from curate.io.views import read_view, view_refs, view_schema  # noqa: F401 - their old names (tests import them)
from curate.layout import Layout
from curate.stage import DETAIL, ERROR, HIT, REASON, VALUE


def part_gen(name: str) -> int:
    """The generation of a part file: ``SHARD~gG~LO-HI-N.parquet`` (older outputs: ``SHARD~LO-HI-N``, 0)."""
    bits = name.split("~")
    return int(bits[1][1:]) if len(bits) == 3 and bits[1][:1] == "g" and bits[1][1:].isdigit() else 0


def all_group_files(layout: Layout, k: int, shard: str) -> list[Any]:
    """Every part file of segment ``k`` of a shard, of every generation (one listing by prefix)."""
    return fs.listdir(layout.segment_out(k), prefix=f"{shard}~", suffix=".parquet")


def group_files(layout: Layout, k: int, shard: str, files: list[Any] | None = None) -> list[Any]:
    """The part files of segment ``k``'s column group of a shard in this run's generation, in position order."""
    g = layout.gen(k)
    return [f for f in (all_group_files(layout, k, shard) if files is None else files) if part_gen(f.name) == g]


def cert_path(layout: Layout, k: int, shard: str, gen: int) -> Any:
    """The *certificate* of a shard's column group of segment ``k`` in generation ``gen``: a copy of its done
    marker, written after it, kept next to the parts (an invalidated run deletes the markers, not the parts).
    It vouches that the generation's parts are the shard's whole group: a later generation may carry them
    forward unchanged (:mod:`curate.runners.carry`)."""
    return layout.segment_out(k) / f"{shard}~g{gen}~done.json"


def group_certs(layout: Layout, k: int, shard: str) -> dict[int, Any]:
    """Generation -> the certificate of segment ``k``'s group of a shard, for each generation that has one."""
    return {part_gen(f.name): f for f in fs.listdir(layout.segment_out(k), prefix=f"{shard}~", suffix="~done.json")}


def remove_group(layout: Layout, k: int, shard: str) -> None:
    """Drop what an interrupted run wrote of a shard's column group (this generation's parts only: the older
    ones are the row cache)."""
    for f in group_files(layout, k, shard):
        fs.remove(f)
    fs.remove(cert_path(layout, k, shard, layout.gen(k)))


def prune_old(layout: Layout, k: int, shard: str) -> None:
    """Drop the parts (and certificates) of older generations once the shard's segment is done in this one."""
    g = layout.gen(k)
    if g == 0:
        return
    for f in fs.listdir(layout.segment_out(k), prefix=f"{shard}~"):
        if (f.name.endswith(".parquet") or f.name.endswith("~done.json")) and part_gen(f.name) < g:
            fs.remove(f)


def done_shards(layout: Layout, k: int) -> set[str]:
    """The shards with a done marker of segment ``k`` (one listing of its marker folder)."""
    return {f.name[:-len(".json")] for f in fs.listdir(layout.done(f"seg-{k}"), suffix=".json")}


def view_path(layout: Layout, k: int, shard: str) -> Any:
    return layout.work / f"view-{k}" / f"{shard}.parquet"


def read_base(path: str | Path) -> pa.Table:
    t = fs.read_table(path)
    return t.append_column(POS, pa.array(np.arange(t.num_rows, dtype=np.int64)))


def read_group(layout: Layout, k: int, shard: str, columns: list[str] | None = None,
               known: "ShardRows | None" = None) -> pa.Table | None:
    """Segment ``k``'s column group of a shard (``columns``: those only), sorted by position, duplicate
    positions collapsed.  ``known``: where to note the part files and their columns (read whole), so that
    :func:`view_sources` asks the store for neither again."""
    files = group_files(layout, k, shard)
    if known is not None and columns is None:
        known.files[k] = files
    if not files:
        return None
    cols = None if columns is None else list(dict.fromkeys([POS, *columns]))
    parts = [fs.read_table(f, columns=cols) for f in files]
    if known is not None and columns is None:
        known.names.update({str(f): t.column_names for f, t in zip(files, parts)})
    # a retried batch written twice: identical rows
    return first_per_position(pa.concat_tables(parts, promote_options="permissive").sort_by(POS))


def group_columns(table: pa.Table, produced: Iterable[str]) -> list[str]:
    return [POS] + [c for c in dict.fromkeys(produced) if c in table.column_names and c not in S.REJECT_COLUMNS] \
        + [c for c in S.REJECT_COLUMNS if c in table.column_names]


def write_group(layout: Layout, k: int, shard: str, table: pa.Table, produced: Iterable[str],
                compression: str, cache: "RowCache | None" = None) -> str:
    """One part of segment ``k``'s column group (named by its generation and positions: a rewrite replaces
    it).  ``cache``: the segment's stages and row fingerprints, kept in the part's metadata so that a later
    generation can reuse what it holds (:func:`attach_cache`)."""
    t = table.select(group_columns(table, produced)).sort_by(POS)
    if cache is not None:
        t = t.replace_schema_metadata({CACHE_META: cache.meta()})
    pos = t[POS]
    lo, hi = (pc.min(pos).as_py(), pc.max(pos).as_py()) if t.num_rows else (0, -1)
    path = layout.segment_out(k) / f"{shard}~g{layout.gen(k)}~{lo:010d}-{hi:010d}-{t.num_rows}.parquet"
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

    def __init__(self, layout: Layout, shard: str, base_path: str | Path) -> None:
        self.layout, self.shard, self.base_path = layout, shard, base_path
        self._base: pa.Table | None = None
        self._groups: dict[int, pa.Table | None] = {}
        #: what was read or written of the shard: segment -> its group's part files, file -> its columns
        self.files: dict[int, list[Any]] = {}
        self.names: dict[str, list[str]] = {}

    def base(self) -> pa.Table:
        if self._base is None:
            self._base = read_base(self.base_path)
            self.names[str(self.base_path)] = self._base.column_names[:-1]  # the file's columns (not __pos)
        return self._base

    def wrote(self, k: int, path: Any, columns: list[str]) -> None:
        """Segment ``k`` wrote its group of the shard as the one file ``path`` with ``columns``."""
        self.files[k] = [fs.as_path(str(path))]
        self.names[str(self.files[k][0])] = list(columns)

    def group(self, k: int) -> pa.Table:
        if k not in self._groups:
            self._groups[k] = read_group(self.layout, k, self.shard, known=self)
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


def _schema_names(path: str | Path, cache: dict[str, list[str]]) -> list[str]:
    key = str(path)
    if key not in cache:
        cache[key] = fs.read_schema(path).names
    return cache[key]


def view_sources(layout: Layout, k: int, shard: str, base_path: str | Path, columns: list[str],
                 known: ShardRows | None = None) -> dict[str, list[Any]]:
    """Where segment ``k``'s fit view of a shard finds each of its ``columns``: the part files of the
    latest column group before ``k`` that made it, else the shard's base.  A column neither holds
    (no row of the shard reached the stage that makes it) is left out.  ``known``: the shard's rows as the
    segment read and wrote them (their files and columns are not asked of the store again)."""
    cache: dict[str, list[str]] = dict(known.names) if known is not None else {}
    groups = [known.files[j] if known is not None and j in known.files else group_files(layout, j, shard)
              for j in range(k)]
    out: dict[str, list[Any]] = {}
    for c in dict.fromkeys(columns):
        for j in range(k - 1, -1, -1):
            having = [f for f in groups[j] if c in _schema_names(f, cache)]
            if having:
                out[c] = having
                break
        else:
            if c in _schema_names(base_path, cache):
                out[c] = [fs.as_path(str(base_path))]
    return out


def _rel(layout: Layout, f: Any) -> str:
    """``f`` relative to the work folder (a view stays valid when the folder moves), else as it is."""
    work, name = str(layout.work).rstrip("/") + "/", str(f)
    return name[len(work):] if name.startswith(work) else name


def write_view(layout: Layout, k: int, shard: str, live_pos: pa.Array, base_path: str | Path, columns: list[str],
               schema: pa.Schema, compression: str, sources: dict[str, list[Path]]) -> None:
    """The fit view of segment ``k`` for a shard: the positions of its live rows, and where the ``columns``
    its global stage's fit reads are (``sources``, :func:`view_sources`) -- the view copies none of them.

    Every view has the same columns: one no file holds is stored in the view as nulls of the pipeline
    ``schema``'s type.  :mod:`curate.io.views` (``view_sql`` / ``read_view`` / ``view_schema``) resolves a view."""
    pos = live_pos.combine_chunks() if isinstance(live_pos, pa.ChunkedArray) else live_pos
    out = pa.table({POS: pa.array(np.sort(pos.to_numpy(zero_copy_only=False)).astype(np.int64))})
    for c in dict.fromkeys(columns):
        if c not in sources and c in schema.names:
            out = out.append_column(schema.field(c), pa.nulls(out.num_rows, schema.field(c).type))
    refs = {c: [_rel(layout, f) for f in files] for c, files in sources.items()}
    out = out.replace_schema_metadata({REFS: json.dumps(refs), BASE: _rel(layout, base_path)})
    write_parquet_atomic(out, view_path(layout, k, shard), compression)


def live_count(path: str | Path) -> int:
    """Rows of an ingest shard not rejected at ingest (from the Parquet footer's null count when present)."""
    md = fs.read_metadata(path)
    names = md.schema.to_arrow_schema().names
    if S.REJECT_REASON not in names:
        return md.num_rows
    j = names.index(S.REJECT_REASON)
    nulls = 0
    for r in range(md.num_row_groups):
        st = md.row_group(r).column(j).statistics
        if st is None or not st.has_null_count:
            col = fs.read_table(path, columns=[S.REJECT_REASON])[S.REJECT_REASON]
            return col.null_count
        nulls += st.null_count
    return nulls


# -- the row cache: what an older generation of a segment's column group holds --------------------------------

CACHE_META = "curate.rows"  # a part's metadata key: its segment's stages, their row fingerprints and columns


@dataclass
class RowCache:
    """The row cache of one segment: its stages in order (the head first), each with its *row fingerprint*
    (:func:`curate.incremental.row_fingerprints`; None: never reused) and the columns it makes; ``retry``:
    stage id -> error types whose rejections are not reused but run again (``--retry-failed``)."""

    order: list[str]
    fps: dict[str, str | None]
    produces: dict[str, list[str]]
    retry: dict[str, list[str]] = field(default_factory=dict)

    def meta(self) -> str:
        return json.dumps({"order": self.order, "fps": self.fps, "produces": self.produces})

    def reusable(self) -> list[str]:
        return [sid for sid in self.order if self.fps.get(sid)]

    def retried(self, sid: str, error: str | None) -> bool:
        """Whether a row stage ``sid`` rejected with error type ``error`` is run again (``--retry-failed``)."""
        return error is not None and any(fnmatchcase(error, p) for p in self.retry.get(sid, ()))


def _cached_rows(t: pa.Table, gen: int, cache: RowCache) -> dict[str, pa.Table]:
    """Stage id -> the results one older part holds for it (positions, values, rejection), for the stages
    whose row fingerprint is the same now and that ran on the row then."""
    raw = (t.schema.metadata or {}).get(CACHE_META.encode())
    if not raw or not t.num_rows:
        return {}  # a part written before the row cache: nothing to reuse
    meta = json.loads(raw)
    order, fps, made = meta["order"], meta["fps"], meta["produces"]
    at = {sid: i for i, sid in enumerate(order)}
    stage_col = t[S.REJECT_STAGE].to_pylist() if S.REJECT_STAGE in t.column_names else [None] * t.num_rows
    # the index of the stage that rejected the row (every stage ran before it; none after); len(order): none did
    last = np.array([len(order) if r is None else at.get(r, -1) for r in stage_col])
    errors = None  # the error types, read when a stage's rejections are retried
    out = {}
    for sid in cache.reusable():
        i = at.get(sid)
        if i is None or fps.get(sid) != cache.fps[sid]:
            continue
        cols = cache.produces.get(sid, [])
        if any(c in made.get(later, ()) for later in order[i + 1:] for c in cols):
            continue  # a later stage of that segment overwrote what this one made
        if any(c not in t.column_names for c in cols):
            continue  # not kept in the part: nothing to reuse
        ran = last >= i
        rejected_here = np.array([r == sid for r in stage_col])
        if sid in cache.retry:  # rejected with an error type to retry: fetched again, not reused
            if errors is None:
                errors = np.array(t[S.ERROR_TYPE].to_pylist() if S.ERROR_TYPE in t.column_names
                                  else [None] * t.num_rows, dtype=object)
            again = {e for e in set(errors[rejected_here]) if cache.retried(sid, e)}
            ran &= ~(rejected_here & np.isin(errors, list(again)))
        if not ran.any():
            continue
        keep = pa.array(ran)
        sel = t.filter(keep).combine_chunks()
        here = pa.array(rejected_here[ran])
        arrays = {POS: sel[POS], "__gen": pa.array(np.full(sel.num_rows, gen, np.int64))}
        for c in cols:
            if c in sel.column_names:
                arrays[VALUE + sid + ":" + c] = sel[c]
        for prefix, c in ((REASON, S.REJECT_REASON), (DETAIL, S.REJECT_DETAIL), (ERROR, S.ERROR_TYPE)):
            col = sel[c] if c in sel.column_names else pa.nulls(sel.num_rows, pa.string())
            arrays[prefix + sid] = pc.if_else(here, col, pa.scalar(None, col.type))
        out[sid] = pa.table(arrays)
    return out


def attach_cache(layout: Layout, k: int, shard: str, table: pa.Table, cache: RowCache | None) -> pa.Table:
    """The rows entering segment ``k`` with, per stage of it, the result an older generation of the shard's
    column group holds for the row (newest first) -- :func:`curate.stage.apply_to_active` reuses it instead
    of running the stage on the row."""
    if cache is None or not cache.reusable() or not table.num_rows or layout.gen(k) == 0:
        return table
    g = layout.gen(k)
    found: dict[str, list[pa.Table]] = {}
    for f in all_group_files(layout, k, shard):
        gen = part_gen(f.name)
        if gen >= g:
            continue
        for sid, part in _cached_rows(fs.read_table(f), gen, cache).items():
            found.setdefault(sid, []).append(part)
    pos = table[POS]
    for sid, parts in found.items():
        m = first_per_position(  # the newest generation's result of each row
            pa.concat_tables(parts, promote_options="permissive").sort_by([(POS, "ascending"), ("__gen", "descending")]))
        idx = pc.index_in(pos, value_set=m[POS])
        table = table.append_column(HIT + sid, pc.is_valid(idx))
        for name in m.column_names:
            if name not in (POS, "__gen"):
                table = table.append_column(name, m[name].take(idx))
    return table
