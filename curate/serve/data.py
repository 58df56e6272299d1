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

:class:`Explorer` holds the state (connections, footers, caches); what it does is split by role:

* :mod:`curate.serve.filters`: the views, the card columns, a page's :class:`Filter`;
* :mod:`curate.serve.connection`: the DuckDB connections (views, locked, build);
* :mod:`curate.serve.background`: the background thread (jobs, counts);
* :mod:`curate.serve.rows`: rows pages in storage order, filtered or not; rows by position; thumbnails;
* :mod:`curate.serve.sorted_rows`: sorted rows pages;
* :mod:`curate.serve.facets`: rows per reject reason and stage;
* :mod:`curate.serve.duplicates`: the duplicate-groups pages;
* :mod:`curate.serve.subsets`: searches and subsets.

Their public names are importable from here as before.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from curate import schema as S
from curate.io.files import InputError
from curate.layout import Layout
from curate.serve.background import JOBS, BackgroundJobs
from curate.serve.connection import (
    BUILD_MEMORY,
    SQL_MAX_ROWS,
    SQL_TIMEOUT,
    build_connection,
    locked_connection,
    views_connection,
)
from curate.serve.duplicates import DuplicatePages
from curate.serve.facets import Facets
from curate.serve.filters import CARD_COLUMNS, NUMERIC, PAGE_MAX, VIEWS, Filter
from curate.serve.rows import RowPages
from curate.serve.sorted_rows import SCAN_ROWS, SORT_VERSION, SortedPages
from curate.serve.subsets import NAME_RE, Subsets

__all__ = [
    "BUILD_MEMORY", "CARD_COLUMNS", "JOBS", "NAME_RE", "NUMERIC", "PAGE_MAX", "SCAN_ROWS", "SORT_VERSION",
    "SQL_MAX_ROWS", "SQL_TIMEOUT", "VIEWS",
    "Explorer", "Filter",
    "build_connection",
]


class Explorer(RowPages, SortedPages, Facets, DuplicatePages, Subsets, BackgroundJobs):
    """What the app reads (see the module doc).  ``background=False``: no background thread (counts and tables
    are then made on demand, in the request)."""

    def __init__(self, output: str | Path, subsets_dir: str | Path | None = None, background: bool = True) -> None:
        from curate.query import connect
        from curate.serve.catalog import Catalog, Handles
        from curate.serve.pages import Matchers

        self.layout = Layout(Path(output).expanduser().resolve())
        self.subsets = Path(subsets_dir).expanduser().resolve() if subsets_dir else self.layout.root / "subsets"
        if not self.layout.root.is_dir() or (not self.layout.data.is_dir() and not self.layout.rejected.is_dir()):
            connect(self.layout.root).close()  # its one-line error
        self._con = None  # the views connection (SQL box, subsets), made on first use: binding views over
        self._con_lock = threading.Lock()  # every file reads every footer (13 s and 1.3 GB at 20M rows)
        # pages need no view: a locked connection reading the files they name
        self._page_con = locked_connection(self.layout)
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
        self._bg_con = locked_connection(self.layout, threads=1)
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
                self._con = views_connection(self.layout)
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

    def snapshot(self, view: str):
        if view not in VIEWS:
            raise InputError(f"no view {view[:40]!r}")
        return self.catalogs[view].snapshot()

    def total(self, view: str) -> int:
        return self.snapshot(view).total
