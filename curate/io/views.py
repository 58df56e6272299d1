"""Reading a global stage's fit input: a plain Parquet file, or a runner's *fit view* of a shard.

A fit view (``_work/view-k/SHARD.parquet``, written by :func:`curate.runners.flow.write_view`) copies
no column: it holds the positions (``__pos``) of a shard's live rows and, in its metadata, names per
column the base (ingest file) or column-group part files holding it.  :func:`view_sql` joins them by
position in DuckDB; :func:`read_view` returns the rows as Arrow, :func:`view_schema` their schema and
:func:`view_refs` the referenced columns.  Only this reading side lives here, below the stages and the
dedup code that read fit inputs; writing views is the runners' (:mod:`curate.runners.flow`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from curate.io import fs
from curate.io.sql import arrow, sql_list

POS = "__pos"
REFS = "curate.refs"  # fit view metadata: {column: [files holding it (base or group parts), relative to _work/]}
BASE = "curate.base"  # fit view metadata: the shard's base (its positions are row numbers)


def _view_meta(path: str | Path, schema: pa.Schema | None = None) -> tuple[dict[str, list[str]], str | None]:
    """(column -> the files holding it, the base file) of a fit view; ({}, None) for a plain Parquet file.
    ``schema``: the file's schema when already read."""
    md = (schema if schema is not None else fs.read_schema(path)).metadata or {}
    raw = md.get(REFS.encode())
    if not raw:
        return {}, None
    name = str(path) if fs.is_uri(path) else str(Path(path).resolve())
    work = name.rsplit("/", 2)[0]  # the view is WORK/view-k/SHARD.parquet

    def where(f: str) -> str:  # names relative to the work folder (it may have moved); absolute ones as they are
        return f if f.startswith("/") or fs.is_uri(f) else f"{work}/{f}"

    base = md.get(BASE.encode())
    return ({c: [where(f) for f in files] for c, files in json.loads(raw).items()},
            where(base.decode()) if base else None)


def view_refs(path: str | Path) -> dict[str, list[str]]:
    """Columns a fit view holds by reference: column -> the files with its values (by ``__pos``)."""
    return _view_meta(path)[0]


def view_schema(path: str | Path) -> pa.Schema:
    """Schema of a fit input as its fit sees it: a view's referenced columns included."""
    schema = fs.read_schema(path)
    cache: dict[str, pa.Schema] = {}
    for c, files in view_refs(path).items():
        if files[0] not in cache:
            cache[files[0]] = fs.read_schema(files[0])
        schema = schema.append(cache[files[0]].field(c))
    return schema.remove_metadata()


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_PART = re.compile(r"~(\d+)-(\d+)-\d+\.parquet$")  # a column-group part: SHARD~LO-HI-ROWS.parquet


def _overlap(files: Iterable[str]) -> bool:
    """Whether part files of a column group may hold the same position (their names give their ranges)."""
    ranges = []
    for f in files:
        m = _PART.search(str(f))
        if m is None:
            return True
        ranges.append((int(m.group(1)), int(m.group(2))))
    ranges.sort()
    return any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


def view_sql(path: str | Path, columns: list[str] | None = None) -> str:
    """A DuckDB subquery ``(SELECT ...)`` with the rows of a fit input in position order: for a view, its
    live rows, each column read from the base or column group holding it (joined by position); for a
    plain Parquet file, the file.  ``columns``: those (of :func:`view_schema`) only; None: all."""
    own_schema = fs.read_schema(path)
    refs, base = _view_meta(path, own_schema)
    own = own_schema.names
    names = list(own) + [c for c in refs if c not in own] if columns is None else list(dict.fromkeys(columns))
    if not refs:
        return f"(SELECT {', '.join(_q(c) for c in names if c in own) or '*'} FROM read_parquet({sql_list([path])}))"
    by_files: dict[tuple[str, ...], list[str]] = {}
    for c in names:
        if c in refs and c not in own:
            by_files.setdefault(tuple(refs[c]), []).append(c)
    select = [f"v.{_q(c)}" for c in names if c in own]
    joins = []
    for i, (files, cols) in enumerate(by_files.items()):
        a = f"s{i}"
        cs = ", ".join(_q(c) for c in cols)
        if base is not None and files == (base,):
            src = f"(SELECT file_row_number AS {_q(POS)}, {cs} FROM read_parquet({sql_list([base])}, file_row_number = true))"
        else:
            flist = sql_list(list(files))
            src = f"SELECT {_q(POS)}, {cs} FROM read_parquet({flist}, union_by_name = true)"
            if _overlap(files):  # a retried Ray batch wrote a part twice: identical rows, one kept (a window
                src += f" QUALIFY row_number() OVER (PARTITION BY {_q(POS)}) = 1"  # spills: only when needed)
            src = f"({src})"
        joins.append(f"LEFT JOIN {src} {a} ON {a}.{_q(POS)} = v.{_q(POS)}")
        select += [f"{a}.{_q(c)}" for c in cols]
    if POS not in names:
        select.append(f"v.{_q(POS)}")
    return (f"(SELECT {', '.join(select)} FROM read_parquet({sql_list([path])}) v {' '.join(joins)} "
            f"ORDER BY v.{_q(POS)})")


def view_connection() -> Any:
    """A DuckDB connection for :func:`read_view` (one thread: fits read files in parallel tasks instead).
    Opening one costs ~16 ms: a loop over a task's shards shares one."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 1")
    return con


def read_view(path: str | Path, columns: list[str] | None = None, con: Any = None) -> pa.Table:
    """The rows of a fit input (:func:`view_sql`) as an Arrow table; of ``columns``, those it holds.
    ``con``: a :func:`view_connection` to use (else one is opened and closed)."""
    schema = view_schema(path)
    own = con is None
    con = view_connection() if own else con
    fs.register(con, [path])  # a work folder on object storage: DuckDB reads it through fsspec
    try:
        wanted = None if columns is None else [c for c in columns if c in schema.names]
        t = arrow(con.sql(f"SELECT * FROM {view_sql(path, wanted)}"))
    finally:
        if own:
            con.close()
    # DuckDB widens some Arrow types (float16, dictionaries): back to the stored ones
    return pa.table([t[c].cast(schema.field(c).type) if c in schema.names else t[c] for c in t.column_names],
                    names=t.column_names)



def first_per_position(t: pa.Table) -> pa.Table:
    """The first row of each run of equal ``__pos`` of a table sorted by it (a retried Ray batch wrote a part
    twice: identical rows, one kept)."""
    import numpy as np

    pos = t[POS].to_numpy()
    if len(pos) > 1 and (pos[1:] == pos[:-1]).any():
        t = t.filter(pa.array(np.r_[True, pos[1:] != pos[:-1]]))
    return t


def read_view_columns(path: str | Path, columns: list[str]) -> pa.Table:
    """The rows of a fit view with those of ``columns`` it holds, and ``__pos``, read file by file with pyarrow:
    a few columns of one shard without the start-up of a DuckDB query (:func:`read_view` reads whole fits)."""
    import numpy as np
    import pyarrow.compute as pc

    own = fs.read_table(path)
    refs, base = _view_meta(path, own.schema)
    out = own.select([c for c in own.column_names if c == POS or c in columns]).replace_schema_metadata(None)
    pos = own[POS].combine_chunks()
    by_files: dict[tuple[str, ...], list[str]] = {}
    for c in dict.fromkeys(columns):
        if c in refs and c not in own.column_names:
            by_files.setdefault(tuple(refs[c]), []).append(c)
    for files, cols in by_files.items():
        if base is not None and files == (base,):
            t = fs.read_table(base, columns=cols)
            t = t.append_column(POS, pa.array(np.arange(t.num_rows, dtype=np.int64)))
        else:
            parts = [fs.read_table(f, columns=[POS, *cols], only_present=True) for f in files]
            t = first_per_position(pa.concat_tables(parts, promote_options="permissive").sort_by(POS))
        idx = pc.index_in(pos, value_set=t[POS])
        for c in cols:
            if c in t.column_names:
                out = out.append_column(t.schema.field(c), t[c].take(idx))
    return out
