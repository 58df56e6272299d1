"""``phash``: the 64-bit perceptual hash of every image (scoring stage, adds the ``phash`` column).

The hash is imagehash's ``phash`` (hash_size 8: greyscale, 32x32 LANCZOS resize, 2-D DCT,
the 8x8 lowest frequencies compared to their median), packed big-endian into a uint64 so
that ``int(str(imagehash.phash(img)), 16) == phash``.  It is computed on the stored image
(after the download stage's resize), which is what the dataset will contain.  Images that
cannot be decoded get a null hash (and are never pHash duplicates); nothing is rejected.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)


class PhashParams(StageParams):
    stage: Literal["phash"] = "phash"


def phash_bytes(data: bytes | None) -> int | None:
    """pHash of encoded image bytes as an int in [0, 2**64), or None if they do not decode."""
    if data is None:
        return None
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            bits = imagehash.phash(im).hash.ravel()
    except Exception as e:  # noqa: BLE001 - any decoder error means "no hash"
        log.debug("phash: cannot decode image: %s", e)
        return None
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@register
class Phash(MapStage):
    name = "phash"
    Params = PhashParams
    needs = (S.IMAGE,)
    produces = (S.PHASH,)
    default_resources = Resources(num_cpus=1, batch_size=256)

    def process(self, table: pa.Table) -> pa.Table:
        hashes = [phash_bytes(b) for b in table[S.IMAGE].to_pylist()]
        failed = sum(h is None for h, b in zip(hashes, table[S.IMAGE].to_pylist()) if b is not None)
        if failed:
            log.warning("phash: %d image(s) could not be decoded; their phash is null", failed)
        return with_column(table, S.PHASH, pa.array(hashes, pa.uint64()))

    def describe(self) -> dict[str, Any]:
        return {"hash": "imagehash.phash, 64 bits (hash_size=8), big-endian uint64"}
