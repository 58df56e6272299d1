"""What the web app reads: pages of rows, facets, duplicate groups, thumbnails, SQL, subsets.

One read-only DuckDB database per app (curate.sql_guard): the views ``kept``, ``rejected``,
``samples`` plus ``kept_pos`` / ``rejected_pos`` (the same rows with ``_file`` and ``_row``, where
a thumbnail is read from), created before the lock, for the SQL box, subsets and searches.  Rows pages
never scan the output per request (issue #28; curate.serve.pages): the Parquet footers are read once
(curate.serve.catalog), storage-order pages are found from them, filtered views page by cursor and are
counted in the background, sorted views read a sort index written once, duplicate groups a table
written once (curate.dup_groups); totals come from the footers and ``stats.json``.  Filters are bound
parameters, column names are checked against the view's columns, SQL conditions run in the locked
connections.  One background thread does the work pages ask for (counts, sort indexes, the groups table).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate import schema as S
from curate.io.files import InputError
from curate.io.sql import sql_string
from curate.layout import Layout

log = logging.getLogger(__name__)

VIEWS = ("kept", "rejected")
PAGE_MAX = 200
SQL_MAX_ROWS = 200
SQL_TIMEOUT = 30.0
NUMERIC = ("FLOAT", "DOUBLE", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "UINTEGER", "UBIGINT", "DECIMAL")
CARD_COLUMNS = (S.UID, S.CAPTION, S.URL, S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.WIDTH, S.HEIGHT, S.REJECT_REASON,
                S.REJECT_STAGE, S.REJECT_DETAIL, S.DUPLICATE_OF, S.DUPLICATE_KIND, S.LANGUAGE, S.RECAPTION)
JOBS = {"sort": "writing the sort index", "dups": "writing the duplicate-groups table", "facets": "counting rows by reason",
        "selection": "ordering the filtered rows"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class Filter:
    """The filters of a rows page; ``where()`` renders them as SQL (values bound or quoted)."""
    reason: str = ""
    stage: str = ""
    metric: str = ""
    lo: float | None = None
    hi: float | None = None
    where: str = ""
    columns: list[str] = field(default_factory=list)

    def parts(self) -> tuple[list[str], dict[str, Any]]:
        sql, params = [], {}
        if self.reason:
            sql.append(f"{S.REJECT_REASON} = $reason")
            params["reason"] = self.reason
        if self.stage:
            sql.append(f"{S.REJECT_STAGE} = $stage")
            params["stage"] = self.stage
        if self.metric and (self.lo is not None or self.hi is not None):
            if self.metric not in self.columns:
                raise InputError(f"no numeric column {self.metric[:80]!r}")
            if self.lo is not None:
                sql.append(f'"{self.metric}" >= $lo')
                params["lo"] = float(self.lo)
            if self.hi is not None:
                sql.append(f'"{self.metric}" <= $hi')
                params["hi"] = float(self.hi)
        if self.where.strip():
            sql.append(f"({self.where})")
        return sql, params

    def literal(self) -> str:
        """The same condition with literal values (for refilter/export, which take an SQL string)."""
        sql, params = self.parts()
        text = " AND ".join(sql) or "true"
        for k, v in params.items():
            text = text.replace(f"${k}", repr(float(v)) if isinstance(v, float) else sql_string(v))
        return text


SCAN_ROWS = 2_000_000  # a sorted and filtered view scans its files per page up to this many rows, else waits
SORT_VERSION = "v2"  # sort indexes carry the card columns
BUILD_MEMORY = "256MB"  # DuckDB's memory for a sort index or the groups table built by the server (it spills)


def build_connection(scratch: Path, threads: int):
    """A DuckDB connection for the tables the server writes (no user SQL): bounded memory, spilling beside them."""
    import duckdb

    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET memory_limit = '{BUILD_MEMORY}'")
    con.execute(f"SET temp_directory = {sql_string(str(scratch / '.duckdb-tmp'))}")
    return con


class Explorer:
    """What the app reads (see the module doc).  ``background=False``: no background thread (counts and tables
    are then made on demand, in the request)."""

    def __init__(self, output: str | Path, subsets_dir: str | Path | None = None, background: bool = True) -> None:
        import duckdb

        from curate.query import connect
        from curate.serve.catalog import Catalog, Handles
        from curate.serve.pages import Matchers
        from curate.sql_guard import lock_down

        self.layout = Layout(Path(output).expanduser().resolve())
        self.subsets = Path(subsets_dir).expanduser().resolve() if subsets_dir else self.layout.root / "subsets"
        if not self.layout.root.is_dir() or (not self.layout.data.is_dir() and not self.layout.rejected.is_dir()):
            connect(self.layout.root).close()  # its one-line error
        self._con = None  # the views connection (SQL box, subsets), made on first use: binding views over
        self._con_lock = threading.Lock()  # every file reads every footer (13 s and 1.3 GB at 20M rows)
        # pages need no view: a locked connection reading the files they name
        pc = duckdb.connect()
        lock_down(pc, [self.layout.data, self.layout.rejected])
        self._page_con = pc
        self._schema: tuple[str, list[str], list[str]] | None = None
        from curate.index import view_dir

        self.handles = Handles(256)
        self.matchers = Matchers()
        self._images: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._searcher = None
        self._facets: dict[str, tuple[str, dict]] = {}
        self._sorts: dict[tuple[str, str], Any] = {}  # (view, column) -> SortIndex of the current files
        self._selections: dict[tuple, Any] = {}  # (matcher, column) -> Selection
        self._dups: tuple[str, Any] | None = None  # (fingerprint, DuplicateGroups)
        self._scratch: Path | None = None
        cache = self._writable_dir("browse") / "catalog"  # the footers' facts, for the next start
        self.catalogs = {v: Catalog(view_dir(self.layout, v), cache / f"{v}.parquet") for v in VIEWS}
        self._jobs: OrderedDict[tuple, Any] = OrderedDict()  # background jobs asked for: key -> (fn, Event)
        self._failed: dict[tuple, str] = {}  # jobs that raised: key -> one line
        self._busy = 0
        self._wake = threading.Event()
        self._closed = False
        # a second locked connection, one thread: the background counts (their conditions are the user's SQL)
        import duckdb

        bg = duckdb.connect()
        bg.execute("SET threads = 1")
        lock_down(bg, [self.layout.data, self.layout.rejected])
        self._bg_con = bg
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._background, name="curate-serve-background", daemon=True)
            self._thread.start()

    @property
    def con(self):
        """The locked connection with the views ``kept``, ``rejected``, ``samples``, ``kept_pos``, ``rejected_pos``
        (for SQL from the user: the SQL box, subsets), made on first use."""
        with self._con_lock:
            if self._con is None:
                from curate.query import connect, scan_sql
                from curate.sql_guard import lock_down

                con = connect(self.layout.root)
                for view in VIEWS:
                    src = scan_sql(self.layout, view)
                    if src:
                        src = src[:-1] + ", filename = '_file', file_row_number = true)"
                        con.execute(f"CREATE VIEW {view}_pos AS SELECT * EXCLUDE (file_row_number), "
                                    f"file_row_number AS _row FROM {src}")
                    else:
                        con.execute(f"CREATE VIEW {view}_pos AS SELECT *, NULL::VARCHAR AS _file, "
                                    f"NULL::BIGINT AS _row FROM {view} LIMIT 0")
                lock_down(con, [self.layout.data, self.layout.rejected])
                self._con = con
            return self._con

    def cursor(self):
        """A cursor of the views connection (:attr:`con`)."""
        return self.con.cursor()

    def page_cursor(self):
        """A cursor of the pages' locked connection (no views; conditions over the files a page names)."""
        return self._page_con.cursor()

    def _columns(self) -> tuple[list[str], list[str]]:
        """(columns, numeric columns a page can filter and order by) of the files, from their footers."""
        import pyarrow as pa

        snaps = [self.snapshot(v) for v in VIEWS]
        key = "|".join(s.fingerprint for s in snaps)
        got = self._schema
        if got is not None and got[0] == key:
            return got[1], got[2]
        from curate.query import output_schema

        fields: dict[str, pa.DataType] = {}
        schemas = {id(f.schema): f.schema for s in snaps for f in s.files}
        for schema in schemas.values() or [output_schema(self.layout)]:
            for f in schema:
                fields.setdefault(f.name, f.type)

        def numeric(t: pa.DataType) -> bool:
            return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)

        columns = list(fields)
        nums = [c for c, t in fields.items() if numeric(t) and not S.is_internal(c) and c != S.SOURCE_ROW]
        self._schema = (key, columns, nums)
        return columns, nums

    @property
    def columns(self) -> list[str]:
        return self._columns()[0]

    @property
    def numeric(self) -> list[str]:
        return self._columns()[1]

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # -- background work ------------------------------------------------------------------------
    def _background(self) -> None:
        """Read the footers, then do what pages ask for: write the duplicate-groups table or a sort index, count
        the rows of filtered views (one window of files at a time, pausing while a request is being answered)."""
        try:
            for v in VIEWS:
                self.catalogs[v].snapshot()
        except Exception:  # the requests will say what is wrong
            log.exception("serve: background start")
        while not self._closed:
            try:
                did = self._background_step()
            except Exception:  # one failed job must not stop the others
                log.exception("serve: background job failed")
                did = True
            if not did:
                self._wake.wait(1.0)
                self._wake.clear()

    def _background_step(self) -> bool:
        """One job a request asked for (at once), else one window of a count (once no request is running)."""
        with self._lock:
            job = next(iter(self._jobs.items()), None)
        if job is not None:
            key, (fn, done) = job
            try:
                fn()
            except Exception as e:  # the request waiting for it says why, in one line
                log.exception("serve: background job %s failed", key[0])
                with self._lock:
                    self._failed[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            finally:
                with self._lock:
                    self._jobs.pop(key, None)
                done.set()
            return True
        pending = self.matchers.pending()
        if pending:
            while self._busy > 0 and not self._closed and not self._jobs:
                time.sleep(0.02)
            if self._jobs:
                return True
        for m in pending[:1]:
            try:
                m.scan(self._bg_con.cursor, m.window_from(m.frontier, 1), count_only=m.nbytes > (128 << 20))
            except Exception as e:  # noqa: BLE001 - duckdb.Error of the user's condition
                from curate.sql_guard import one_line

                m.error = one_line(e)
            return True
        return False

    def _job(self, key: tuple, fn, wait: float) -> bool:
        """Run ``fn`` in the background thread (or now, without one); wait up to ``wait`` s: True if done.
        A job that failed raises InputError here (once; the next request tries again)."""
        if self._thread is None:
            fn()
            return True
        with self._lock:
            failed = self._failed.pop(key, None)
        if failed:
            raise InputError(f"{JOBS.get(key[0], key[0])} failed: {failed}")
        with self._lock:
            got = self._jobs.get(key)
            if got is None:
                got = (fn, threading.Event())
                self._jobs[key] = got
        self._wake.set()
        done = got[1].wait(wait) if wait > 0 else got[1].is_set()
        with self._lock:
            failed = self._failed.pop(key, None) if done else None
        if failed:
            raise InputError(f"{JOBS.get(key[0], key[0])} failed: {failed}")
        return done

    def _writable_dir(self, name: str) -> Path:
        """``OUT/name`` when the output can be written, else a folder of this process's own."""
        if os.access(self.layout.root, os.W_OK):
            return self.layout.root / name
        with self._lock:
            if self._scratch is None:
                import atexit
                import shutil
                import tempfile

                self._scratch = Path(tempfile.mkdtemp(prefix="curate-serve-"))
                atexit.register(shutil.rmtree, self._scratch, True)
        return self._scratch / name

    # -- rows -----------------------------------------------------------------------------------
    def filter(self, **kw: Any) -> Filter:
        return Filter(columns=self.numeric, **kw)

    def snapshot(self, view: str):
        if view not in VIEWS:
            raise InputError(f"no view {view[:40]!r}")
        return self.catalogs[view].snapshot()

    def total(self, view: str) -> int:
        return self.snapshot(view).total

    def page(self, view: str, flt: Filter, page: int, per: int, order: str = "") -> tuple[list[dict], int]:
        """(rows of one page as dicts, total matching rows; -1 while not counted yet)."""
        rows, w = self.browse(view, flt, per, order=order, page=page)
        return rows, -1 if w.total is None else int(w.total)

    def browse(self, view: str, flt: Filter, per: int, order: str = "", page: int | None = None, after: str = "",
               before: str = "", last: bool = False):
        """(rows of one page as dicts, its :class:`curate.serve.pages.Window`): by page number (``page``), after
        or before a cursor (``after`` / ``before``: ``FILE:ROW`` in storage order, ``VALUE|UID`` in a sorted
        view), or the last page (``last``)."""
        from curate.sql_guard import SqlRefused, check_condition, one_line

        snap = self.snapshot(view)
        per = max(1, min(int(per), PAGE_MAX))
        page = max(0, int(page or 0))
        col, desc = "", True
        if order:
            col, _, direction = order.partition(":")
            if col not in self.numeric:
                raise InputError(f"cannot order by {col[:80]!r}")
            desc = direction != "asc"
        with self._lock:
            self._busy += 1
        cur = self.page_cursor()
        try:
            if flt.where.strip():
                check_condition(cur, flt.where)
            parts, params = flt.parts()
            if col:
                w = self._sorted(view, snap, flt, parts, params, col, desc, per, page, after, before, last)
            elif parts:
                w = self._filtered(view, snap, flt, parts, params, per, page, after, before, last)
            else:
                w = self._storage(snap, per, page, after, before, last)
            from curate.serve.pages import read_window

            cols = [c for c in CARD_COLUMNS if c in self.columns]
            rows = read_window(snap, self.handles, w, cols)
        except (SqlRefused, InputError):
            raise
        except Exception as e:  # duckdb.Error: a user's condition
            import duckdb

            if isinstance(e, duckdb.Error):
                raise SqlRefused(one_line(e)) from None
            raise
        finally:
            cur.close()
            with self._lock:
                self._busy -= 1
            self._wake.set()
        for r in rows:
            r["view"] = view
        return rows, w

    def _position(self, snap, text: str) -> tuple[int, int] | None:
        """A storage cursor FILE:ROW as (file index, row); a file no longer there: where it would be."""
        import bisect

        from curate.serve.pages import parse_cursor

        got = parse_cursor(text)
        if got is None:
            return None
        name, row = got
        i = snap.index.get(name)
        if i is not None:
            return i, row
        names = [f.name for f in snap.files]
        return bisect.bisect_left(names, name), -1  # before its successor: after / before both hold there

    def _storage(self, snap, per: int, page: int, after: str, before: str, last: bool):
        from curate.serve.pages import Window

        total = snap.total
        if after:
            f, r = self._position(snap, after)
            start = int(snap.file_start[f]) + r + 1 if f < len(snap.files) else total
        elif before:
            f, r = self._position(snap, before)
            end = int(snap.file_start[f]) + max(r, 0) if f < len(snap.files) else total
            start = max(0, end - per)
        elif last:
            start = max(0, (total - 1) // per * per)
        else:
            start = page * per
            if start >= total:
                start = max(0, (total - 1) // per * per)
        files, rows = snap.positions(start, start + per)
        w = Window(files, rows, first=start, total=total, has_prev=start > 0, has_next=start + len(files) < total)
        if len(files):
            w.before = f"{snap.files[int(files[0])].name}:{int(rows[0])}"
            w.after = f"{snap.files[int(files[-1])].name}:{int(rows[-1])}"
        return w

    def matcher(self, view: str, snap, flt: Filter, parts: list[str], params: dict[str, Any]):
        from curate.serve.pages import Matcher, candidate_files

        key = (view, id(snap), snap.fingerprint, tuple(parts), tuple(sorted(params.items())))
        return self.matchers.get(key, lambda: Matcher(
            snap, " AND ".join(parts), params,
            candidate_files(snap, flt.reason, flt.stage, flt.metric, flt.lo, flt.hi)))

    def _filtered(self, view: str, snap, flt: Filter, parts, params, per: int, page: int, after: str, before: str,
                  last: bool):
        from curate.serve.pages import BUDGET_S, WINDOW_ROWS, count_until, filtered_after, filtered_at, filtered_before

        m = self.matcher(view, snap, flt, parts, params)
        if m.error:
            from curate.sql_guard import SqlRefused

            raise SqlRefused(m.error)
        t0 = time.monotonic()
        if after:
            w = filtered_after(m, self.page_cursor, self._position(snap, after), per)
        elif before:
            w = filtered_before(m, self.page_cursor, self._position(snap, before), per)
        elif last:
            w = filtered_at(m, self.page_cursor, (m.total - 1) // per * per, per) if m.complete and m.total else \
                filtered_before(m, self.page_cursor, None, per)
        else:
            w = filtered_at(m, self.page_cursor, page * per, per)
        left = BUDGET_S / 2 - (time.monotonic() - t0)
        uncounted = int(np.diff(snap.file_start)[m.counts < 0].sum())
        if not m.complete and left > 0 and uncounted <= 2 * WINDOW_ROWS:
            # the rest of a small view is counted at once; a large one in the background (not slowing pages)
            count_until(m, self.page_cursor, 1 << 62, left)
            if m.complete:
                w.total, w.counted = m.total, 1.0
                if w.first is not None:
                    w.has_next = w.first + len(w.files) < w.total
        if w.total is None and not flt.where and not flt.metric and bool(flt.reason) != bool(flt.stage):
            # a reason or a stage alone: the total is a facet's count
            col, value = (S.REJECT_REASON, flt.reason) if flt.reason else (S.REJECT_STAGE, flt.stage)
            counts = dict(self.facets(view, wait=False).get(col, []))
            if value in counts:
                w.total = counts[value]
        return w

    # -- sorted views ---------------------------------------------------------------------------
    def sort_index(self, view: str, column: str, snap, wait: float):
        """The sort index of (view, column) for the snapshot's files: opened, or built (in the background,
        waiting up to ``wait`` s); None while it is being built."""
        from curate.serve.pages import SortIndex, build_sort_index

        fp = snap.fingerprint
        with self._lock:
            got = self._sorts.get((view, column))
            if got is not None and got[0] == fp:
                return got[1]
        folder = self._writable_dir("browse") / "sort"
        path = folder / f"{view}.{column}.{fp[:16]}.{SORT_VERSION}.parquet"
        if not path.exists():
            def build() -> None:
                if path.exists():
                    return
                con = build_connection(folder, 1 if self._thread is not None else 2)
                try:
                    build_sort_index(con, snap, column, path, list(CARD_COLUMNS))
                finally:
                    con.close()
                for old in folder.glob(f"{view}.{column}.*.parquet"):
                    if old != path:
                        old.unlink(missing_ok=True)

            if not self._job(("sort", view, column, fp), build, wait):
                return None
            if not path.exists():
                raise InputError(f"writing the sort index of {view} by {column} failed (see the server's log)")
        ix = SortIndex(path)
        with self._lock:
            self._sorts[(view, column)] = (fp, ix)
        return ix

    def _sorted(self, view: str, snap, flt: Filter, parts, params, col: str, desc: bool, per: int, page: int,
                after: str, before: str, last: bool):
        from curate.serve.pages import Window, parse_key, sorted_window

        range_only = not flt.reason and not flt.stage and not flt.where.strip() and (
            flt.metric in ("", col) or (flt.lo is None and flt.hi is None))
        if range_only:
            ix = self.sort_index(view, col, snap, wait=1.0)
            if ix is None:
                w = Window(np.zeros(0, np.int64), np.zeros(0, np.int64))
                w.pending = f"building the sort index of {view} by {col} (once for these files)"
                return w
            use_range = flt.metric == col
            return sorted_window(ix, snap, per, desc, offset=page * per, after=parse_key(after),
                                 before=parse_key(before), last=last, lo=flt.lo if use_range else None,
                                 hi=flt.hi if use_range else None)
        # filtered by other columns too: the sort index walked through the filter's rows, once both are known
        from curate.serve.pages import candidate_files

        m = self.matcher(view, snap, flt, parts, params)
        sel = self._selection(view, snap, m, col)
        if sel is not None:
            from curate.serve.pages import selection_window

            ix = self.sort_index(view, col, snap, wait=0.0)
            return selection_window(ix, sel, snap, per, desc, offset=page * per, after=parse_key(after),
                                    before=parse_key(before), last=last)
        from curate.serve.pages import Selection

        big = int(np.diff(snap.file_start)[candidate_files(snap, flt.reason, flt.stage, flt.metric, flt.lo,
                                                            flt.hi)].sum()) > SCAN_ROWS
        if big and not (m.complete and not Selection.complete(m)) and m.error is None:
            # too many rows to sort at each click: the page waits for the background (counts, then the walk)
            from curate.serve.pages import Window

            w = Window(np.zeros(0, np.int64), np.zeros(0, np.int64), counted=m.counted_share())
            w.pending = (f"sorting the rows of this filter by {col}: counted {w.counted:.0%} of the view so far, "
                         "then the sort index is walked through them once")
            return w
        w = self._sorted_scan(view, snap, flt, parts, params, col, desc, per, page, after, before, last)
        w.note = w.note or ("sorted and filtered by another column: each page is a scan until the rows of this "
                            "filter are counted (in the background); then pages come from the sort index")
        return w

    def _selection(self, view: str, snap, m, col: str):
        """The :class:`curate.serve.pages.Selection` of (matcher, column), when the matcher knows all its rows and
        the sort index exists; else None (asking the background for what is missing)."""
        from curate.serve.pages import Selection

        key = (m.key, col)
        with self._lock:
            got = self._selections.get(key)
        if got is not None:
            return got
        ix = self.sort_index(view, col, snap, wait=0.2 if self._thread is not None else 0.0)
        if self._thread is None and not m.complete:  # no background: counted now
            from curate.serve.pages import count_until

            count_until(m, self.page_cursor, 1 << 62, 3600.0)
        if ix is None or not m.complete:
            return None
        if not Selection.complete(m):  # counted only (a large filter): its rows are needed
            return None

        def build() -> None:
            sel = Selection(ix, m)
            with self._lock:
                self._selections[key] = sel
                while len(self._selections) > 8:
                    self._selections.pop(next(iter(self._selections)))

        if not self._job(("selection", view, col, m.key), build, 1.0):
            return None
        with self._lock:
            return self._selections.get(key)

    def _sorted_scan(self, view: str, snap, flt: Filter, parts, params, col: str, desc: bool, per: int, page: int,
                     after: str, before: str, last: bool):
        """A sorted view with another filter: DuckDB's top-N over the files (keyset as a condition)."""
        from curate.serve.catalog import source_sql
        from curate.serve.pages import FILE_COL, Window, candidate_files, key_text, parse_key

        m = self.matcher(view, snap, flt, parts, params)
        cand = candidate_files(snap, flt.reason, flt.stage, flt.metric, flt.lo, flt.hi)
        files = np.flatnonzero(cand)
        w = Window(np.zeros(0, np.int64), np.zeros(0, np.int64), total=m.total, counted=m.counted_share())
        if not len(files):
            w.total = 0
            return w
        src = source_sql(snap, files, FILE_COL, True)
        v, u = f'CAST("{col}" AS DOUBLE)', "CAST(uid AS VARCHAR)"
        key = parse_key(after) or parse_key(before)
        backwards = bool(before) or (last and not after)
        cond, p = list(parts), dict(params)
        if key is not None:
            kv, ku = key
            p["_ku"] = ku
            if kv is None:  # NULLs come last, by uid ascending (in both directions)
                cond.append(f"({v} IS NULL AND {u} > $_ku)" if not backwards else
                            f"({v} IS NOT NULL OR {u} < $_ku)")
            else:
                p["_kv"] = kv
                greater = (not desc) != backwards  # the rows wanted have greater keys
                op = ">" if greater else "<"
                tail = f" OR {v} IS NULL" if not backwards else ""
                cond.append(f"({v} {op} $_kv OR ({v} = $_kv AND {u} {op} $_ku){tail})")
        vd = "DESC" if desc else "ASC"
        if backwards:  # the order reversed, then the rows put back in order
            vd = "ASC" if desc else "DESC"
            order_sql = f"v {vd} NULLS FIRST, CASE WHEN v IS NULL THEN u END DESC NULLS LAST, u {vd}"
        else:
            order_sql = f"v {vd} NULLS LAST, CASE WHEN v IS NULL THEN u END ASC NULLS LAST, u {vd}"
        where = (" WHERE " + " AND ".join(cond)) if cond else ""
        offset = f" OFFSET {page * per}" if page and key is None and not backwards else ""
        sql = (f"SELECT {FILE_COL}, file_row_number, {v} AS v, {u} AS u FROM {src}{where} "
               f"ORDER BY {order_sql} LIMIT {per + 1}{offset}")
        cur = self.page_cursor()
        try:
            got = cur.execute(sql, p).fetchall() if p else cur.execute(sql).fetchall()
        finally:
            cur.close()
        more = len(got) > per
        got = got[:per]
        if backwards:
            got = got[::-1]
        idx = [snap.index.get(os.path.basename(r[0]), -1) for r in got]
        keep = [k for k, i in enumerate(idx) if i >= 0]
        w.files = np.array([idx[k] for k in keep], np.int64)
        w.rows = np.array([got[k][1] for k in keep], np.int64)
        w.keys = [key_text(got[k][2], got[k][3]) for k in keep]
        if key is None and not backwards:
            w.first = page * per
        w.has_prev = more if backwards else (key is not None or page > 0)
        w.has_next = key is not None if backwards else more
        if w.keys:
            w.before, w.after = w.keys[0], w.keys[-1]
        return w

    # -- counts -----------------------------------------------------------------------------------
    def facets(self, view: str, wait: bool = True) -> dict[str, list[tuple[str, int]]]:
        """Rows per reject_reason and reject_stage: from stats.json when it agrees with the files' row counts,
        else counted once per state of the files (in the background for a large view)."""
        snap = self.snapshot(view)
        fp = snap.fingerprint
        with self._lock:
            got = self._facets.get(view)
        if got is not None and got[0] == fp:
            return got[1]
        out = self._facets_from_stats(view, snap)
        if out is None:
            from curate.serve.catalog import source_sql

            def count() -> None:
                cur = self._bg_con.cursor() if self._thread is not None else self.page_cursor()
                res: dict[str, list[tuple[str, int]]] = {S.REJECT_REASON: [], S.REJECT_STAGE: []}
                try:
                    for col in res:
                        have = [i for i in range(len(snap.files)) if snap.has_column(i, col)]
                        if not have:
                            continue
                        src = source_sql(snap, have)
                        res[col] = [(str(v), n) for v, n in cur.execute(
                            f"SELECT {col}, count(*) FROM {src} WHERE {col} IS NOT NULL GROUP BY 1 "
                            "ORDER BY 2 DESC, 1 LIMIT 200").fetchall()]
                finally:
                    cur.close()
                with self._lock:
                    self._facets[view] = (fp, res)

            if snap.total <= 200_000 or self._thread is None:
                count()
            else:
                self._job(("facets", view, fp), count, 0.0)
            with self._lock:
                got = self._facets.get(view)
            return got[1] if got is not None and got[0] == fp else {S.REJECT_REASON: [], S.REJECT_STAGE: []}
        with self._lock:
            self._facets[view] = (fp, out)
        return out

    def _facets_from_stats(self, view: str, snap) -> dict[str, list[tuple[str, int]]] | None:
        import json

        try:
            stats = json.loads(self.layout.stats.read_text())
            run = stats["run"]
            kept, rejected = int(run["kept"]), int(run["rejected"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if kept != self.total("kept") or rejected != self.total("rejected"):
            return None
        if view == "kept":
            return {S.REJECT_REASON: [], S.REJECT_STAGE: []}
        reasons = {str(k): int(v) for k, v in (run.get("rejected_by_reason") or {}).items() if v}
        stages: dict[str, int] = {}
        for st in stats.get("stages") or []:
            n = sum(int(v) for v in (st.get("rejected") or {}).values())
            if n:
                stages[str(st.get("id"))] = stages.get(str(st.get("id")), 0) + n
        if sum(reasons.values()) != rejected or sum(stages.values()) != rejected:
            return None

        def order(d: dict[str, int]) -> list[tuple[str, int]]:
            return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:200]

        return {S.REJECT_REASON: order(reasons), S.REJECT_STAGE: order(stages)}

    def rows_by_uid(self, uids: list[str], view: str = "samples") -> list[dict]:
        """Rows by uid (a scan of the view: for a few uids of a small output; pages use positions)."""
        cur = self.cursor()
        try:
            cols = ", ".join(f'"{c}"' for c in CARD_COLUMNS if c in self.columns)
            out = []
            for v in VIEWS if view == "samples" else (view,):
                rel = cur.execute(f"SELECT {cols}, _file, _row FROM {v}_pos WHERE uid IN (SELECT unnest($u)) "
                                  "LIMIT 1000", {"u": list(uids)})
                names = [d[0] for d in rel.description]
                out += [dict(zip(names, r), view=v) for r in rel.fetchall()]
            for r in out:
                r["_file"] = os.path.basename(r["_file"] or "")
            return out
        finally:
            cur.close()

    def rows_at(self, view: str, positions: list[tuple[str, int]]) -> list[dict]:
        """Card rows at (file name, row) positions of a view, in order (unknown files left out)."""
        from curate.serve.catalog import read_positions

        snap = self.snapshot(view)
        keep = [(snap.index[f], r) for f, r in positions if f in snap.index
                and 0 <= r < snap.files[snap.index[f]].rows]
        if not keep:
            return []
        cols = [c for c in CARD_COLUMNS if c in self.columns]
        t = read_positions(snap, self.handles, np.array([k[0] for k in keep]), np.array([k[1] for k in keep]), cols)
        return [dict(r, view=view) for r in t.to_pylist()]

    # -- duplicates -----------------------------------------------------------------------------
    def _dup_fingerprint(self) -> str:
        from curate.dup_groups import fingerprint_of

        entries = [(label, f.name, f.size) for label, view in (("data", "kept"), ("rejected", "rejected"))
                   for f in self.snapshot(view).files]
        return fingerprint_of(entries)

    def duplicate_table(self, wait: float = 3.0):
        """The duplicate-groups table (curate.dup_groups) of the current files: ``OUT/duplicate_groups`` when up
        to date, else written once (there, or in a folder of this process's own when the output is read-only),
        in the background, waiting up to ``wait`` s; None while it is being written."""
        from curate.dup_groups import DuplicateGroups, is_current, table_dir, write_duplicate_groups

        fp = self._dup_fingerprint()
        with self._lock:
            if self._dups is not None and self._dups[0] == fp:
                return self._dups[1]
        for folder in (table_dir(self.layout.root), self._writable_dir("duplicate_groups")):
            if is_current(folder, fp):
                t = DuplicateGroups(folder)
                with self._lock:
                    self._dups = (fp, t)
                return t
        dest = self._writable_dir("duplicate_groups")

        def build() -> None:
            if not is_current(dest, fp):
                write_duplicate_groups(self.layout.root, dest, threads=1 if self._thread is not None else None,
                                       memory_limit=BUILD_MEMORY)

        if not self._job(("dups", fp), build, wait):
            return None
        if not is_current(dest, fp):  # the files changed while it was written
            return None
        t = DuplicateGroups(dest)
        with self._lock:
            self._dups = (fp, t)
        return t

    def duplicate_groups(self, page: int, per: int) -> tuple[list[tuple], int]:
        """(kept uid, kinds, copies) of one page of groups (largest first), and the number of groups."""
        t = self.duplicate_table()
        if t is None:
            return [], -1
        return [(g["keeper"], g["kinds"], g["members"]) for g in t.page(page * per, per)], t.total

    def duplicate_group_page(self, uid: str, offset: int = 0, count: int = 1000):
        """(group, [the kept row's card], cards of its copies [offset, offset+count)) of the group whose kept row
        is ``uid``; None: no such group.  Each copy's card carries ``distance``, ``dup_kind``, ``dup_detail``."""
        t = self.duplicate_table()
        if t is None:
            raise InputError("the duplicate-groups table is being written; try again in a moment")
        found = t.find(uid)
        if found is None:
            return None
        _, g = found
        keeper = self.rows_at(g["keeper_view"], [(g["keeper_file"], g["keeper_row"])]) if g["keeper_view"] else []
        members = t.members_of(g, offset, count)
        cards = {(r["_file"], r["_row"]): r for r in self.rows_at("rejected", [(m["file"], m["row"]) for m in members])}
        out = []
        for m in members:
            card = dict(cards.get((m["file"], m["row"])) or {"uid": m["uid"], "view": "rejected", "_file": m["file"],
                                                                   "_row": m["row"]})
            card.update(distance=m["distance"], dup_detail=m["detail"], dup_kind=m["kind"])
            out.append(card)
        return g, keeper, out

    def duplicate_group(self, uid: str) -> tuple[list[dict], list[dict]]:
        """(the kept row, its copies) of the group of ``uid`` (up to 1,000 copies); empty lists: no such group."""
        got = self.duplicate_group_page(uid, 0, 1000)
        return ([], []) if got is None else (got[1], got[2])

    def duplicate_gallery(self, page: int, per: int, shown: int) -> tuple[list[dict], int] | None:
        """One page of groups, each with its kept row's card and its first ``shown`` copies (from the table:
        uid, kind, stage, reason, detail, distance, where stored); None while the table is being written."""
        t = self.duplicate_table(wait=2.0)
        if t is None:
            return None
        groups = t.page(page * per, per)
        keepers: dict[str, list] = {}
        for g in groups:
            if g["keeper_view"]:
                keepers.setdefault(g["keeper_view"], []).append((g["keeper_file"], g["keeper_row"]))
        cards = {}
        for view, pos in keepers.items():
            for r in self.rows_at(view, pos):
                cards[r["uid"]] = r
        for g in groups:
            g["keeper_card"] = cards.get(g["keeper"])
            g["copies"] = t.members_of(g, 0, shown)
        return groups, t.total

    # -- thumbnails -----------------------------------------------------------------------------
    def image_bytes(self, view: str, file: str, row: int) -> bytes | None:
        """The stored image of one row; the image column of the last few row groups read is cached."""
        if view not in VIEWS:
            raise InputError("bad view")
        snap = self.snapshot(view)
        i = snap.index.get(file)
        if i is None:
            raise InputError("no such file")
        entry = snap.files[i]
        if not 0 <= int(row) < entry.rows:
            raise InputError("no such row")
        if entry.schema.get_field_index(S.IMAGE) < 0:
            raise InputError("no such row")
        bounds = np.concatenate([[0], np.cumsum(entry.rg_rows)])
        g = int(np.searchsorted(bounds, int(row), side="right")) - 1
        key = (view, file, entry.mtime_ns, g)
        with self._lock:
            col = self._images.get(key)
            if col is not None:
                self._images.move_to_end(key)
        if col is None:
            col = self.handles.read_row_groups(snap.path(i), entry.mtime_ns, [g], [S.IMAGE]).column(0)
            with self._lock:
                self._images[key] = col
                while len(self._images) > 4:
                    self._images.popitem(last=False)
        return col[int(row) - int(bounds[g])].as_py()

    # -- search and subsets ---------------------------------------------------------------------
    def searcher(self):
        from curate.index import meta_path
        from curate.search import Searcher

        with self._lock:
            if self._searcher is None:
                if not meta_path(self.layout.root).exists():
                    raise InputError(f"no index: run `curate index {self.layout.root}` first")
                self._searcher = Searcher(self.layout.root)
            return self._searcher

    def save_subset(self, name: str, kind: str, condition: str) -> dict[str, Any]:
        """Write a subset of the kept rows satisfying ``condition`` (checked read-only first)."""
        from curate.export import export_datacomp_uids
        from curate.sql_guard import check_condition, one_line
        from curate.subset import refilter

        if not NAME_RE.fullmatch(name or "") or ".." in name:
            raise InputError("subset name: letters, digits, '_', '-', '.' (up to 100)")
        cur = self.cursor()
        try:
            check_condition(cur, condition)
            n = cur.execute(f"SELECT count(*) FROM kept WHERE ({condition})").fetchone()[0]
        except InputError:
            raise
        except Exception as e:  # duckdb.Error
            raise InputError(f"subset: {one_line(e)}") from None
        finally:
            cur.close()
        self.subsets.mkdir(parents=True, exist_ok=True)
        if kind == "output":
            dest = self.subsets / name
            if dest.exists():
                raise FileExistsError(f"subset {name} exists")
            res = refilter(self.layout.root, dest, condition, reason="not_in_subset", readonly_sql=True)
            return {"kind": kind, "path": str(dest), "rows": res["kept_after"], "of": res["kept_before"]}
        if kind == "datacomp-uids":
            dest = self.subsets / (name if name.endswith(".npy") else name + ".npy")
            if dest.exists():
                raise FileExistsError(f"subset {dest.name} exists")
            try:  # DataComp's uids are 32 hex digits; other uids are hashed (md5), as `export --hash-uids`
                info = export_datacomp_uids(self.layout.root, dest, where=f"({condition})")
            except InputError:
                info = export_datacomp_uids(self.layout.root, dest, where=f"({condition})", hash_uids=True)
            return {"kind": kind, "path": info["path"], "rows": info["uids"], "of": n}
        raise InputError("subset kind: output or datacomp-uids")
