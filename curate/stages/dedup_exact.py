"""``dedup_exact``: rows with the same key across the whole corpus; one per group is kept.

``key`` is a list of fields that must all be equal (null in any field: the row is not
deduplicated by this stage):

* ``image``: ``image_sha256``, the sha256 of the downloaded bytes (default);
* ``url``: the normalised URL -- surrounding blanks and the ``#fragment`` dropped, scheme
  dropped (``http`` = ``https``), host lower-cased without ``www.``, userinfo and default ports
  (``:80``, ``:443``), one trailing ``/`` dropped; path and query are kept as written;
* ``caption``: the normalised caption -- NFC, lower-case, runs of whitespace collapsed, trimmed.

``key: [caption, image]`` removes only repeated (caption, image) pairs and keeps the same
image with different captions; use several instances (each with its own ``id``) for several
keys.  Exact groups are equivalence classes, so the kept row is simply the first by the keep
rule; the others get ``duplicate_of`` = its uid and ``duplicate_kind: exact``.

Distribution: the key is computed by DuckDB while the rows are hash-shuffled into
``ceil(rows / rows_per_partition)`` partitions (``ctx.map`` tasks); each partition runs one
window query.  No process ever holds more than one partition of keys.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.dedup import store
from curate.dedup.base import DedupParams, DedupStage, check_columns, metric_sql, order_sql
from curate.io import fs
from curate.io.sql import arrow
from curate.registry import register

log = logging.getLogger(__name__)

KeyField = Literal["image", "url", "caption"]
_SCHEME = "^[A-Za-z][A-Za-z0-9+.-]*://"


class DedupExactParams(DedupParams):
    stage: Literal["dedup_exact"] = "dedup_exact"
    key: list[KeyField] = Field(default_factory=lambda: ["image"], min_length=1,
                                description="fields that must all be equal: image (sha256 of the bytes), "
                                "url (normalised), caption (normalised)")


def url_key_sql(col: str = S.URL) -> str:
    u = f"trim({col})"
    host = f"lower(regexp_extract({u}, '{_SCHEME}([^/?#]*)', 1))"
    host = rf"regexp_replace(regexp_replace(regexp_replace({host}, '^.*@', ''), '^www\.', ''), ':(80|443)$', '')"
    rest = f"regexp_replace(regexp_extract({u}, '{_SCHEME}[^/?#]*([^#]*)', 1), '/$', '')"
    return f"CASE WHEN regexp_extract({u}, '{_SCHEME}([^/?#]*)', 1) = '' THEN NULL ELSE {host} || {rest} END"


def caption_key_sql(col: str = S.CAPTION) -> str:
    return rf"trim(regexp_replace(lower(nfc_normalize({col})), '\s+', ' ', 'g'))"


def key_sql(fields: list[str]) -> str:
    """The key expression; several fields are combined as sha256 of their NUL-joined values
    (NULL when any is NULL, since concat_ws would skip it)."""
    exprs = {"image": S.IMAGE_SHA256, "url": url_key_sql(), "caption": caption_key_sql()}
    fields = list(dict.fromkeys(fields))
    if fields == ["image"]:
        return S.IMAGE_SHA256
    parts = [exprs[f] for f in fields]
    nulls = " OR ".join(f"({e}) IS NULL" for e in parts)
    return f"CASE WHEN {nulls} THEN NULL ELSE sha256(concat_ws(chr(0), {', '.join(parts)})) END"


def detail_label(fields: list[str]) -> str:
    names = {"image": "image bytes", "url": "normalised url", "caption": "normalised caption"}
    return "same " + " and ".join(names[f] for f in dict.fromkeys(fields))


def _reduce(args: tuple[str, str, str, str, int, str, list[str]]) -> int:
    source, parts_dir, name, work, buckets, label, inputs = args
    con = store.duckdb_connect(work, inputs)
    t = arrow(con.sql(f"""
        SELECT {S.SHARD}, {S.UID}, first_value({S.UID}) OVER w AS {S.DUPLICATE_OF},
               row_number() OVER w AS _rn
        FROM {source}
        WINDOW w AS (PARTITION BY _k ORDER BY {order_sql()}
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
        QUALIFY _rn > 1"""))
    con.close()
    detail = [f"{label} as {u}" for u in t[S.DUPLICATE_OF].to_pylist()]
    return store.write_decisions(store.decisions_table(t[S.SHARD], t[S.UID], t[S.DUPLICATE_OF], detail),
                                 parts_dir, name, buckets)


KEY_COLUMNS = {"image": S.IMAGE_SHA256, "url": S.URL, "caption": S.CAPTION}  # key -> the column it compares


@register
class DedupExact(DedupStage):
    name = "dedup_exact"
    Params = DedupExactParams
    duplicate_kind = "exact"

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        p: DedupExactParams = self.params  # type: ignore[assignment]
        return super().fit_columns(schema) + [KEY_COLUMNS[k] for k in p.key if KEY_COLUMNS[k] in schema.names]

    def fit(self, ctx: Any) -> Any:
        p: DedupExactParams = self.params  # type: ignore[assignment]
        schema = check_columns(self, ctx, (S.UID, S.SHARD) + tuple(KEY_COLUMNS[k] for k in p.key), p.keep)
        select = (f"SELECT * FROM (SELECT {S.SHARD}, {S.UID}, {metric_sql(p.keep, schema.names)} AS _m, {key_sql(p.key)} AS _k "
                  f"FROM {{src}} WHERE {S.REJECT_REASON} IS NULL) WHERE _k IS NOT NULL")
        parts = store.n_partitions(ctx.total_rows, p.rows_per_partition)
        work = fs.as_path(ctx.work_dir)
        parts_dir = work / "parts"
        fs.remove(parts_dir)  # a killed fit's parts would add to this one's
        sources = store.shuffle(ctx, select, parts, work / "shuffle")
        buckets = store.n_buckets(len(ctx.paths))
        label = detail_label(p.key)
        jobs = [(src, str(parts_dir), f"r{i:05d}", str(work), buckets, label, ctx.paths[:1])
                for i, src in enumerate(sources) if src]
        removed = sum(ctx.map(_reduce, jobs))
        fs.remove(work / "shuffle")
        decisions = store.compact_decisions(ctx, parts_dir, buckets)
        log.info("%s: %d exact duplicates (key %s)", self.id, removed, "+".join(p.key))
        return {"key": list(p.key), "keep": p.keep, "partitions": parts, "removed": removed, "decisions": decisions}
