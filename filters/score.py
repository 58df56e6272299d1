"""``score`` filter: keep rows whose float score column lies in ``[min, max]``.

The threshold filter of ``embedding_head`` scores (``aesthetic_score >= 5``, ``punsafe <= 0.5``,
``pwatermark <= 0.8`` as in LAION-5B) and of any other float32 score column.  Bounds are
inclusive; a row without a score is rejected (``missing_score`` stays out of the way of a
deliberate cut).  Reasons: ``COLUMN_too_low`` / ``COLUMN_too_high`` / ``COLUMN_missing``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.registry import register
from curate.stage import MapStage, Resources, StageParams, threshold


class ScoreFilterParams(StageParams):
    stage: Literal["score"] = "score"
    column: str = Field(description="the float score column (e.g. aesthetic_score, punsafe, pwatermark)")
    min: float | None = Field(None, description="keep rows with column >= min")
    max: float | None = Field(None, description="keep rows with column <= max")

    @model_validator(mode="after")
    def _check(self) -> "ScoreFilterParams":
        if self.min is None and self.max is None:
            raise ValueError("set min and/or max")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError("max is smaller than min")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", self.column):
            raise ValueError(f"column {self.column!r}: lower-case letters, digits and _ only")
        return self


@register
class ScoreFilter(MapStage):
    name = "score"
    Params = ScoreFilterParams
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: ScoreFilterParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.needs = (self.params.column,)

    def process(self, table: pa.Table) -> pa.Table:
        p = self.params
        x = table[p.column].to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
        missing = np.isnan(x)
        low = ~missing & (x < np.float32(p.min)) if p.min is not None else np.zeros_like(missing)
        high = ~missing & (x > np.float32(p.max)) if p.max is not None else np.zeros_like(missing)
        bad = missing | low | high
        if not bad.any():
            return table
        reason = np.where(missing, f"{p.column}_missing", np.where(low, f"{p.column}_too_low", f"{p.column}_too_high"))
        detail = [None if not b else (f"no {p.column}" if m else f"{p.column} {v:.6g} < min {p.min:g}" if lo
                                      else f"{p.column} {v:.6g} > max {p.max:g}")
                  for b, m, lo, v in zip(bad.tolist(), missing.tolist(), low.tolist(), x.tolist())]
        return self.reject(table, bad, pa.array(reason.tolist()), detail)

    def thresholds(self) -> list[dict[str, Any]]:
        p = self.params
        return [threshold(p.column, v, side, side) for v, side in ((p.min, "min"), (p.max, "max")) if v is not None]

    def describe(self) -> dict[str, Any]:
        return self.params.model_dump(include={"column", "min", "max"})
