"""``image_size`` filter: the image's shorter side must be at least ``min_side`` pixels.

By default it measures the downloaded image (``original_width/height``), as DataComp's basic
rule does (``min(original_width, original_height) >= 200``); ``use: stored`` measures the
stored (resized) image instead.  Optional ``max_pixels`` bounds width x height.  Reasons:
``image_too_small``, ``image_too_large`` (a row without a size: ``image_too_small``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams, threshold


class ImageSizeParams(StageParams):
    stage: Literal["image_size"] = "image_size"
    min_side: int = Field(200, ge=1, description="keep images whose shorter side is >= min_side (DataComp: 200)")
    max_pixels: int | None = Field(None, ge=1, description="keep images with width x height <= max_pixels")
    use: Literal["original", "stored"] = Field("original", description="original: the downloaded image's size; "
                                               "stored: the size after the download stage's resize")


SIZE_COLUMNS = {"original": (S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT), "stored": (S.WIDTH, S.HEIGHT)}


def image_dims(table: pa.Table, use: str) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) as float arrays, NaN where unknown."""
    wc, hc = SIZE_COLUMNS[use]
    return (table[wc].to_numpy(zero_copy_only=False).astype(np.float64),
            table[hc].to_numpy(zero_copy_only=False).astype(np.float64))


@register
class ImageSizeFilter(MapStage):
    name = "image_size"
    Params = ImageSizeParams
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: ImageSizeParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.needs = SIZE_COLUMNS[self.params.use]

    def process(self, table: pa.Table) -> pa.Table:
        p = self.params
        w, h = image_dims(table, p.use)
        side = np.minimum(w, h)
        small = ~(side >= p.min_side)  # NaN (unknown size) counts as too small
        large = ~small & (w * h > p.max_pixels) if p.max_pixels is not None else np.zeros_like(small)
        bad = small | large
        if not bad.any():
            return table
        reasons = np.where(small, "image_too_small", "image_too_large").tolist()
        detail = [None if not b else f"{w_:.0f}x{h_:.0f} ({p.use}): shorter side < {p.min_side}" if s
                  else f"{w_:.0f}x{h_:.0f} ({p.use}): more than {p.max_pixels} pixels"
                  for b, s, w_, h_ in zip(bad, small, w, h)]
        return self.reject(table, bad.tolist(), reasons, detail)

    def thresholds(self) -> list[dict[str, Any]]:
        return [threshold("image_size", self.params.min_side, "min", "min_side")]

    def describe(self) -> dict[str, Any]:
        return self.params.model_dump(include={"min_side", "max_pixels", "use"})
