"""``cluster`` filter: keep rows whose ``image_cluster`` is in a target set (DataComp's image-based filter).

``target_path``: a ``.npy`` of cluster ids (DataComp ships the ids of the clusters that ImageNet
training images fall into); or ``targets`` inline.  Rows of other clusters are rejected with
``cluster_not_in_target``, rows without a cluster (no embedding) with ``cluster_missing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams


class ClusterFilterParams(StageParams):
    stage: Literal["cluster"] = "cluster"
    target_path: str | None = Field(None, description=".npy of the cluster ids to keep")
    targets: list[int] | None = Field(None, description="the cluster ids to keep (instead of target_path)")

    @model_validator(mode="after")
    def _one(self) -> "ClusterFilterParams":
        if (self.target_path is None) == (self.targets is None):
            raise ValueError("give target_path or targets")
        return self


@register
class ClusterFilter(MapStage):
    name = "cluster"
    Params = ClusterFilterParams
    needs = (S.IMAGE_CLUSTER,)
    default_resources = Resources(num_cpus=0.25, batch_size=65536)
    params: ClusterFilterParams

    def setup(self) -> None:
        p = self.params
        if p.targets is not None:
            ids = np.asarray(p.targets, np.int64)
        else:
            if not Path(p.target_path).is_file():
                raise StageError(f"cluster: targets {p.target_path}: no such file")
            ids = np.load(p.target_path).astype(np.int64).ravel()
        self.targets = pa.array(np.unique(ids), pa.int32())

    def process(self, table: pa.Table) -> pa.Table:
        c = table[S.IMAGE_CLUSTER]
        missing = pc.is_null(c)
        out = pc.fill_null(pc.invert(pc.is_in(c, value_set=self.targets)), False)
        bad = pc.or_(missing, out)
        if not pc.any(bad).as_py():
            return table
        reason = pc.if_else(missing, "cluster_missing", "cluster_not_in_target")
        detail = pc.if_else(missing, "no image embedding", pc.binary_join_element_wise(
            "cluster ", pc.cast(pc.fill_null(c, -1), pa.string()), " not in the target set", ""))
        return self.reject(table, bad, reason, detail)

    def describe(self) -> dict[str, Any]:
        return {"targets": self.params.target_path or f"{len(self.params.targets or [])} ids"}
