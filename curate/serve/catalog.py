"""The Parquet footers of one output directory (``data/`` or ``rejected/``), read once per server process.

A :class:`Catalog` lists a directory's finished Parquet files and reads each footer once: rows per
row group, and min / max / null counts of the columns pages filter on (numeric columns,
``reject_reason``, ``reject_stage``).  :meth:`Catalog.snapshot` returns an immutable
:class:`Snapshot`; it re-lists the directory only when the directory's mtime changed (a file written,
renamed or removed), and then reads only the footers of new or changed files.  A snapshot maps a
global row number (files in name order, as ``curate.query`` lists them) to (file, row group, row)
without reading anything, which is what lets a page at any depth be read at once.

:class:`Handles` keeps a few ``pyarrow.parquet.ParquetFile`` objects open (an open file holds its
parsed footer, about 100 KB for the output schema: never one per file of a large output).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema as S

log = logging.getLogger(__name__)

#: string columns whose row-group statistics are kept (equality filters of the rows pages)
STRING_STATS = (S.REJECT_REASON, S.REJECT_STAGE)


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    mtime_ns: int
    rows: int
    rg_rows: tuple[int, ...]
    schema: pa.Schema


@dataclass
class Snapshot:
    """The files of one directory at one moment, with row-group positions and statistics."""
    directory: Path
    files: list[FileEntry]
    file_start: np.ndarray  # global row of each file's first row; last: total rows
    rg_file: np.ndarray  # per row group (global order): its file
    rg_local: np.ndarray  # its index in its file
    rg_start: np.ndarray  # its first global row; last: total rows
    num_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # col -> (min, max), NaN: unknown
    str_stats: dict[str, tuple[list, list, np.ndarray]] = field(default_factory=dict)  # col -> (min, max, all null)
    index: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.file_start[-1])

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{f.size}\0{f.rows}\n".encode())
        return h.hexdigest()[:32]

    def path(self, i: int) -> Path:
        return self.directory / self.files[i].name

    def file_of_row(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.file_start, rows, side="right") - 1

    def positions(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row in file) of the global rows [start, stop)."""
        rows = np.arange(max(0, start), min(stop, self.total), dtype=np.int64)
        f = self.file_of_row(rows)
        return f, rows - self.file_start[f]

    def has_column(self, i: int, column: str) -> bool:
        return self.files[i].schema.get_field_index(column) >= 0


def _stat_value(st: Any, attr: str) -> Any:
    try:
        return getattr(st, attr)
    except Exception:  # noqa: BLE001 - a statistic pyarrow cannot convert
        return None


_SCHEMAS: dict[str, pa.Schema] = {}  # one object per distinct schema (a large output has thousands of files)
_NUMERIC: dict[int, tuple[pa.Schema, frozenset[str]]] = {}


def _intern(schema: pa.Schema) -> pa.Schema:
    schema = schema.remove_metadata()
    key = schema.to_string(show_field_metadata=False, show_schema_metadata=False)
    got = _SCHEMAS.get(key)
    if got is None:
        got = _SCHEMAS[key] = schema
    return got


def _numeric_columns(schema: pa.Schema) -> frozenset[str]:
    got = _NUMERIC.get(id(schema))
    if got is None or got[0] is not schema:
        got = (schema, frozenset(f.name for f in schema
                                 if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)))
        _NUMERIC[id(schema)] = got
    return got[1]


def _read_entry(path: Path, st: os.stat_result) -> tuple[FileEntry, dict[str, Any]]:
    """A file's entry and its row groups' statistics: ``num``: {numeric column: float64 array (groups, 2) of
    min, max -- NaN: unknown; +inf, -inf: all null}; ``str``: {string column: [(min, max, all null)] per group}."""
    md = pq.read_metadata(path)
    schema = _intern(md.schema.to_arrow_schema())
    numeric = _numeric_columns(schema)
    cols = {md.schema.column(j).path: j for j in range(md.num_columns)}
    nrg = md.num_row_groups
    num = {c: np.full((nrg, 2), np.nan) for c in cols if c in numeric}
    strs: dict[str, list] = {c: [] for c in cols if c in STRING_STATS}
    rg_rows = []
    for i in range(nrg):
        rg = md.row_group(i)
        rg_rows.append(rg.num_rows)
        for c, arr in num.items():
            s = rg.column(cols[c]).statistics
            if s is None:
                continue
            if s.has_min_max:
                try:
                    arr[i] = float(_stat_value(s, "min")), float(_stat_value(s, "max"))
                except (TypeError, ValueError):
                    pass
            elif s.has_null_count and s.null_count == rg.num_rows:
                arr[i] = np.inf, -np.inf
        for c, out in strs.items():
            s = rg.column(cols[c]).statistics
            if s is None:
                out.append((None, None, False))
                continue
            allnull = bool(s.has_null_count and s.null_count == rg.num_rows)
            out.append((_stat_value(s, "min"), _stat_value(s, "max"), allnull) if s.has_min_max else
                       (None, None, allnull))
    entry = FileEntry(path.name, st.st_size, st.st_mtime_ns, md.num_rows, tuple(rg_rows), schema)
    return entry, {"num": num, "str": strs}


class Catalog:
    """One directory's Parquet files (see the module doc).  Thread-safe."""

    def __init__(self, directory: Path, cache: Path | None = None) -> None:
        self.directory = Path(directory)
        self.cache = Path(cache) if cache is not None else None
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._mtime: int | None = None
        self._entries: dict[str, tuple[FileEntry, dict[str, Any]]] = {}
        self._loaded = False

    def _dir_mtime(self) -> int | None:
        try:
            return os.stat(self.directory).st_mtime_ns
        except OSError:
            return None

    def snapshot(self) -> Snapshot:
        mtime = self._dir_mtime()
        snap = self._snap
        if snap is not None and mtime == self._mtime:
            return snap
        with self._lock:
            if self._snap is not None and mtime == self._mtime:
                return self._snap
            self._snap, self._mtime = self._rebuild(), mtime
            return self._snap

    def _rebuild(self) -> Snapshot:
        from curate.query import parquet_files

        if not self._loaded:
            self._loaded = True
            self._entries = load_cache(self.cache) if self.cache is not None else {}
        entries: dict[str, tuple[FileEntry, dict[str, Any]]] = {}
        fresh = 0
        for p in parquet_files(self.directory):
            try:
                st = p.stat()
            except OSError:  # removed meanwhile
                continue
            old = self._entries.get(p.name)
            if old is not None and old[0].size == st.st_size and old[0].mtime_ns == st.st_mtime_ns:
                entries[p.name] = old
                continue
            try:
                entries[p.name] = _read_entry(p, st)
                fresh += 1
            except (OSError, pa.ArrowInvalid) as e:  # a file being replaced, or not Parquet: left out
                log.warning("serve: %s: cannot read its footer (%s); left out", p, e)
        if self.cache is not None and (fresh or len(entries) != len(self._entries)):
            try:
                save_cache(self.cache, entries)
            except OSError as e:  # a cache only
                log.info("serve: cannot write %s (%s)", self.cache, e)
        self._entries = entries
        names = sorted(entries)
        fe = [entries[n][0] for n in names]
        stats = [entries[n][1] for n in names]
        rows = np.array([e.rows for e in fe], np.int64)
        file_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        rg_file = np.repeat(np.arange(len(fe), dtype=np.int64), [len(e.rg_rows) for e in fe])
        rg_local = np.concatenate([np.arange(len(e.rg_rows), dtype=np.int64) for e in fe]) if fe else \
            np.zeros(0, np.int64)
        rg_rows = np.array([r for e in fe for r in e.rg_rows], np.int64)
        rg_start = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
        num_stats = {}
        for c in sorted(set().union(*(st["num"] for st in stats))) if stats else []:
            parts = [st["num"][c] if c in st["num"] else np.tile([np.inf, -np.inf], (len(e.rg_rows), 1))
                     for e, st in zip(fe, stats)]  # a file without the column: NULL everywhere
            arr = np.concatenate(parts)
            num_stats[c] = (arr[:, 0].copy(), arr[:, 1].copy())
        str_stats = {}
        for c in STRING_STATS:
            mins, maxs, empty = [], [], []
            for e, st in zip(fe, stats):
                for mn, mx, allnull in st["str"].get(c) or [(None, None, True)] * len(e.rg_rows):
                    mins.append(mn)
                    maxs.append(mx)
                    empty.append(allnull)
            str_stats[c] = (mins, maxs, np.array(empty, bool))
        return Snapshot(self.directory, fe, file_start, rg_file, rg_local, rg_start, num_stats, str_stats,
                        {e.name: i for i, e in enumerate(fe)})


def source_sql(snap: Snapshot, indices, file_col: str | None = None, row_numbers: bool = False) -> str:
    """A DuckDB source over some files of a snapshot: one ``read_parquet`` per distinct schema, unioned by name
    (``union_by_name`` would read every file's footer to bind the query: 1.3 GB and 13 s over 20,000 files)."""
    from curate.io.sql import sql_string

    groups: dict[int, list[str]] = {}
    for i in indices:
        groups.setdefault(id(snap.files[int(i)].schema), []).append(sql_string(str(snap.path(int(i)))))
    opts = (f", filename = '{file_col}'" if file_col else "") + (", file_row_number = true" if row_numbers else "")
    parts = [f"read_parquet([{', '.join(paths)}]{opts})" for paths in groups.values()]
    if len(parts) == 1:
        return parts[0]
    return "(" + " UNION ALL BY NAME ".join(f"SELECT * FROM {p}" for p in parts) + ")"


CACHE_VERSION = "1"


def save_cache(path: Path, entries: dict[str, tuple[FileEntry, dict[str, Any]]]) -> None:
    """What the footers said, one row per file (names, sizes, mtimes: a changed file is read again), so that a
    server started again reads no footer of an unchanged file.  Parquet, schemas in its metadata (IPC)."""
    import base64
    import json

    schemas: dict[int, int] = {}
    blobs: list[str] = []
    rows = []
    for name in sorted(entries):
        e, st = entries[name]
        if id(e.schema) not in schemas:
            schemas[id(e.schema)] = len(blobs)
            blobs.append(base64.b64encode(e.schema.serialize().to_pybytes()).decode())
        rows.append({"name": e.name, "size": e.size, "mtime_ns": e.mtime_ns, "rows": e.rows,
                     "rg_rows": list(e.rg_rows), "schema": schemas[id(e.schema)],
                     "num": [{"col": c, "lo": a[:, 0].tolist(), "hi": a[:, 1].tolist()} for c, a in st["num"].items()],
                     "str": [{"col": c, "min": [x[0] for x in v], "max": [x[1] for x in v],
                              "allnull": [x[2] for x in v]} for c, v in st["str"].items()]})
    schema = pa.schema([
        ("name", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("rows", pa.int64()),
        ("rg_rows", pa.list_(pa.int64())), ("schema", pa.int32()),
        ("num", pa.list_(pa.struct([("col", pa.string()), ("lo", pa.list_(pa.float64())),
                                    ("hi", pa.list_(pa.float64()))]))),
        ("str", pa.list_(pa.struct([("col", pa.string()), ("min", pa.list_(pa.string())),
                                    ("max", pa.list_(pa.string())), ("allnull", pa.list_(pa.bool_()))])))],
        metadata={"curate.catalog": CACHE_VERSION, "curate.schemas": json.dumps(blobs)})
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def load_cache(path: Path) -> dict[str, tuple[FileEntry, dict[str, Any]]]:
    """The entries :func:`save_cache` wrote ({} when there is none or it cannot be read)."""
    import base64
    import json

    try:
        t = pq.read_table(path)
        md = t.schema.metadata or {}
        if md.get(b"curate.catalog") != CACHE_VERSION.encode():
            return {}
        schemas = [_intern(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(b))))
                   for b in json.loads(md[b"curate.schemas"])]
        out = {}
        for r in t.to_pylist():
            num = {x["col"]: np.array([x["lo"], x["hi"]], np.float64).T.reshape(-1, 2) for x in r["num"]}
            strs = {x["col"]: list(zip(x["min"], x["max"], x["allnull"])) for x in r["str"]}
            e = FileEntry(r["name"], r["size"], r["mtime_ns"], r["rows"], tuple(r["rg_rows"]), schemas[r["schema"]])
            out[e.name] = (e, {"num": num, "str": strs})
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError, pa.ArrowException):
        return {}


class Handles:
    """A small LRU of open ``ParquetFile`` objects, one lock each (reads of one file are serialised)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._open: OrderedDict[tuple[str, int], tuple[pq.ParquetFile, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, path: Path, mtime_ns: int) -> tuple[pq.ParquetFile, threading.Lock]:
        key = (str(path), mtime_ns)
        with self._lock:
            got = self._open.get(key)
            if got is not None:
                self._open.move_to_end(key)
                return got
        got = (pq.ParquetFile(path), threading.Lock())
        with self._lock:
            self._open[key] = got
            while len(self._open) > self.size:
                self._open.popitem(last=False)
        return got

    def read_row_groups(self, path: Path, mtime_ns: int, groups: list[int], columns: list[str]) -> pa.Table:
        pf, lock = self._get(path, mtime_ns)
        have = [c for c in columns if c in pf.schema_arrow.names]
        with lock:
            return pf.read_row_groups(groups, columns=have)


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    """Threads reading row groups of different files at once (Arrow decodes without the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=max(2, min(8, 2 * (os.cpu_count() or 2))),
                                       thread_name_prefix="curate-serve-read")
        return _POOL


def read_positions(snap: Snapshot, handles: Handles, files: np.ndarray, rows: np.ndarray,
                   columns: list[str]) -> pa.Table:
    """The rows at (file index, row in file) positions, in the given order, with ``_file`` (name) and ``_row``;
    columns a file lacks are null.  Only the row groups holding them are read (files in parallel)."""
    files, rows = np.asarray(files, np.int64), np.asarray(rows, np.int64)
    order = np.argsort(files, kind="stable")
    uniq, starts = np.unique(files[order], return_index=True)

    def one(fi: int, sel: np.ndarray) -> pa.Table:
        entry = snap.files[fi]
        bounds = np.concatenate([[0], np.cumsum(entry.rg_rows)]).astype(np.int64)
        r = rows[sel]
        g = np.searchsorted(bounds, r, side="right") - 1
        groups = sorted(set(g.tolist()))
        table = handles.read_row_groups(snap.path(fi), entry.mtime_ns, groups, columns)
        first = dict(zip(groups, np.concatenate([[0], np.cumsum([entry.rg_rows[x] for x in groups])[:-1]]).tolist()))
        local = np.array([first[int(a)] + int(b - bounds[a]) for a, b in zip(g, r)], np.int64)
        return table.take(pa.array(local)) \
            .append_column("_file", pa.array([entry.name] * len(sel), pa.string())) \
            .append_column("_row", pa.array(r, pa.int64())) \
            .append_column("_order", pa.array(sel, pa.int64()))

    jobs = list(zip(uniq.tolist(), np.split(order, starts[1:])))
    if len(jobs) > 2:
        parts = list(_pool().map(lambda j: one(*j), jobs))
    else:
        parts = [one(*j) for j in jobs]
    if not parts:
        return pa.table({"_file": pa.array([], pa.string()), "_row": pa.array([], pa.int64())})
    out = pa.concat_tables(parts, promote_options="permissive")
    out = out.take(pa.array(np.argsort(out["_order"].to_numpy(), kind="stable")))
    return out.drop_columns(["_order"])
