"""Read-only DuckDB over an output, for SQL that comes from someone else (``curate serve``'s SQL box,
``--where`` conditions of searches and saved subsets).

Two independent locks:

* the connection: the views ``kept``, ``rejected`` and ``samples`` (curate.query.connect) are created
  first; then ``allowed_directories`` is set to the output's ``data/`` and ``rejected/``,
  ``enable_external_access = false`` (no other file, no network, no extension loading, no ATTACH,
  no COPY anywhere else) and ``lock_configuration = true`` (no ``SET`` can undo it);
* the statement: DuckDB's own parser (``extract_statements``) must find exactly one statement, of
  type SELECT -- so no CREATE, INSERT, COPY, ATTACH, SET, PRAGMA, EXPORT, CALL, ... even of the
  in-memory catalog.

Every refusal is a :class:`SqlRefused` with a one-line message.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from curate.io.files import InputError

MAX_SQL_CHARS = 20_000


class SqlRefused(InputError):
    """SQL that is not one read-only SELECT, or that DuckDB rejects (one line)."""


def one_line(e: BaseException | str) -> str:
    """DuckDB's message on one line, without its ``LINE 1: ... ^^^`` excerpt."""
    return " ".join(str(e).split()).split(" LINE 1:")[0][:500]


def lock_down(con, directories: list[Path]) -> None:
    """Forbid every file but those under ``directories``, and any later change of settings."""
    allowed = sorted({str(d).rstrip("/") + "/" for p in directories for d in (p, Path(p).resolve())})
    con.execute("SET allowed_directories = $dirs", {"dirs": allowed})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def readonly_connect(output: str | Path):
    """``curate.query.connect(output)`` locked down as the module doc says."""
    from curate.layout import Layout
    from curate.query import connect

    con = connect(output)
    layout = Layout(Path(output))
    lock_down(con, [layout.data, layout.rejected])
    return con


def empty_connect():
    """A connection with no file access at all (for conditions over registered Arrow tables)."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_select(con, sql: str) -> str:
    """``sql`` if it is exactly one SELECT statement (DuckDB's parser decides), else SqlRefused."""
    import duckdb

    if not isinstance(sql, str) or not sql.strip():
        raise SqlRefused("empty SQL")
    if len(sql) > MAX_SQL_CHARS:
        raise SqlRefused(f"SQL longer than {MAX_SQL_CHARS} characters")
    if "\x00" in sql:
        raise SqlRefused("SQL contains a NUL character")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlRefused(f"cannot parse: {one_line(e)}") from None
    if len(statements) != 1:
        raise SqlRefused(f"exactly one statement allowed, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlRefused(f"read-only: only SELECT is allowed, not {kind.name}")
    return sql


def check_condition(con, where: str) -> str:
    """A boolean SQL expression for ``WHERE (...)``: DuckDB must parse it as one expression (a condition
    that closes the parenthesis to append clauses does not), and ``SELECT 1 WHERE (...)`` as one SELECT."""
    import duckdb

    if not isinstance(where, str) or not where.strip():
        raise SqlRefused("empty condition")
    if len(where) > MAX_SQL_CHARS or "\x00" in where:
        raise SqlRefused("condition too long or holds a NUL character")
    try:
        duckdb.SQLExpression(where)
    except duckdb.Error as e:
        raise SqlRefused(f"not a condition: {one_line(e)}") from None
    check_select(con, f"SELECT 1 WHERE ({where})")
    return where


def run_select(con, sql: str, params: dict[str, Any] | list | None = None, max_rows: int = 1000,
               timeout: float | None = None):
    """(column names, rows, more) of one checked SELECT, at most ``max_rows`` rows; a query running past
    ``timeout`` seconds is interrupted."""
    import duckdb

    check_select(con, sql)
    timer = threading.Timer(timeout, con.interrupt) if timeout else None
    try:
        if timer:
            timer.start()
        rel = con.execute(sql, params) if params else con.execute(sql)
        names = [d[0] for d in rel.description or []]
        rows = rel.fetchmany(max_rows + 1)
    except duckdb.InterruptException:
        raise SqlRefused(f"query interrupted after {timeout:g} s") from None
    except duckdb.Error as e:
        raise SqlRefused(one_line(e)) from None
    finally:
        if timer:
            timer.cancel()
    return names, rows[:max_rows], len(rows) > max_rows
