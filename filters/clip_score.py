"""``clip_score`` filter: keep rows whose CLIP score is high enough (LAION / DataComp rules).

* ``min_score``: keep ``clip_score >= min_score`` (LAION-2B-en: 0.28 with ViT-B-32).  A plain
  map stage: it runs inside the surrounding segment, no extra pass over the data.
* ``top_fraction``: DataComp's rule, reproduced exactly: over the WHOLE corpus reaching the
  stage (all shards, rows not yet rejected), N scores, ``n = int(N * top_fraction)``, the
  threshold is the score at position n (0-based) of the scores sorted high to low, and every
  row with ``score >= threshold`` is kept (n + 1 rows plus ties; all when n >= N).  A global
  stage: the threshold is found exactly in bounded memory (:mod:`curate.radix_select`).

Rejected rows get ``clip_score_too_low`` (a row without a score too).  The threshold and
counts are in stats.json (``describe()``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import GlobalStage, Resources, StageParams, threshold

log = logging.getLogger(__name__)

REASON = "clip_score_too_low"


class ClipScoreParams(StageParams):
    stage: Literal["clip_score"] = "clip_score"
    min_score: float | None = Field(None, ge=-1, le=1, description="keep clip_score >= min_score")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep the best fraction of the whole corpus "
                                       "(DataComp: n = int(N * f), keep score >= the n-th highest, 0-based)")

    @model_validator(mode="after")
    def _one_rule(self) -> "ClipScoreParams":
        if (self.min_score is None) == (self.top_fraction is None):
            raise ValueError("set exactly one of min_score and top_fraction")
        return self


def _keep_at_least(stage: GlobalStage, table: pa.Table, threshold: float | None, rule: str) -> pa.Table:
    """Reject rows with no score or (when ``threshold`` is set) a score below it."""
    x = table[S.CLIP_SCORE].to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
    missing = np.isnan(x)
    bad = missing | (x < np.float32(threshold)) if threshold is not None else missing
    if not bad.any():
        return table
    detail = [None if not b else "no clip_score" if m else f"clip_score {v:.4f} < {threshold:.4f} ({rule})"
              for b, m, v in zip(bad, missing, x)]
    return stage.reject(table, bad.tolist(), REASON, detail)


@register
class ClipScoreFilter(GlobalStage):
    name = "clip_score"
    Params = ClipScoreParams
    needs = (S.CLIP_SCORE,)
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: ClipScoreParams

    @property
    def needs_fit(self) -> bool:
        """Only ``top_fraction`` needs the whole corpus; ``min_score`` is a plain map (no segment boundary)."""
        return self.params.top_fraction is not None

    def fit(self, ctx) -> Any:
        from curate.radix_select import select_rank

        f = self.params.top_fraction

        def rank_of(total: int) -> int | None:  # descending position n == ascending position N-1-n
            n = int(total * f)
            return total - 1 - n if n < total else None

        total, cut = select_rank(ctx.paths, S.CLIP_SCORE, rank_of, ctx.map, ctx.parallelism)
        state = {"eligible": total, "n": int(total * f), "threshold": cut}
        log.info("clip_score: top %g of %d scored rows: threshold %s", f, total, cut)
        return state

    def process(self, table: pa.Table) -> pa.Table:
        if not self.needs_fit:
            return _keep_at_least(self, table, self.params.min_score, "min_score")
        rule = f"top {self.params.top_fraction:g} threshold"
        return _keep_at_least(self, table, (self.state or {}).get("threshold"), rule)

    def thresholds(self) -> list[dict[str, Any]]:
        if not self.needs_fit:
            return [threshold("clip_score", self.params.min_score, "min", "min_score")]
        t = (self.state or {}).get("threshold")
        return [threshold("clip_score", t, "min", "threshold")] if t is not None else []

    def describe(self) -> dict[str, Any]:
        if not self.needs_fit:
            return {"min_score": self.params.min_score}
        return {"top_fraction": self.params.top_fraction, **(self.state or {})}
