"""``perplexity`` filter: keep fluent captions, by range and/or the lowest fraction of the corpus.

* ``min_perplexity`` / ``max_perplexity``: keep ``min <= caption_perplexity <= max``.
* ``keep_fraction`` f: among the rows not rejected yet that pass the range, keep the
  k = floor(f * N) with the lowest perplexity, computed over the WHOLE corpus (all
  shards), as POINTS keeps the low-perplexity part of its data.  The threshold t is
  the k-th smallest value (1-based); rows with perplexity <= t are kept, so rows tied
  with t are all kept (identical captions get the same decision).  k = 0 keeps none.

The threshold is found exactly in bounded memory by a radix select on the float32
bit patterns: one pass histograms the high 16 bits (per shard, in parallel under
Ray; sparse counts), a second pass the low 16 bits inside the bucket holding the
k-th value.  Nothing is ever sorted and no process holds more than 2 x 65,536
counters, whatever the corpus size.  Rejected rows get ``perplexity`` (a missing
perplexity too); the threshold is in stats.json (``describe()``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import GlobalStage, Resources, StageParams

log = logging.getLogger(__name__)

REASON = "perplexity"
_COLS = [S.CAPTION_PERPLEXITY, S.REJECT_REASON]


class PerplexityFilterParams(StageParams):
    stage: str = "perplexity"
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


def ordered_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (negatives, -0/+0, inf included)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _from_ordered_bits(u: int) -> float:
    bits = (u & 0x7FFFFFFF) if u & 0x80000000 else (~u & 0xFFFFFFFF)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def eligible(table: pa.Table, lo: float | None, hi: float | None) -> np.ndarray:
    """Perplexities (float32) of the rows not rejected yet that are inside [lo, hi] (NaN/null dropped)."""
    v = table[S.CAPTION_PERPLEXITY]
    mask = pc.and_(pc.is_null(table[S.REJECT_REASON]), pc.is_valid(v))
    x = v.filter(mask).to_numpy().astype(np.float32, copy=False)
    keep = ~np.isnan(x)
    if lo is not None:
        keep &= x >= np.float32(lo)
    if hi is not None:
        keep &= x <= np.float32(hi)
    return x[keep]


def _histogram(args: tuple[list[str], float | None, float | None, int | None]) -> dict[int, int]:
    """Sparse counts of the high 16 bits, or (with ``prefix``) of the low 16 bits under that prefix."""
    import pyarrow.parquet as pq

    paths, lo, hi, prefix = args
    counts: dict[int, int] = {}
    for path in paths:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=262_144, columns=_COLS):
            u = ordered_bits(eligible(pa.Table.from_batches([batch]), lo, hi))
            if prefix is None:
                keys = u >> np.uint32(16)
            else:
                keys = (u[(u >> np.uint32(16)) == np.uint32(prefix)] & np.uint32(0xFFFF))
            k, c = np.unique(keys, return_counts=True)
            for key, cnt in zip(k.tolist(), c.tolist()):
                counts[key] = counts.get(key, 0) + cnt
    return counts


def _merge(parts: list[dict[int, int]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for part in parts:
        for key, cnt in part.items():
            total[key] = total.get(key, 0) + cnt
    return total


def _select(counts: dict[int, int], rank: int) -> tuple[int, int]:
    """(key holding the rank-th smallest value (0-based), rank within that key)."""
    for key in sorted(counts):
        if rank < counts[key]:
            return key, rank
        rank -= counts[key]
    raise ValueError("rank beyond the histogram")


def lowest_fraction_threshold(paths: list[str], fraction: float, lo: float | None, hi: float | None,
                              run=None) -> dict[str, Any]:
    """{"eligible": N, "k": floor(fraction * N), "threshold": k-th smallest eligible value (None when k = 0)}.

    Exact, over parquet files, in bounded memory (two histogram passes, per chunk of files via ``run``).
    """
    run = run or (lambda fn, items: [fn(x) for x in items])
    n_chunks = max(1, min(len(paths), 64))
    chunks = [c for c in (paths[i::n_chunks] for i in range(n_chunks)) if c]
    high = _merge(run(_histogram, [(c, lo, hi, None) for c in chunks]))
    n = sum(high.values())
    k = math.floor(fraction * n)
    if k < 1:
        return {"eligible": n, "k": 0, "threshold": None}
    key, rank = _select(high, k - 1)
    low = _merge(run(_histogram, [(c, lo, hi, key) for c in chunks]))
    sub, _ = _select(low, rank)
    return {"eligible": n, "k": k, "threshold": _from_ordered_bits((key << 16) | sub)}


@register
class PerplexityFilter(GlobalStage):
    name = "perplexity"
    Params = PerplexityFilterParams
    needs = (S.CAPTION_PERPLEXITY,)
    default_resources = Resources(num_cpus=0.5, batch_size=65536)
    params: PerplexityFilterParams

    def fit(self, ctx) -> Any:
        p = self.params
        if p.keep_fraction is None:
            return {}
        state = lowest_fraction_threshold(ctx.paths, p.keep_fraction, p.min_perplexity, p.max_perplexity, ctx.map)
        log.info("perplexity: keep the lowest %d of %d captions (keep_fraction %g): threshold %s",
                 state["k"], state["eligible"], p.keep_fraction, state["threshold"])
        return state

    def process(self, table: pa.Table) -> pa.Table:
        p = self.params
        x = table[S.CAPTION_PERPLEXITY].to_numpy(zero_copy_only=False).astype(np.float32)  # null -> NaN
        missing = np.isnan(x)
        bad = missing.copy()
        if p.min_perplexity is not None:
            bad |= x < np.float32(p.min_perplexity)
        if p.max_perplexity is not None:
            bad |= x > np.float32(p.max_perplexity)
        state = self.state or {}
        lim = f"[{p.min_perplexity}, {p.max_perplexity}]"
        if p.keep_fraction is not None:
            t = state.get("threshold")
            bad |= np.ones_like(bad) if t is None else x > np.float32(t)
            lim += f" and <= {t:.7g} (lowest {p.keep_fraction:g})" if t is not None else " (keep_fraction keeps 0)"
        if not bad.any():
            return table
        detail = ["no perplexity" if m else f"perplexity {v:.7g} not in {lim}" for m, v in zip(missing, x)]
        return self.reject(table, bad.tolist(), REASON, detail)

    def describe(self) -> dict[str, Any]:
        p = self.params
        d: dict[str, Any] = {"min_perplexity": p.min_perplexity, "max_perplexity": p.max_perplexity,
                             "keep_fraction": p.keep_fraction}
        d.update(self.state or {})
        return d
