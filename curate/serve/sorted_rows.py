"""Sorted rows pages of ``curate serve`` (``order=COLUMN:asc|desc``): sort indexes, selections, top-N scans.

A sorted view is paged from its sort index (:mod:`curate.serve.sort_index`), written once per (view,
column) and state of the files, in the background.  Filtered by another column as well, it is paged from
the index walked through the filter's rows (a :class:`curate.serve.pages.Selection`) once they are all
known, and before that by DuckDB's top-N over the files with the keyset as a condition.
"""

from __future__ import annotations

import os

import numpy as np

from curate.io.files import InputError
from curate.serve.connection import build_connection
from curate.serve.filters import CARD_COLUMNS, Filter

SCAN_ROWS = 2_000_000  # a sorted and filtered view scans its files per page up to this many rows, else waits
SORT_VERSION = "v2"  # sort indexes carry the card columns


class SortedPages:
    """Sorted rows pages (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses: its
    sort indexes and selections, by view and column)."""

    def sort_index(self, view: str, column: str, snap, wait: float):
        """The sort index of (view, column) for the snapshot's files: opened, or built (in the background,
        waiting up to ``wait`` s); None while it is being built."""
        from curate.serve.sort_index import SortIndex, build_sort_index

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
        from curate.serve.cursors import Window, parse_key
        from curate.serve.sort_index import sorted_window

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
            from curate.serve.cursors import Window

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
        from curate.serve.cursors import FILE_COL, Window, key_text, parse_key
        from curate.serve.pages import candidate_files

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
