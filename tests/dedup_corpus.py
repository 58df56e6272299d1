"""Test data for the dedup stages: a quality corpus of real photos, planted hashes/embeddings, shards.

Quality corpus: built from real photographs (scikit-image's bundled photos).

Bases: three distinct crops of every photo (60-85 % of it; two opposite corners and the
centre, so they overlap a lot) scaled to a 256 px long side: the corpus holds many
*look-alikes* (overlapping crops of one photo; and photos
of one subject: the two motorcycles, retina/microaneurysms, brick/grass/gravel, page/text).
Every base gets planted near-duplicates: JPEG re-encodes at quality 30/50/70/90, resizes
0.5x/0.75x/1.5x/2x (then capped to 256 px like the download stage), 2 % and 5 % crops and a
light colour jitter (brightness/contrast/saturation +-10 %).

``pixel_embedding`` is the embedding the quality test uses for semantic dedup: a 16x16
greyscale thumbnail, mean-centred and L2-normalised (256-d).  It is NOT a CLIP embedding:
without pretrained weights no semantic embedding exists offline, so the test measures the
dedup machinery (search, k-means, thresholds, keep rule) on a real, deterministic image
feature that is robust to re-encoding and resizing.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from curate import registry
from curate import schema as S
from curate.context import FitContext

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coffee", "coins", "color", "grass",
          "gravel", "hubble_deep_field", "ihc", "logo", "microaneurysms", "moon", "motorcycle_left",
          "motorcycle_right", "page", "phantom", "retina", "rocket", "text")
REENCODE = ("jpeg30", "jpeg50", "jpeg70", "jpeg90")
RESIZE = ("resize0.50", "resize0.75", "resize1.50", "resize2.00")
OTHER = ("crop0.02", "crop0.05", "jitter")
TRANSFORMS = REENCODE + RESIZE + OTHER


def _photo(stem: str) -> Image.Image:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    path = next(p for p in (data / f"{stem}.png", data / f"{stem}.jpg") if p.exists())
    with Image.open(path) as im:
        return im.convert("RGB")


def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _cap(im: Image.Image, side: int = 256) -> Image.Image:
    if max(im.size) > side:
        im = im.copy()
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _variant(base: Image.Image, tr: str) -> bytes:
    if tr.startswith("jpeg"):
        return _jpeg(base, int(tr[4:]))
    if tr.startswith("resize"):
        f = float(tr[6:])
        return _jpeg(_cap(base.resize((round(base.width * f), round(base.height * f)), Image.Resampling.BICUBIC)), 90)
    if tr.startswith("crop"):
        f = float(tr[4:])
        w, h = base.size
        return _jpeg(base.crop((round(w * f / 2), round(h * f / 2), round(w - w * f / 2), round(h - h * f / 2))), 90)
    im = ImageEnhance.Brightness(base).enhance(1.1)
    im = ImageEnhance.Contrast(im).enhance(0.9)
    return _jpeg(ImageEnhance.Color(im).enhance(1.1), 90)


def pixel_embedding(data: bytes, side: int = 16) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX), np.float64).ravel()
    a = a - a.mean()
    return (a / (np.linalg.norm(a) or 1.0)).astype(np.float16)


def build(seed: int = 0, crops_per_photo: int = 3) -> pa.Table:
    """Rows: uid, url, caption, image, image_sha256, width, height, group, transform, image_embedding."""
    rng = random.Random(seed)
    rows = []
    for stem in PHOTOS:
        photo = _photo(stem)
        W, H = photo.size
        for c in range(crops_per_photo):
            f = rng.uniform(0.6, 0.85)
            w, h = int(W * f), int(H * f)
            x = (W - w) * (0.1, 0.9, 0.5)[c % 3]  # opposite corners, then the centre: overlapping framings
            y = (H - h) * (0.1, 0.9, 0.5)[c % 3]
            base = _cap(photo.crop((round(x), round(y), round(x) + w, round(y) + h)))
            group = f"{stem}#{c}"
            items = [("base", _jpeg(base, 95))] + [(tr, _variant(base, tr)) for tr in TRANSFORMS]
            for tr, data in items:
                with Image.open(io.BytesIO(data)) as im:
                    size = im.size
                rows.append({"group": group, "transform": tr, "image": data, "width": size[0], "height": size[1]})
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["uid"] = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[:16]
        r["url"] = f"http://127.0.0.1/q/{i}.jpg"
        r["caption"] = f"photo {r['group']}"
        r["image_sha256"] = hashlib.sha256(r["image"]).hexdigest()
    emb = [pixel_embedding(r["image"]) for r in rows]
    t = pa.Table.from_pylist(rows)
    return t.append_column("image_embedding", pa.array(emb, pa.list_(pa.float16())))


# -- planted synthetic data and shard helpers -----------------------------------------------
def write_shards(table: pa.Table, out: Path, shard_size: int) -> list[str]:
    """The table as work shards (``_shard``/``source_row`` like ingest writes them)."""
    from curate.table_ops import prepare_for_stages

    table = prepare_for_stages(table)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, table.num_rows, shard_size)):
        part = table.slice(lo, shard_size)
        shard = f"00000-{k:05d}"
        part = part.append_column(S.SHARD, pa.array([shard] * part.num_rows, pa.string()))
        part = part.append_column(S.SOURCE_ROW, pa.array(np.arange(lo, lo + part.num_rows), pa.int64()))
        pq.write_table(part, out / f"{shard}.parquet")
        paths.append(str(out / f"{shard}.parquet"))
    return paths


def fit_apply(params: dict, paths: list[str], work: Path, runner: str = "local",
              count_rows: bool = True) -> dict[str, tuple]:
    """Fit a global stage over shard files and apply it shard by shard: uid -> (duplicate_of, detail).

    ``count_rows=False``: the fit is not told how many rows enter it (as from a notebook table)."""
    stage = registry.create(params)
    ctx = FitContext(paths, work, runner, 2, sum(pq.read_metadata(p).num_rows for p in paths) if count_rows else None)
    work.mkdir(parents=True, exist_ok=True)
    stage.set_state(stage.fit(ctx))
    out = {}
    for p in paths:
        t = stage.run_batch(pq.read_table(p))
        for r in t.filter(pa.compute.equal(t[S.REJECT_STAGE], stage.id)).to_pylist():
            assert r[S.REJECT_REASON] == "duplicate" and r[S.DUPLICATE_KIND] == stage.duplicate_kind
            out[r[S.UID]] = (r[S.DUPLICATE_OF], r[S.REJECT_DETAIL])
    return out


def table_of(**cols) -> pa.Table:
    n = len(next(iter(cols.values())))
    cols.setdefault(S.REJECT_REASON, pa.nulls(n, pa.string()))
    return pa.table(cols)


def planted_hashes(rng, n_base: int, radius: int) -> tuple[list[int], list[str]]:
    hashes = []
    for _ in range(n_base):
        h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        hashes.append(h)
        for _ in range(int(rng.integers(0, 4))):
            flip = rng.choice(64, int(rng.integers(0, radius + 4)), replace=False)
            hashes.append(h ^ sum(1 << int(f) for f in flip))
    perm = rng.permutation(len(hashes))
    return [hashes[i] for i in perm], [f"r{rng.integers(0, 10**9):09d}-{i}" for i in range(len(hashes))]


def planted_embeddings(rng, n_base: int, d: int = 32):
    base = rng.standard_normal((n_base, d))
    rows = [base]
    for scale in (0.05, 0.15, 0.3):  # cosines ~0.999, ~0.99, ~0.95: around the threshold
        pick = rng.choice(n_base, n_base // 3, replace=False)
        rows.append(base[pick] + scale * rng.standard_normal((len(pick), d)))
    rows.append(base[:5])  # identical copies: ties in similarity and in distance to a centroid
    x = np.concatenate(rows)
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def emb_table(rng, n_base: int = 150):
    e = planted_embeddings(rng, n_base)
    n = len(e)
    score = [None if i % 23 == 0 else float(v) for i, v in enumerate(np.round(rng.random(n), 2))]
    return e, table_of(uid=[f"e{rng.integers(0, 10**9):09d}-{i}" for i in range(n)],
                       clip_score=pa.array(score, pa.float32()),
                       image_embedding=pa.array(list(e), pa.list_(pa.float16())))


def phash_rows(rng: np.random.Generator, hashes: list[int], uids: list[str], reject_every: int):
    """A pHash dedup input: widths 10-13 (the keep rule), height 10, every ``reject_every``-th row already
    rejected upstream; returns (table, widths, reject reasons)."""
    n = len(hashes)
    width = rng.integers(10, 14, n).astype(np.int32)
    reject = [("download_failed" if i % reject_every == 0 else None) for i in range(n)]
    t = table_of(uid=uids, phash=pa.array(hashes, pa.uint64()), width=width, height=np.full(n, 10, np.int32),
                 reject_reason=pa.array(reject, pa.string()))
    return t, width, reject

