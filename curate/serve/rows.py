"""Rows pages of ``curate serve`` in storage order, unfiltered or filtered, and rows by position or uid.

:meth:`RowPages.browse` answers every rows page: it checks the filter, picks the way to page (storage order
from the footers, a filtered view by cursor -- :mod:`curate.serve.pages` -- or a sorted view --
:mod:`curate.serve.sorted_rows`) and reads the page's cards.  Also here: card rows at given positions or
of given uids, and the stored image of one row (thumbnails).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from curate import schema as S
from curate.io.files import InputError
from curate.serve.filters import CARD_COLUMNS, PAGE_MAX, VIEWS, Filter


class RowPages:
    """Rows pages (a part of :class:`curate.serve.data.Explorer`, whose ``__init__`` makes the state it uses: its
    snapshots, locked page connection, handles, matchers and image cache)."""

    def filter(self, **kw: Any) -> Filter:
        return Filter(columns=self.numeric, **kw)

    def page(self, view: str, flt: Filter, page: int, per: int, order: str = "") -> tuple[list[dict], int]:
        """(rows of one page as dicts, total matching rows; -1 while not counted yet)."""
        rows, w = self.browse(view, flt, per, order=order, page=page)
        return rows, -1 if w.total is None else int(w.total)

    def browse(self, view: str, flt: Filter, per: int, order: str = "", page: int | None = None, after: str = "",
               before: str = "", last: bool = False):
        """(rows of one page as dicts, its :class:`curate.serve.cursors.Window`): by page number (``page``), after
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
            from curate.serve.cursors import read_window

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

        from curate.serve.cursors import parse_cursor

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
        from curate.serve.cursors import Window

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
