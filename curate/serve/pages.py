"""Pages of rows at any depth, without a scan per request (issue #28): filtered views, counted in the background.

Three ways to page a view (``kept`` or ``rejected``), chosen by its filter and order:

* **storage order, no filter**: row ``N`` is found from the Parquet footers (:mod:`curate.serve.catalog`):
  the file and row group holding it, then only that row group is read.  Any page number, exact.
* **storage order, filtered** (reason, stage, score range, SQL condition; this module): a :class:`Matcher`
  finds the matching rows file by file -- files whose row-group statistics exclude the filter are never
  opened, the others are read in windows of files by DuckDB (which reads only the columns the condition
  needs and skips row groups by their statistics) -- and remembers, per file, the rows that match.  Pages go
  by cursor (``after=FILE:ROW`` / ``before=FILE:ROW``: the keyset is the storage position,
  :mod:`curate.serve.cursors`), each request scanning only until its page is full (or its time budget is
  spent: then the page says how far it searched and offers to go on).  Counting runs in the background
  (:class:`Matchers` lists what is left to count); once the files before a page are counted, ``page=N``
  jumps there exactly, and the total is known when all are.
* **sorted** (``order=COLUMN:asc|desc``, NULLS LAST, ties by ``uid``): a sort index (value, uid, file,
  row in value order, one Parquet file with row groups of 2,048, :mod:`curate.serve.sort_index`) is written
  once per (view, column) and output state; a page at any depth or after any keyset cursor
  (``after=VALUE|UID``) is then one or two row-group reads.  A range filter on the sorted column is a slice
  of the index.  With another filter as well, once the filter's rows are all known, a :class:`Selection`
  (this module) walks the index through them once and pages come from it at any depth; before that, a page
  is DuckDB's top-N over the files with the keyset as a condition (a scan of the filtered columns, no page
  jumps: ``next`` / ``previous`` / ``first``).

The names of :mod:`curate.serve.cursors` and :mod:`curate.serve.sort_index` are importable from here too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from curate import schema as S
from curate.serve.catalog import Snapshot, source_sql
from curate.serve.cursors import FILE_COL, Window, key_text, parse_cursor, parse_key, read_window
from curate.serve.sort_index import SORT_RG, SortIndex, build_sort_index, sort_index_sql, sorted_window

__all__ = [  # with the names of curate.serve.cursors and curate.serve.sort_index that others import from here
    "BUDGET_S", "FILE_COL", "MATCH_BYTES", "SORT_RG", "WINDOW_ROWS",
    "Matcher", "Matchers", "Selection", "SortIndex", "Window",
    "build_sort_index", "candidate_files", "count_until", "filtered_after", "filtered_at", "filtered_before",
    "key_text", "parse_cursor", "parse_key", "read_window", "selection_window", "sort_index_sql", "sorted_window",
]

log = logging.getLogger(__name__)

# read from this module's globals at call time (tests patch them here)
WINDOW_ROWS = 65_536  # rows of one DuckDB scan of a filtered view (a window of whole files)
BUDGET_S = 0.2  # scanning one page may take; then it answers with what it found and a cursor to go on
MATCH_BYTES = 256 << 20  # matching rows remembered, all filters together (least recently used dropped)


# -- filtered views ----------------------------------------------------------------------------------
def candidate_files(snap: Snapshot, reason: str = "", stage: str = "", metric: str = "", lo: float | None = None,
                    hi: float | None = None) -> np.ndarray:
    """Files that may hold matching rows (by their row groups' statistics)."""
    ok = np.ones(len(snap.rg_file), bool)
    for col, value in ((S.REJECT_REASON, reason), (S.REJECT_STAGE, stage)):
        if not value:
            continue
        mins, maxs, empty = snap.str_stats[col]
        may = np.array([not e and (mn is None or mx is None or (str(mn) <= value <= str(mx)))
                        for mn, mx, e in zip(mins, maxs, empty)], bool)
        ok &= may if len(may) else ok
    if metric and (lo is not None or hi is not None) and metric in snap.num_stats:
        mn, mx = snap.num_stats[metric]
        with np.errstate(invalid="ignore"):
            if lo is not None:
                ok &= ~(mx < lo)  # NaN (no statistics) keeps the row group
            if hi is not None:
                ok &= ~(mn > hi)
    files = np.zeros(len(snap.files), bool)
    if len(snap.rg_file):
        files[np.unique(snap.rg_file[ok])] = True
    return files


class Matcher:
    """The rows of one snapshot of a view that satisfy one filter, found file by file (thread-safe)."""

    def __init__(self, snap: Snapshot, where_sql: str, params: dict[str, Any], candidates: np.ndarray) -> None:
        n = len(snap.files)
        self.snap, self.where_sql, self.params = snap, where_sql, params
        self.counts = np.full(n, -1, np.int64)
        self.counts[~candidates] = 0
        self.rows: list[np.ndarray | None] = [None] * n
        self.frontier = 0
        self.nbytes = 0
        self.lock = threading.Lock()
        self.scan_lock = threading.Lock()
        self.error: str | None = None
        self.key: tuple = ()
        self._advance()

    def _advance(self) -> None:
        c = self.counts
        while self.frontier < len(c) and c[self.frontier] >= 0:
            self.frontier += 1

    @property
    def complete(self) -> bool:
        return self.frontier >= len(self.counts)

    @property
    def total(self) -> int | None:
        return int(self.counts.sum()) if self.complete else None

    def counted_share(self) -> float:
        rows = np.diff(self.snap.file_start)
        done = rows[self.counts >= 0].sum()
        return float(done / rows.sum()) if rows.sum() else 1.0

    def matches(self, i: int) -> np.ndarray:
        r = self.rows[i]
        return r if r is not None else np.zeros(0, np.int32)

    def window_from(self, i: int, step: int) -> list[int]:
        """Files not yet scanned from file ``i`` on (``step`` +1) or back (-1), up to WINDOW_ROWS rows."""
        out, rows = [], 0
        n = len(self.counts)
        while 0 <= i < n and (not out or rows < WINDOW_ROWS):
            if self.counts[i] < 0:
                out.append(i)
                rows += self.snap.files[i].rows
            elif out:
                break
            i += step
        return sorted(out)

    def scan(self, cursor_factory: Callable, files: list[int], count_only: bool = False) -> None:
        """Find the matching rows of ``files`` (those not found before) with one DuckDB query."""
        with self.scan_lock:
            files = [i for i in files if self.counts[i] < 0]
            if not files:
                return
            src = source_sql(self.snap, files, FILE_COL, True)
            where = f" WHERE {self.where_sql}" if self.where_sql else ""
            sql = f"SELECT {FILE_COL}, file_row_number FROM {src}{where}"
            cur = cursor_factory()
            try:
                got = (cur.execute(sql, self.params) if self.params else cur.execute(sql)).fetchnumpy()
            finally:
                cur.close()
            names = np.asarray(got[FILE_COL], dtype=object)
            rows = np.asarray(got["file_row_number"], dtype=np.int64)
            found: dict[int, list] = {}
            if len(names):
                order = np.argsort(names, kind="stable")
                uniq, starts = np.unique(names[order], return_index=True)
                for name, sel in zip(uniq, np.split(order, starts[1:])):
                    found[self.snap.index[os.path.basename(name)]] = np.sort(rows[sel]).astype(np.int32)
            with self.lock:
                for i in files:
                    got = found.get(i, np.zeros(0, np.int32))
                    self.counts[i] = len(got)
                    if not count_only or len(got) == 0:
                        self.rows[i] = got
                        self.nbytes += got.nbytes
                self._advance()

    def ensure(self, cursor_factory: Callable, i: int) -> np.ndarray:
        """The matching rows of file ``i`` (scanning it, with its neighbours, if not known)."""
        if self.counts[i] < 0 or (self.counts[i] > 0 and self.rows[i] is None):
            if self.counts[i] > 0:  # counted only: scan again for the rows
                with self.lock:
                    self.counts[i] = -1
                    self.frontier = min(self.frontier, i)
            self.scan(cursor_factory, self.window_from(i, 1))
        return self.matches(i)


def _deadline(budget: float | None) -> Callable[[], bool]:
    end = time.monotonic() + (BUDGET_S if budget is None else budget)
    return lambda: time.monotonic() > end


def filtered_after(m: Matcher, cur: Callable, start: tuple[int, int] | None, per: int,
                   budget: float | None = None) -> Window:
    """The ``per`` matching rows after storage position ``start`` (None: from the beginning)."""
    snap = m.snap
    n = len(snap.files)
    fi, row = start if start is not None else (0, -1)
    out_f, out_r = [], []
    over = _deadline(budget)
    i = fi
    searched_to = None
    scanned = False
    while i < n and len(out_f) < per + 1:
        if m.counts[i] == 0:
            i += 1
            continue
        if m.counts[i] < 0:
            if scanned and over():  # one window at least, whatever the budget
                searched_to = i
                break
            scanned = True
        rows = m.ensure(cur, i)
        if i == fi:
            rows = rows[rows > row]
        take = rows[: per + 1 - len(out_f)]
        out_f += [i] * len(take)
        out_r += take.tolist()
        i += 1
    w = Window(np.array(out_f[:per], np.int64), np.array(out_r[:per], np.int64))
    w.has_next = len(out_f) > per or searched_to is not None
    if searched_to is not None:
        share = snap.file_start[searched_to] / max(1, snap.total)
        w.note = (f"searched the rows up to file {snap.files[searched_to].name} ({share:.0%} of the view) in this "
                  f"request; the next page goes on from there")
        w.after = f"{snap.files[searched_to - 1].name}:{snap.files[searched_to - 1].rows - 1}" \
            if len(out_f) == 0 and searched_to > 0 else ""
    _finish(m, w, per)
    return w


def filtered_before(m: Matcher, cur: Callable, end: tuple[int, int] | None, per: int,
                    budget: float | None = None) -> Window:
    """The ``per`` matching rows before storage position ``end`` (None: up to the last row)."""
    snap = m.snap
    n = len(snap.files)
    fi, row = end if end is not None and end[0] < n else (n - 1, 1 << 62)
    out_f: list[int] = []
    out_r: list[int] = []
    over = _deadline(budget)
    i = fi
    searched_from = None
    scanned = False
    while i >= 0 and len(out_f) < per + 1:
        if m.counts[i] == 0:
            i -= 1
            continue
        if m.counts[i] < 0:
            if scanned and over():
                searched_from = i
                break
            scanned = True
            m.scan(cur, m.window_from(i, -1))
        rows = m.ensure(cur, i)
        if i == fi:
            rows = rows[rows < row]
        take = rows[max(0, len(rows) - (per + 1 - len(out_f))):]
        out_f = [i] * len(take) + out_f
        out_r = take.tolist() + out_r
        i -= 1
    w = Window(np.array(out_f[-per:] if out_f else [], np.int64), np.array(out_r[-per:] if out_r else [], np.int64))
    w.has_prev = len(out_f) > per or searched_from is not None
    if searched_from is not None:
        share = 1 - snap.file_start[searched_from + 1] / max(1, snap.total)
        w.note = f"searched back to file {snap.files[searched_from + 1].name} ({share:.0%} of the view) in this request"
    w.has_next = end is not None  # there is at least the row the cursor named
    _finish(m, w, per, backwards=True)
    return w


def _finish(m: Matcher, w: Window, per: int, backwards: bool = False) -> None:
    snap = m.snap
    w.total = m.total
    w.counted = m.counted_share()
    if len(w.files):
        f0 = int(w.files[0])
        if f0 < m.frontier or m.complete:  # files before it all counted: its index is known
            before = int(m.counts[:f0].sum())
            w.first = before + int(np.searchsorted(m.matches(f0), w.rows[0])) if m.rows[f0] is not None else None
        if not backwards:
            w.has_prev = w.first != 0 if w.first is not None else True
        w.before = f"{snap.files[f0].name}:{int(w.rows[0])}"
        fl = int(w.files[-1])
        w.after = w.after or f"{snap.files[fl].name}:{int(w.rows[-1])}"
        if w.first is not None and w.total is not None:
            w.has_next = w.first + len(w.files) < w.total


def count_until(m: Matcher, cur: Callable, need: int, budget: float) -> bool:
    """Count from the frontier until ``need`` matching rows lie before it (or all are counted): True if reached."""
    over = _deadline(budget)
    scanned = False
    while not m.complete:
        if int(m.counts[: m.frontier].sum()) >= need:
            return True
        if scanned and over():  # one window at least, whatever the budget
            return False
        m.scan(cur, m.window_from(m.frontier, 1))
        scanned = True
    return True


def filtered_at(m: Matcher, cur: Callable, offset: int, per: int, budget: float | None = None) -> Window:
    """The page starting at the ``offset``-th matching row (exact: counts the files before it first)."""
    if offset == 0:
        return filtered_after(m, cur, None, per, budget)
    if not count_until(m, cur, offset + 1, budget):
        w = Window(np.zeros(0, np.int64), np.zeros(0, np.int64), counted=m.counted_share())
        w.pending = (f"counting the matching rows: {int(m.counts[:m.frontier].sum())} found in the first "
                     f"{w.counted:.0%} of the view so far; page {offset // max(1, per) + 1} is further on")
        return w
    cum = np.cumsum(np.where(m.counts[: m.frontier] > 0, m.counts[: m.frontier], 0))
    if m.complete and (not len(cum) or offset >= cum[-1]):
        offset = max(0, int(cum[-1]) - 1 if len(cum) else 0) // per * per
    if not len(cum) or cum[-1] == 0:
        w = Window(np.zeros(0, np.int64), np.zeros(0, np.int64))
        _finish(m, w, per)
        return w
    i = int(np.searchsorted(cum, offset, side="right"))
    before = int(cum[i - 1]) if i else 0
    rows = m.ensure(cur, i)
    start_row = int(rows[offset - before]) - 1 if offset - before < len(rows) else -1
    w = filtered_after(m, cur, (i, start_row), per, budget)
    return w



# -- sorted and filtered views -----------------------------------------------------------------------
class Selection:
    """The rows of a complete :class:`Matcher` in the order of a :class:`SortIndex`: their positions in the
    index (ascending), found once by reading the index's (file, row) columns -- then a sorted and filtered
    view is paged like a sorted one, at any depth."""

    def __init__(self, ix: SortIndex, m: Matcher) -> None:
        import pyarrow.compute as pc

        snap = m.snap
        bits = np.zeros(max(1, snap.total), bool)
        for i in range(len(snap.files)):
            r = m.rows[i]
            if r is not None and len(r):
                bits[snap.file_start[i] + r] = True
        parts, off = [], 0
        for batch in ix.pf.iter_batches(batch_size=1 << 16, columns=["file", "row"]):
            d = pc.dictionary_encode(batch.column(0))
            fidx = np.array([snap.index.get(x, -1) for x in d.dictionary.to_pylist()] or [-1], np.int64)
            f = fidx[np.asarray(d.indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)]
            rows = np.asarray(batch.column(1).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
            ok = f >= 0
            g = np.where(ok, snap.file_start[np.maximum(f, 0)] + rows, 0)
            parts.append(np.flatnonzero(ok & bits[np.minimum(g, len(bits) - 1)]) + off)
            off += batch.num_rows
        self.order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.nn = int(np.searchsorted(self.order, ix.nn))  # selected rows with a value
        self.nbytes = self.order.nbytes

    @staticmethod
    def complete(m: Matcher) -> bool:
        """Whether ``m`` knows every matching row (not only counts)."""
        return m.complete and all(c == 0 or r is not None for c, r in zip(m.counts.tolist(), m.rows))

    def offset_of(self, ix: SortIndex, key: tuple[float | None, str], desc: bool, inclusive: bool) -> int:
        value, uid = key
        if not desc or value is None:
            return int(np.searchsorted(self.order, ix.bound(value, uid, "le" if inclusive else "lt")))
        return max(0, self.nn - int(np.searchsorted(self.order, ix.bound(value, uid, "lt" if inclusive else "le"))))

    def positions(self, offset: int, count: int, desc: bool) -> np.ndarray:
        o = np.arange(offset, min(len(self.order), offset + count), dtype=np.int64)
        if desc:
            o = np.where(o < self.nn, self.nn - 1 - o, o)
        return self.order[o]


def selection_window(ix: SortIndex, sel: Selection, snap: Snapshot, per: int, desc: bool, offset: int | None = None,
                     after: tuple | None = None, before: tuple | None = None, last: bool = False) -> Window:
    """A page of a sorted and filtered view from its :class:`Selection` (the rows read from the index)."""
    total = len(sel.order)
    if after is not None:
        offset = sel.offset_of(ix, after, desc, True)
    elif before is not None:
        offset = max(0, sel.offset_of(ix, before, desc, False) - per)
    elif last or (offset or 0) >= total:
        offset = max(0, (total - 1) // per * per)
    offset = max(0, min(offset or 0, max(0, total - 1)))
    pos = sel.positions(offset, per, desc)
    parts = []
    for k, p in enumerate(pos.tolist()):
        g = int(np.searchsorted(ix.starts, p, side="right")) - 1
        parts.append(ix.group(g, full=True).slice(p - int(ix.starts[g]), 1))
    t = pa.concat_tables(parts) if parts else ix.pf.schema_arrow.empty_table()
    idx = [snap.index.get(f, -1) for f in t.column("file").to_pylist()]
    w = Window(np.array(idx, np.int64), np.asarray(t.column("row").to_numpy(zero_copy_only=False), np.int64),
               first=offset, total=total)
    if t.num_rows and all(i >= 0 for i in idx):
        w.cards = t.drop_columns(["value", "file", "row"]) \
            .append_column("_file", t.column("file")).append_column("_row", t.column("row"))
    w.keys = [key_text(v, u) for v, u in zip(t.column("value").to_pylist(), t.column("uid").to_pylist())]
    w.has_prev, w.has_next = offset > 0, offset + t.num_rows < total
    if w.keys:
        w.before, w.after = w.keys[0], w.keys[-1]
    return w



# -- a registry of matchers (bounded) -------------------------------------------------------------------
class Matchers:
    """Matchers by (snapshot, filter), least recently used dropped beyond MATCH_BYTES."""

    def __init__(self, limit: int = MATCH_BYTES) -> None:
        self.limit = limit
        self._m: OrderedDict[tuple, Matcher] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], Matcher]) -> Matcher:
        with self._lock:
            m = self._m.get(key)
            if m is not None:
                self._m.move_to_end(key)
                return m
        m = make()
        m.key = key
        with self._lock:
            m = self._m.setdefault(key, m)
            self._m.move_to_end(key)
            size = sum(x.nbytes for x in self._m.values())
            while size > self.limit and len(self._m) > 1:
                _, old = self._m.popitem(last=False)
                size -= old.nbytes
            return m

    def pending(self) -> list[Matcher]:
        """Incomplete matchers, most recently used first (what the background counter works on)."""
        with self._lock:
            return [m for m in reversed(self._m.values()) if not m.complete and m.error is None]
