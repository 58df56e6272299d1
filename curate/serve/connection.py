"""The DuckDB connections of ``curate serve``.

* :func:`views_connection`: the views ``kept``, ``rejected``, ``samples`` plus ``kept_pos`` /
  ``rejected_pos`` (the same rows with ``_file`` and ``_row``), created before the connection is locked
  (curate.sql_guard): for SQL from the user (the SQL box, subsets, searches; SQL_MAX_ROWS, SQL_TIMEOUT
  bound the SQL box);
* :func:`locked_connection`: no views, locked to ``data/`` and ``rejected/``: pages and the background
  counts run conditions over the files they name;
* :func:`build_connection`: the tables the server writes itself (no user SQL): bounded memory, spilling.
"""

from __future__ import annotations

from pathlib import Path

from curate.io.sql import sql_string
from curate.layout import Layout
from curate.serve.filters import VIEWS

SQL_MAX_ROWS = 200
SQL_TIMEOUT = 30.0
BUILD_MEMORY = "256MB"  # DuckDB's memory for a sort index or the groups table built by the server (it spills)


def views_connection(layout: Layout):
    """A locked connection with the views ``kept``, ``rejected``, ``samples``, ``kept_pos``, ``rejected_pos``
    (binding views over every file reads every footer: the app makes it on first use)."""
    from curate.query import connect, scan_sql
    from curate.sql_guard import lock_down

    con = connect(layout.root)
    for view in VIEWS:
        src = scan_sql(layout, view)
        if src:
            src = src[:-1] + ", filename = '_file', file_row_number = true)"
            con.execute(f"CREATE VIEW {view}_pos AS SELECT * EXCLUDE (file_row_number), "
                        f"file_row_number AS _row FROM {src}")
        else:
            con.execute(f"CREATE VIEW {view}_pos AS SELECT *, NULL::VARCHAR AS _file, "
                        f"NULL::BIGINT AS _row FROM {view} LIMIT 0")
    lock_down(con, [layout.data, layout.rejected])
    return con


def locked_connection(layout: Layout, threads: int | None = None):
    """A connection without views, locked to the output's ``data/`` and ``rejected/`` (``threads``: DuckDB's)."""
    import duckdb

    from curate.sql_guard import lock_down

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    lock_down(con, [layout.data, layout.rejected])
    return con


def build_connection(scratch: Path, threads: int):
    """A DuckDB connection for the tables the server writes (no user SQL): bounded memory, spilling beside them."""
    import duckdb

    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET memory_limit = '{BUILD_MEMORY}'")
    con.execute(f"SET temp_directory = {sql_string(str(scratch / '.duckdb-tmp'))}")
    return con
