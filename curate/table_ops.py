"""Small pyarrow helpers shared by stages and runners."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S


def stable_uid(url: str | None, caption: str | None) -> str:
    """The uid of a row whose input has none: sha256 over url and caption, 32 hex chars."""
    h = hashlib.sha256()
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def prepare_for_stages(table: pa.Table) -> pa.Table:
    """Give a user's table the bookkeeping columns stages expect (for notebooks)."""
    n = table.num_rows
    if S.UID not in table.column_names:
        urls = table[S.URL].to_pylist() if S.URL in table.column_names else [None] * n
        caps = table[S.CAPTION].to_pylist() if S.CAPTION in table.column_names else [None] * n
        table = table.append_column(S.UID, pa.array([stable_uid(u, c) for u, c in zip(urls, caps)]))
    for col in S.REJECT_COLUMNS:
        if col not in table.column_names:
            table = table.append_column(S.field(col), S.null_column(col, n))
    return table


def with_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray | list) -> pa.Table:
    """Set (replace or append) column ``name`` typed as the schema says."""
    type_ = S.type_of(name) if name in S.COLUMNS else None
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values, type=type_)
    elif type_ is not None and values.type != type_:
        values = values.cast(type_)
    idx = table.schema.get_field_index(name)
    f = pa.field(name, values.type)
    return table.set_column(idx, f, values) if idx >= 0 else table.append_column(f, values)


def mark_rejected(
    table: pa.Table,
    mask: "pa.Array | list[bool]",
    reason: "str | pa.Array | list[str | None]",
    stage_id: str,
    detail: "str | pa.Array | list[str | None] | None" = None,
    error_type: "str | pa.Array | list[str | None] | None" = None,
) -> pa.Table:
    """Set the reject columns on rows where ``mask`` is true and that are not rejected yet."""
    if not isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = pa.array(mask, pa.bool_())
    mask = pc.and_(pc.fill_null(mask, False), pc.is_null(table[S.REJECT_REASON]))
    n = table.num_rows

    def _arr(v):
        if v is None:
            return pa.nulls(n, pa.string())
        if isinstance(v, str):
            return pa.array([v] * n, pa.string())
        return v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, pa.string())

    for col, new in ((S.REJECT_REASON, _arr(reason)), (S.REJECT_STAGE, _arr(stage_id)),
                     (S.REJECT_DETAIL, _arr(detail)), (S.ERROR_TYPE, _arr(error_type))):
        table = with_column(table, col, pc.if_else(mask, new, table[col]))
    return table


def add_missing(table: pa.Table, fields: list[pa.Field]) -> pa.Table:
    for f in fields:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        elif table.schema.field(f.name).type != f.type:
            table = with_column(table, f.name, table[f.name].cast(f.type))
    return table
