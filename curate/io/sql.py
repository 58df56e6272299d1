"""The small pieces of DuckDB SQL curate composes: string and list literals, and results as Arrow tables.

Imports nothing of curate: the query layer, the dedup stages and the runners' fit views all build on it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def sql_string(value: str) -> str:
    """A SQL string literal: the one place curate quotes a value into SQL.  Only for SQL that cannot
    take bound parameters (``CREATE VIEW``, sub-queries composed into a larger query); a query run
    directly binds its values (``con.execute(sql, params)``)."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(paths: list[str]) -> str:
    """A DuckDB list literal of paths, for SQL composed into views and larger queries (which cannot
    take bound parameters); a query run directly binds its paths instead."""
    return "[" + ", ".join(sql_string(str(p)) for p in paths) + "]"


def arrow(rel: Any) -> pa.Table:
    """A DuckDB relation's rows as an Arrow table (whichever of DuckDB's Arrow methods this version has)."""
    t = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    return t.read_all() if isinstance(t, pa.RecordBatchReader) else t
