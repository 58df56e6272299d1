"""A small curate output written directly (tests of query/report/export): every column a full pipeline
writes, real photos, 32-hex uids, float16 embeddings, duplicates and a random-weights warning.
Columns can be dropped and rejected/ left empty to test outputs of shorter pipelines."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate import schema as S

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
CONFIG = {"input": {"path": "in.parquet"}, "output": {"path": "out"}, "runner": {"kind": "local"},
          "stages": [{"stage": "download", "min_image_size": 16, "max_aspect_ratio": 10,
                      "allow_networks": ["127.0.0.1/32"]},
                     {"stage": "clip_embed", "model": "tiny"}, {"stage": "clip_score", "min_score": 0.2},
                     {"stage": "dedup_phash"}]}
WARNING = "RANDOM WEIGHTS -- clip_score is meaningless"


def _jpeg(name: str, size: int) -> bytes:
    from PIL import Image
    from skimage import data

    arr = getattr(data, name)()
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _emb(rng, n: int, d: int = 8) -> pa.Array:
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pa.array(list(x.astype(np.float16)), type=pa.list_(pa.float16()))


def make_output(root: Path, n_kept: int = 12, rejected: bool = True, drop: tuple[str, ...] = (),
                all_rejected: bool = False) -> Path:
    """Write OUT/data/00000.parquet, OUT/rejected/00000.parquet (unless empty), config and stats.json."""
    rng = np.random.default_rng(0)
    n_dup, n_low = (3, 2) if rejected else (0, 0)
    n = n_kept + n_dup + n_low
    uids = [hashlib.md5(f"row{i}".encode()).hexdigest() for i in range(n)]
    imgs = [_jpeg(PHOTOS[i % len(PHOTOS)], 48 + 8 * (i % 5)) for i in range(n)]
    sizes = [(300 + 40 * (i % 7), 200 + 30 * (i % 5)) for i in range(n)]
    clip = [0.25 + 0.05 * (i % 6) for i in range(n_kept + n_dup)] + [0.05, 0.1][:n_low]
    cols = {
        S.UID: uids, S.URL: [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
        S.CAPTION: [f"a photo of the {PHOTOS[i % len(PHOTOS)]} number {i}" for i in range(n)],
        S.SOURCE_FILE: ["in.parquet"] * n, S.SOURCE_ROW: list(range(n)), S.IMAGE: imgs,
        S.WIDTH: [w // 4 for w, _ in sizes], S.HEIGHT: [h // 4 for _, h in sizes],
        S.ORIGINAL_WIDTH: [w for w, _ in sizes], S.ORIGINAL_HEIGHT: [h for _, h in sizes],
        S.IMAGE_EMBEDDING: _emb(rng, n), S.TEXT_EMBEDDING: _emb(rng, n), S.CLIP_SCORE: clip,
        S.CLIP_MODEL: ["tiny/random-init"] * n, S.CAPTION_PERPLEXITY: [float(50 + 37 * i) for i in range(n)],
        S.DUPLICATE_OF: [None] * n_kept + [uids[i] for i in range(n_dup)] + [None] * n_low,
        S.DUPLICATE_KIND: [None] * n_kept + ["phash"] * n_dup + [None] * n_low,
        S.REJECT_REASON: [None] * n_kept + ["duplicate"] * n_dup + ["clip_score_too_low"] * n_low,
        S.REJECT_STAGE: [None] * n_kept + ["dedup_phash"] * n_dup + ["clip_score"] * n_low,
        S.REJECT_DETAIL: [None] * n_kept + ["near duplicate"] * n_dup + ["clip_score < 0.2"] * n_low,
        S.ERROR_TYPE: [None] * n,
    }
    fields = [S.field(c) for c in cols if c not in drop]
    table = pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                      else cols[f.name] for f in fields}, schema=pa.schema(fields))
    kept_mask = pa.array([r is None for r in cols[S.REJECT_REASON]])
    if all_rejected:
        table = table.set_column(table.column_names.index(S.REJECT_REASON), S.REJECT_REASON,
                                 pa.array(["clip_score_too_low"] * n))
        table = table.set_column(table.column_names.index(S.REJECT_STAGE), S.REJECT_STAGE,
                                 pa.array(["clip_score"] * n))
        kept_mask = pa.array([False] * n)
    (root / "data").mkdir(parents=True)
    (root / "rejected").mkdir()
    if not all_rejected:
        pq.write_table(table.filter(kept_mask), root / "data" / "00000.parquet")
    if rejected or all_rejected:
        pq.write_table(table.filter(pa.compute.invert(kept_mask)), root / "rejected" / "00000.parquet")
    (root / "config.resolved.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    from curate.query import output_stats

    stats = output_stats(root)
    for st in stats["stages"]:
        if st["id"] == "clip_embed":
            st["info"] = {"model": "tiny/random-init", "warning": WARNING}
    (root / "stats.json").write_text(json.dumps(stats))
    return root
