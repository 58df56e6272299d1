"""``perplexity`` filter: keep fluent captions, by range and/or the lowest fraction of the corpus.

* ``min_perplexity`` / ``max_perplexity``: keep ``min <= caption_perplexity <= max``.
* ``keep_fraction`` f: of the N rows not rejected yet that have a perplexity, keep the
  k = floor(f * N) with the lowest, computed over the WHOLE corpus (all shards), as
  POINTS keeps the low-perplexity part of its data.  The threshold t is the k-th
  smallest value (1-based); rows with perplexity <= t are kept, so rows tied with t
  are all kept (identical captions get the same decision).  k = 0 keeps none.

A row is kept when it passes every condition that is set.  The threshold is found
exactly in bounded memory (:mod:`curate.radix_select`: two histogram passes over the
float32 bit patterns, per chunk of shards, in parallel under Ray).  Rejected rows get
``perplexity_too_low`` (below ``min_perplexity``) or ``perplexity_too_high`` (above ``max_perplexity``
or the ``keep_fraction`` threshold, and a missing perplexity); before 0.x both were ``perplexity``
(an alias kept in CONTRACT.md).  The threshold is in stats.json (``describe()``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import GlobalStage, Resources, StageParams, threshold

log = logging.getLogger(__name__)

TOO_HIGH, TOO_LOW = "perplexity_too_high", "perplexity_too_low"


class PerplexityFilterParams(StageParams):
    stage: Literal["perplexity"] = "perplexity"
    min_perplexity: float | None = Field(None, description="keep perplexity >= this")
    max_perplexity: float | None = Field(None, description="keep perplexity <= this")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="keep the lowest fraction of the corpus")

    @model_validator(mode="after")
    def _check(self) -> "PerplexityFilterParams":
        if self.min_perplexity is None and self.max_perplexity is None and self.keep_fraction is None:
            raise ValueError("set min_perplexity, max_perplexity and/or keep_fraction")
        if (self.min_perplexity is not None and self.max_perplexity is not None
                and self.min_perplexity > self.max_perplexity):
            raise ValueError("min_perplexity is larger than max_perplexity")
        return self


@register
class PerplexityFilter(GlobalStage):
    name = "perplexity"
    Params = PerplexityFilterParams
    needs = (S.CAPTION_PERPLEXITY,)
    default_resources = Resources(num_cpus=0.5, batch_size=65536)
    params: PerplexityFilterParams

    @property
    def needs_fit(self) -> bool:
        """Only ``keep_fraction`` needs the whole corpus; a min/max range is a plain map (no segment boundary)."""
        return self.params.keep_fraction is not None

    def fit(self, ctx) -> Any:
        from curate.radix_select import select_rank

        p = self.params
        if p.keep_fraction is None:
            return {}
        fraction = p.keep_fraction

        def rank_of(n: int) -> int | None:
            k = math.floor(fraction * n)
            return k - 1 if k >= 1 else None

        n, cut = select_rank(ctx.paths, S.CAPTION_PERPLEXITY, rank_of, ctx.map, ctx.parallelism)
        state = {"eligible": n, "k": math.floor(fraction * n), "threshold": cut}
        log.info("perplexity: keep the lowest %d of %d captions (keep_fraction %g): threshold %s",
                 state["k"], n, fraction, cut)
        return state

    def _why(self, v: float) -> str | None:
        """Why a perplexity fails the filter (None: it passes)."""
        p = self.params
        if np.isnan(v):
            return "no perplexity"
        if p.min_perplexity is not None and v < np.float32(p.min_perplexity):
            return f"perplexity {v:.7g} < min_perplexity {p.min_perplexity:g}"
        if p.max_perplexity is not None and v > np.float32(p.max_perplexity):
            return f"perplexity {v:.7g} > max_perplexity {p.max_perplexity:g}"
        if p.keep_fraction is not None:
            t = (self.state or {}).get("threshold")
            if t is None:
                return f"keep_fraction {p.keep_fraction:g} keeps no row of this corpus"
            if v > np.float32(t):
                return f"perplexity {v:.7g} > {t:.7g}, the threshold of the lowest {p.keep_fraction:g}"
        return None

    def process(self, table: pa.Table) -> pa.Table:
        p = self.params
        x = table[S.CAPTION_PERPLEXITY].to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
        ok = ~np.isnan(x)
        if p.min_perplexity is not None:
            ok &= x >= np.float32(p.min_perplexity)
        if p.max_perplexity is not None:
            ok &= x <= np.float32(p.max_perplexity)
        if p.keep_fraction is not None:
            t = (self.state or {}).get("threshold")
            ok &= np.zeros_like(ok) if t is None else x <= np.float32(t)
        if ok.all():
            return table
        detail = [None if good else self._why(v) for good, v in zip(ok.tolist(), x)]
        low = ~ok & (x < np.float32(p.min_perplexity)) if p.min_perplexity is not None else np.zeros_like(ok)
        reason = pa.array(np.where(low, TOO_LOW, TOO_HIGH))
        return self.reject(table, ~ok, reason, detail)

    def thresholds(self) -> list[dict[str, Any]]:
        p = self.params
        out = [threshold("caption_perplexity", v, side, name) for v, side, name in
               ((p.min_perplexity, "min", "min_perplexity"), (p.max_perplexity, "max", "max_perplexity")) if v is not None]
        t = (self.state or {}).get("threshold")
        return out + ([threshold("caption_perplexity", t, "max", "threshold")] if t is not None else [])

    def describe(self) -> dict[str, Any]:
        p = self.params
        d: dict[str, Any] = {"min_perplexity": p.min_perplexity, "max_perplexity": p.max_perplexity,
                             "keep_fraction": p.keep_fraction}
        d.update(self.state or {})
        return d
