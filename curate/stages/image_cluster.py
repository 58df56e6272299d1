"""``image_cluster``: the nearest of given centroids for every image embedding (DataComp's image-based filter).

DataComp's image-based baseline clusters the pool's L/14 image embeddings and keeps the rows whose
cluster holds ImageNet training images; it ships the centroids and the target cluster ids as
``.npy`` files.  This stage writes ``image_cluster``: the argmax of the dot product of the stored
(L2-normalised) ``image_embedding`` with the ``centroids`` (a (k, d) ``.npy``), decided in float64.
The ``cluster`` filter keeps the rows whose cluster is in a target set (a ``.npy`` of ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams
from curate.table_ops import with_column


class ImageClusterParams(StageParams):
    stage: Literal["image_cluster"] = "image_cluster"
    centroids_path: str = Field(description=".npy (k, d) centroids (DataComp's image-based filter ships them)")


@register
class ImageCluster(MapStage):
    name = "image_cluster"
    Params = ImageClusterParams
    needs = (S.IMAGE_EMBEDDING,)
    produces = (S.IMAGE_CLUSTER,)
    default_resources = Resources(num_cpus=0.5, batch_size=16384, stateful=True)
    params: ImageClusterParams

    def setup(self) -> None:
        path = Path(self.params.centroids_path)
        if not path.is_file():
            raise StageError(f"image_cluster: centroids {path}: no such file")
        c = np.load(path)
        if c.ndim != 2:
            raise StageError(f"image_cluster: {path} holds a {c.shape} array, not (clusters, dim)")
        self.centroids = c.astype(np.float64)

    def process(self, table: pa.Table) -> pa.Table:
        from curate.dedup.vectors import matrix

        col = table[S.IMAGE_EMBEDDING]
        idx = pc.indices_nonzero(pc.is_valid(col))
        out = np.full(table.num_rows, -1, np.int64)
        if len(idx):
            x = matrix(col.take(idx)).astype(np.float64)
            if x.shape[1] != self.centroids.shape[1]:
                raise StageError(f"image_cluster: centroids have {self.centroids.shape[1]} dimensions, the image "
                                 f"embeddings {x.shape[1]} (centroids of another CLIP model?)")
            out[idx.to_numpy()] = (x @ self.centroids.T).argmax(axis=1)
        return with_column(table, S.IMAGE_CLUSTER, pa.array(out, pa.int32(), mask=out < 0))

    def describe(self) -> dict[str, Any]:
        return {"centroids": self.params.centroids_path, "clusters": int(self.centroids.shape[0])
                if getattr(self, "centroids", None) is not None else None}
