"""``language`` filter: keep captions detected as one of ``languages`` with ``language_score >= min_score``.

Reads the columns ``language_id`` wrote (put that stage before this one).  A caption
without a detected language (empty or missing) is rejected.  Reason: ``language_not_allowed``.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams


class LanguageFilterParams(StageParams):
    stage: Literal["language"] = "language"
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                 description="ISO 639-1 codes to keep")
    min_score: float = Field(0.0, ge=0, le=1, description="keep when language_score >= min_score")


@register
class LanguageFilter(MapStage):
    name = "language"
    Params = LanguageFilterParams
    needs = (S.LANGUAGE, S.LANGUAGE_SCORE)
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: LanguageFilterParams

    def process(self, table: pa.Table) -> pa.Table:
        p = self.params
        allowed = set(p.languages)
        mask, detail = [], []
        for lang, score in zip(table[S.LANGUAGE].to_pylist(), table[S.LANGUAGE_SCORE].to_pylist()):
            if lang is None:
                mask.append(True)
                detail.append("no language detected (empty caption)")
            elif lang not in allowed or score is None or score < p.min_score:
                mask.append(True)
                shown = "?" if score is None else f"{score:.2f}"
                detail.append(f"{lang} ({shown}); keep {'/'.join(p.languages)} with score >= {p.min_score:g}")
            else:
                mask.append(False)
                detail.append(None)
        if not any(mask):
            return table
        return self.reject(table, mask, "language_not_allowed", detail)

    def describe(self) -> dict[str, Any]:
        return {"languages": self.params.languages, "min_score": self.params.min_score}
