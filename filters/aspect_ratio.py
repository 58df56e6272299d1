"""``aspect_ratio`` filter: ``max(w, h) / min(w, h) <= max_ratio`` (DataComp's basic rule: 3.0).

Measured on the downloaded image (``original_width/height``) by default, ``use: stored`` for
the resized one.  Reason: ``aspect_ratio_too_large`` (a row without a size too).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from curate.filters.image_size import SIZE_COLUMNS, image_dims


class AspectRatioParams(StageParams):
    stage: Literal["aspect_ratio"] = "aspect_ratio"
    max_ratio: float = Field(3.0, ge=1, description="keep images with longer side / shorter side <= max_ratio")
    use: Literal["original", "stored"] = Field("original", description="original: the downloaded image's size; "
                                               "stored: the size after the download stage's resize")


@register
class AspectRatioFilter(MapStage):
    name = "aspect_ratio"
    Params = AspectRatioParams
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: AspectRatioParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.needs = SIZE_COLUMNS[self.params.use]

    def process(self, table: pa.Table) -> pa.Table:
        w, h = image_dims(table, self.params.use)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(w, h) / np.minimum(w, h)
        bad = ~(ratio <= self.params.max_ratio)  # NaN (unknown size, 0 x 0) is rejected
        if not bad.any():
            return table
        detail = [None if not b else f"{w_:.0f}x{h_:.0f} ({self.params.use}): ratio {r:.2f} > {self.params.max_ratio:g}"
                  for b, w_, h_, r in zip(bad, w, h, ratio)]
        return self.reject(table, bad.tolist(), "aspect_ratio_too_large", detail)

    def describe(self) -> dict[str, Any]:
        return self.params.model_dump(include={"max_ratio", "use"})
