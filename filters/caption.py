"""``caption`` filter: caption length bounds; the defaults are DataComp's basic rule.

DataComp keeps a caption with more than 2 words (``len(caption.split())``, whitespace
words) and more than 5 characters (``len(caption)``): ``min_words: 3``, ``min_chars: 6``.
Bounds are inclusive; ``max_words`` / ``max_chars`` are off by default.  A missing caption
counts as empty.  Reasons: ``caption_too_short``, ``caption_too_long``.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams, threshold


class CaptionFilterParams(StageParams):
    stage: Literal["caption"] = "caption"
    min_words: int = Field(3, ge=0, description="keep captions with at least this many words (DataComp: > 2)")
    min_chars: int = Field(6, ge=0, description="keep captions with at least this many characters (DataComp: > 5)")
    max_words: int | None = Field(None, ge=1, description="keep captions with at most this many words")
    max_chars: int | None = Field(None, ge=1, description="keep captions with at most this many characters")

    @model_validator(mode="after")
    def _bounds(self) -> "CaptionFilterParams":
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError("max_words is smaller than min_words")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars is smaller than min_chars")
        return self


@register
class CaptionFilter(MapStage):
    name = "caption"
    Params = CaptionFilterParams
    needs = (S.CAPTION,)
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: CaptionFilterParams

    def _verdict(self, caption: str | None) -> tuple[str, str] | None:
        p = self.params
        text = caption or ""
        words, chars = len(text.split()), len(text)
        if words < p.min_words or chars < p.min_chars:
            return "caption_too_short", f"{words} words, {chars} chars (min {p.min_words} words, {p.min_chars} chars)"
        if (p.max_words is not None and words > p.max_words) or (p.max_chars is not None and chars > p.max_chars):
            return "caption_too_long", f"{words} words, {chars} chars (max {p.max_words} words, {p.max_chars} chars)"
        return None

    def process(self, table: pa.Table) -> pa.Table:
        verdicts = [self._verdict(c) for c in table[S.CAPTION].to_pylist()]
        mask = [v is not None for v in verdicts]
        if not any(mask):
            return table
        return self.reject(table, mask, [v and v[0] for v in verdicts], [v and v[1] for v in verdicts])

    def thresholds(self) -> list[dict[str, Any]]:
        p = self.params
        out = [threshold("caption_words", p.min_words, "min", "min_words")] if p.min_words else []
        out += [threshold("caption_length", p.min_chars, "min", "min_chars")] if p.min_chars else []
        out += [threshold("caption_words", p.max_words, "max", "max_words")] if p.max_words is not None else []
        out += [threshold("caption_length", p.max_chars, "max", "max_chars")] if p.max_chars is not None else []
        return out

    def describe(self) -> dict[str, Any]:
        return self.params.model_dump(include={"min_words", "min_chars", "max_words", "max_chars"})
