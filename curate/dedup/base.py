"""What the dedup stages share: the keep rule, common params, and ``process`` from decision files.

Keep rule (``keep``), the order in which rows are preferred inside a duplicate group:

* ``clip_score``: highest ``clip_score`` first (rows without one come last);
* ``largest_image``: most pixels in the downloaded original first
  (``original_width * original_height``, else ``width * height``; rows without sizes last);
* ``smallest_uid``: only the uid.

Ties are always broken by the smallest uid (byte order), which makes the rule a total order
that does not depend on shards or workers.  The same order is written once in SQL (for DuckDB
window functions) and once with pyarrow (for numpy code); ``tests/test_dedup.py`` checks
they agree.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import schema as S
from curate.io.views import view_schema
from curate.stage import GlobalStage, Resources, StageError, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)

KeepRule = Literal["clip_score", "largest_image", "smallest_uid"]
#: name of the keep-rule value column in intermediate files
METRIC = "_m"


class DedupParams(StageParams):
    keep: KeepRule = Field("largest_image", description="which row of a duplicate group is kept: highest "
                           "clip_score, largest_image (most original pixels) or smallest_uid; ties -> smallest uid")
    rows_per_partition: int = Field(2_000_000, ge=1, description="rows per hash partition / task in fit "
                                    "(bounds the memory of one task; more rows -> more partitions)")


_SIZES = ((S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT), (S.WIDTH, S.HEIGHT))


def _size_pairs(names: list[str]) -> list[tuple[str, str]]:
    return [(w, h) for w, h in _SIZES if w in names and h in names]


def keep_columns(keep: str, names: list[str]) -> tuple[str, ...]:
    """Columns the keep rule reads, among ``names`` (the input's columns)."""
    if keep == "clip_score":
        return (S.CLIP_SCORE,)
    if keep == "largest_image":
        return tuple(c for pair in _size_pairs(names) for c in pair)
    return ()


def metric_sql(keep: str, names: list[str]) -> str:
    """SQL expression of the keep-rule value (higher is better, NULL last); pairs with ``uid ASC``."""
    if keep == "clip_score":
        return f"CAST({S.CLIP_SCORE} AS DOUBLE)"
    if keep == "largest_image":
        areas = [f"CAST({w} AS BIGINT) * {h}" for w, h in _size_pairs(names)]
        return f"CAST(coalesce({', '.join(areas)}) AS DOUBLE)"
    return "CAST(0 AS DOUBLE)"


def order_sql(metric: str = METRIC) -> str:
    return f"{metric} DESC NULLS LAST, {S.UID} ASC"


def metric_array(table: pa.Table, keep: str) -> pa.Array:
    """The keep-rule value of every row (float64, null = worst), same as :func:`metric_sql`."""
    if keep == "clip_score":
        return pc.cast(table[S.CLIP_SCORE], pa.float64()).combine_chunks()
    if keep == "largest_image":
        areas = [pc.multiply(pc.cast(table[w], pa.int64()), pc.cast(table[h], pa.int64()))
                 for w, h in _size_pairs(table.column_names)]
        both = pc.coalesce(*areas) if len(areas) > 1 else areas[0]
        return pc.cast(both, pa.float64()).combine_chunks()
    return pa.array(np.zeros(table.num_rows), pa.float64())


def rank(metric: pa.Array | np.ndarray, uids: pa.Array | list) -> np.ndarray:
    """Position of every row in keep-rule order (0 = best)."""
    t = pa.table({"m": metric, "u": uids})
    order = pc.sort_indices(t, sort_keys=[("m", "descending", "at_end"), ("u", "ascending", "at_end")])
    out = np.empty(t.num_rows, np.int64)
    out[order.to_numpy()] = np.arange(t.num_rows)
    return out


def check_columns(stage: GlobalStage, ctx: Any, needed: tuple[str, ...], keep: str | None = None) -> pa.Schema:
    """Fail early (naming the stage and column) when fit's input lacks a column it needs."""
    if not ctx.paths:
        return pa.schema([])
    schema = view_schema(ctx.paths[0])
    needed = needed + (keep_columns(keep, schema.names) if keep else ())
    missing = [c for c in needed if c not in schema.names]
    if keep == "largest_image" and not _size_pairs(schema.names):
        missing.append(f"{S.WIDTH}/{S.HEIGHT} or {S.ORIGINAL_WIDTH}/{S.ORIGINAL_HEIGHT}")
    if missing:
        hint = ""
        if S.CLIP_SCORE in missing or S.IMAGE_EMBEDDING in missing:
            hint = " (run clip_embed before this stage, or choose another keep rule)"
        elif S.PHASH in missing:
            hint = " (run the phash stage before this stage)"
        raise StageError(f"stage {stage.id!r} needs column(s) {missing} that no earlier stage produced{hint}")
    return schema


class DecisionStage(GlobalStage):
    """A global stage whose ``fit`` writes decision files (``store.compact_decisions``, its state's
    ``decisions``, with ``removed`` rows) and whose ``process`` looks the batch's rows up in them."""

    default_resources = Resources(num_cpus=0.5, batch_size=65536)

    def setup(self) -> None:
        from curate.dedup.store import DecisionReader

        self._reader = DecisionReader((self.state or {}).get("decisions"))

    def removed(self, table: pa.Table) -> tuple[list, list, list] | None:
        """(removed?, duplicate_of, detail) per row of ``table``, or None when none of its rows is removed."""
        if not (self.state or {}).get("removed"):
            return None
        return self._reader.lookup(table[S.SHARD], table[S.UID])

    def describe(self) -> dict[str, Any]:
        st = self.state or {}
        return {k: v for k, v in st.items() if k != "decisions"}


class DedupStage(DecisionStage):
    """Base of the dedup stages: ``fit`` writes decision files, ``process`` applies them."""

    needs = (S.UID, S.SHARD)
    produces = (S.DUPLICATE_OF, S.DUPLICATE_KIND)
    duplicate_kind: ClassVar[str] = ""

    def process(self, table: pa.Table) -> pa.Table:
        found = self.removed(table)
        if found is None:
            return table
        mask, dup_of, detail = found
        mask_arr = pa.array(mask, pa.bool_())
        for col, new in ((S.DUPLICATE_OF, pa.array(dup_of, pa.string())),
                         (S.DUPLICATE_KIND, pa.array([self.duplicate_kind] * table.num_rows, pa.string()))):
            old = table[col] if col in table.column_names else pa.nulls(table.num_rows, pa.string())
            table = with_column(table, col, pc.if_else(mask_arr, new, old))
        return self.reject(table, mask_arr, "duplicate", pa.array(detail, pa.string()))
