"""A synthetic curate output of any size for bench/serve.py: the real output schema, written directly as Parquet.

    python bench/serve_data.py OUT [--rows 2000000] [--shard-rows 2000] [--no-embeddings]

Every column a full demo pipeline writes (configs/demo.yaml: download, dedup_exact, phash, dedup_phash,
clip_embed, caption, language, clip_score, dedup_semantic, caption_perplexity, perplexity, recaption),
written by curate's own writer (``write_parquet_atomic``: zstd, dictionary encoding, row groups of at most
1,000 rows) as one ``data/`` and one ``rejected/`` file per shard of ``--shard-rows`` input rows (2,000 by
default: 2M rows give 2,000 files of about 1,000 rows, like the output measured in issue #28).

* 41% kept, 59% rejected over 15 reasons; a row rejected before ``download`` has no image, one rejected
  before ``clip_embed`` no embedding, as in a real run (nulls where the stage never ran);
* images: 256-px JPEGs (about 5-8 KB) drawn cheaply (gradients and a few shapes), 400 distinct ones,
  each shard using 96 of them, so that each row group's image column stays dictionary-encoded the way
  the writer encodes repeated bytes (2M rows take about 3 GB instead of 10 GB);
* duplicates planted: 18% of the rows are rejected as ``duplicate`` (exact, phash or semantic, with the
  ``reject_detail`` each dedup stage writes) of a kept row of their shard (Zipf-distributed group sizes)
  or, one in ten, of one of 20 "memes" of shard 0 that collect copies from every shard;
* embeddings: 256-d float16 unit vectors (the demo's curate-ViT-T-32), so ``curate index`` and a text
  search with the run's (random-weights) model work.

Deterministic for a given ``--rows`` / ``--shard-rows`` / ``--seed``; ``OUT/.bench-built`` records them
and a second call with the same values returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import schema as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DIM = 256
N_IMAGES = 400
POOL = 96
MEMES = 20
CLIP_MODEL = "curate-ViT-T-32/random-init"
RECAPTION_MODEL = "random-init tiny BLIP (2+2 layers, d=64, 64px, CLIP BPE tokenizer) [random weights]"

# (reason, stage, share of all rows, how far the row got: 0 before download, 1 downloaded, 2 embedded)
FATES = [
    (None, None, 0.41, 3),
    ("malformed_url", "input", 0.005, 0),
    ("missing_caption", "input", 0.005, 0),
    ("duplicate_uid", "unique_uid", 0.01, 0),
    ("download_failed", "download", 0.12, 0),
    ("decode_failed", "download", 0.015, 0),
    ("image_too_small", "download", 0.02, 0),
    ("opted_out", "download", 0.01, 0),
    ("duplicate", "dedup_exact", 0.06, 1),
    ("duplicate", "dedup_phash", 0.07, 1),
    ("caption_too_short", "caption", 0.03, 2),
    ("language_not_allowed", "language", 0.035, 2),
    ("clip_score_too_low", "clip_score", 0.09, 2),
    ("duplicate", "dedup_semantic", 0.05, 2),
    ("perplexity_too_high", "perplexity", 0.07, 2),
]
ADJ = ["red", "small", "old", "happy", "wooden", "bright", "dark", "vintage", "modern", "tiny", "giant", "blue",
       "green", "shiny", "broken", "golden", "white", "black", "striped", "fluffy"]
NOUN = ["dog", "cat", "bicycle", "car", "house", "tree", "mountain", "boat", "bird", "chair", "lamp", "guitar",
        "flower", "bridge", "train", "horse", "cake", "shoe", "clock", "robot", "beach", "castle", "kite", "owl"]
WHERE = ["on a table", "in the park", "at night", "in the snow", "near the sea", "on the street", "in a forest",
         "at sunset", "in a kitchen", "on a white background", "under the rain", "in the city"]


def draw_jpegs(n: int, seed: int) -> list[bytes]:
    """``n`` distinct 256-px JPEGs: a colour gradient and a few shapes each (about 1 ms apiece)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    for i in range(n):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (xx * rng.random() + yy * rng.random())[..., None] / 2
        arr = (c0 * (1 - t) + c1 * t).astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = rng.integers(0, 200, 2)
            x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=fill)
        d.text((10, 10), f"#{i}", fill=(255, 255, 255))
        h = 256 if i % 3 else 192  # some landscape
        if h != 256:
            im = im.resize((256, h))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def uids_of(idx: np.ndarray, seed: int) -> list[str]:
    return [hashlib.md5(f"{seed}:{int(i)}".encode()).hexdigest() for i in idx]


def fates_of(shard: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, shard, 1])
    p = np.array([f[2] for f in FATES])
    return rng.choice(len(FATES), size=n, p=p / p.sum())


def _unit(rng: np.random.Generator, n: int) -> pa.Array:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = pa.array(x.astype(np.float16).reshape(-1), pa.float16())
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32)), flat)


def _masked(arr: pa.Array, valid: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(valid), arr, pa.nulls(len(arr), arr.type))


def shard_table(shard: int, n: int, seed: int, jpegs: list[bytes], memes: dict, embeddings: bool) -> pa.Table:
    """The rows of one shard (kept and rejected together, in input order)."""
    rng = np.random.default_rng([seed, shard, 2])
    idx = np.arange(shard * n, (shard + 1) * n)
    fate = fates_of(shard, n, seed)
    reason = [FATES[f][0] for f in fate]
    stage = [FATES[f][1] for f in fate]
    depth = np.array([FATES[f][3] for f in fate])
    uid = uids_of(idx, seed)
    kept_pos = np.flatnonzero(fate == 0)
    pool = rng.choice(N_IMAGES, POOL, replace=False)
    img_id = pool[rng.integers(0, POOL, n)]
    # duplicates: a kept row of this shard (Zipf: a few large groups) or one of shard 0's memes
    dup_pos = np.flatnonzero([r == "duplicate" for r in reason])
    dup_of: list[str | None] = [None] * n
    kind: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    kinds = {"dedup_exact": "exact", "dedup_phash": "phash", "dedup_semantic": "semantic"}
    for p in dup_pos:
        if (rng.random() < 0.1 or not len(kept_pos)) and memes["uid"]:
            m = int(rng.integers(0, len(memes["uid"])))
            target, img_id[p] = memes["uid"][m], memes["img"][m]
        else:
            k = int(kept_pos[min(len(kept_pos) - 1, int(rng.zipf(1.6)) - 1) % len(kept_pos)])
            target, img_id[p] = uid[k], img_id[k]
        dup_of[p], kind[p] = target, kinds[stage[p]]
        if kind[p] == "exact":
            detail[p] = f"same image bytes as {target}"
        elif kind[p] == "phash":
            detail[p] = f"phash distance {int(rng.integers(0, 7))} to {target}"
        else:
            detail[p] = f"cosine {0.95 + 0.05 * rng.random():.4f} with {target}"
    for p in np.flatnonzero(fate != 0):
        if detail[p] is None and reason[p] not in (None, "duplicate"):
            detail[p] = {"download_failed": "HTTP 404", "clip_score_too_low": "clip_score < 0.28",
                         "perplexity_too_high": "caption_perplexity > 2400"}.get(reason[p], reason[p].replace("_", " "))
    has_img = depth >= 1
    has_emb = (depth >= 2) & embeddings
    caption = pc.binary_join_element_wise(
        pa.array(np.array(["a photo of a", "an image of a", "close-up of a", "a"])[rng.integers(0, 4, n)]),
        pa.array(np.array(ADJ)[rng.integers(0, len(ADJ), n)]), pa.array(np.array(NOUN)[rng.integers(0, len(NOUN), n)]),
        pa.array(np.array(WHERE)[rng.integers(0, len(WHERE), n)]), " ")
    images = pa.array([jpegs[i] for i in img_id], pa.binary())
    sha = {i: hashlib.sha256(jpegs[i]).hexdigest() for i in set(img_id.tolist())}
    heights = np.array([192 if i % 3 == 0 else 256 for i in img_id], np.int32)
    clip = rng.normal(0.32, 0.04, n).astype(np.float32)
    clip[np.array([r == "clip_score_too_low" for r in reason])] -= 0.1
    ppl = rng.lognormal(6.5, 0.8, n).astype(np.float32)
    ppl[np.array([r == "perplexity_too_high" for r in reason])] += 2400
    status = np.where(has_img, "success", np.where(depth == 0, "failed_to_download", None))
    error = [("http_404" if r == "download_failed" else "decode_error" if r == "decode_failed" else
              "x_robots_tag" if r == "opted_out" else None) for r in reason]
    status = [None if st in ("input", "unique_uid") else s for s, st in zip(status.tolist(), stage)]
    recap = pc.binary_join_element_wise(pa.array(["a picture of a"] * n),
                                        pa.array(np.array(NOUN)[rng.integers(0, len(NOUN), n)]), " ")
    kept = fate == 0
    cols = {
        S.UID: pa.array(uid), S.URL: pa.array([f"https://img{i % 97}.example.com/{i}.jpg" for i in idx]),
        S.CAPTION: caption, S.SOURCE_FILE: pa.array([f"part-{shard // 100:05d}.parquet"] * n),
        S.SOURCE_ROW: pa.array(idx, pa.int64()), "source": pa.array(["bench"] * n),
        S.IMAGE: _masked(images, has_img),
        S.WIDTH: _masked(pa.array(np.full(n, 256, np.int32)), has_img),
        S.HEIGHT: _masked(pa.array(heights), has_img),
        S.ORIGINAL_WIDTH: _masked(pa.array(rng.integers(300, 2000, n).astype(np.int32)), has_img),
        S.ORIGINAL_HEIGHT: _masked(pa.array(rng.integers(300, 2000, n).astype(np.int32)), has_img),
        S.IMAGE_SHA256: _masked(pa.array([sha.get(i) for i in img_id]), has_img),
        S.DOWNLOAD_STATUS: pa.array(status, pa.string()), S.DOWNLOAD_ERROR: pa.array(
            ["HTTP Error 404" if e == "http_404" else None for e in error], pa.string()),
        S.DUPLICATE_OF: pa.array(dup_of, pa.string()), S.DUPLICATE_KIND: pa.array(kind, pa.string()),
        S.PHASH: _masked(pa.array(rng.integers(0, 2**63, n, dtype=np.uint64), pa.uint64()), has_img),
        S.IMAGE_EMBEDDING: _masked(_unit(rng, n), has_emb) if embeddings else pa.nulls(n, S.type_of(S.IMAGE_EMBEDDING)),
        S.TEXT_EMBEDDING: _masked(_unit(rng, n), has_emb) if embeddings else pa.nulls(n, S.type_of(S.TEXT_EMBEDDING)),
        S.CLIP_SCORE: _masked(pa.array(clip), depth >= 2),
        S.CLIP_MODEL: _masked(pa.array([CLIP_MODEL] * n), depth >= 2),
        S.LANGUAGE: _masked(pa.array(np.where(rng.random(n) < 0.97, "en", "de")), depth >= 2),
        S.LANGUAGE_SCORE: _masked(pa.array(rng.random(n).astype(np.float32)), depth >= 2),
        S.CAPTION_PERPLEXITY: _masked(pa.array(ppl), depth >= 2),
        S.RECAPTION: _masked(recap, kept), S.RECAPTION_MODEL: _masked(pa.array([RECAPTION_MODEL] * n), kept),
        S.TRAINING_CAPTION: _masked(pc.binary_join_element_wise(caption, recap, ". "), kept),
        S.REJECT_REASON: pa.array(reason, pa.string()), S.REJECT_STAGE: pa.array(stage, pa.string()),
        S.REJECT_DETAIL: pa.array(detail, pa.string()), S.ERROR_TYPE: pa.array(error, pa.string()),
    }
    fields = [S.field(c) if c in S.COLUMNS else pa.field(c, pa.string()) for c in cols]
    return pa.table([cols[f.name].cast(f.type) for f in fields], schema=pa.schema(fields))


def build(out: Path, rows: int, shard_rows: int = 2000, seed: int = 0, embeddings: bool = True,
          log=print, row_group_rows: int = 1000) -> dict:
    """Write the output (unless ``out`` already holds one built with the same parameters)."""
    import yaml

    from curate.io.files import write_json_atomic, write_parquet_atomic
    from curate.query import output_stats

    params = {"rows": rows, "shard_rows": shard_rows, "seed": seed, "embeddings": embeddings, "version": 1,
              "row_group_rows": row_group_rows}
    marker = out / ".bench-built"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return params
    if out.exists():
        import shutil

        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    (out / "rejected").mkdir()
    t0 = time.time()
    jpegs = draw_jpegs(N_IMAGES + MEMES, seed)
    shards = (rows + shard_rows - 1) // shard_rows
    f0 = fates_of(0, min(shard_rows, rows), seed)
    first_kept = np.flatnonzero(f0 == 0)[:MEMES]
    memes = {"uid": uids_of(first_kept, seed), "img": list(range(N_IMAGES, N_IMAGES + len(first_kept)))}
    for s in range(shards):
        n = min(shard_rows, rows - s * shard_rows)
        t = shard_table(s, n, seed, jpegs, memes, embeddings)
        if s == 0:  # the memes' own rows carry their image
            imgs = t[S.IMAGE].to_pylist()
            for m, p in enumerate(first_kept):
                imgs[p] = jpegs[memes["img"][m]]
            t = t.set_column(t.schema.get_field_index(S.IMAGE), S.IMAGE, pa.array(imgs, pa.binary()))
        kept = pc.is_null(t[S.REJECT_REASON])
        name = f"{s:05d}-00000.parquet"
        write_parquet_atomic(t.filter(kept), out / "data" / name, "zstd", row_group_rows=row_group_rows,
                             row_group_bytes=64 << 20)
        write_parquet_atomic(t.filter(pc.invert(kept)), out / "rejected" / name, "zstd",
                             row_group_rows=row_group_rows, row_group_bytes=64 << 20)
        if s % 100 == 99 and log:
            log(f"  {s + 1}/{shards} shards, {time.time() - t0:.0f} s")
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["input"]["path"], cfg["output"]["path"] = "bench-input.parquet", str(out)
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    stats = output_stats(out)
    stats["run"].update(runner="bench", shards=shards)
    write_json_atomic(stats, out / "stats.json")
    marker.write_text(json.dumps(params))
    if log:
        log(f"  built {rows} rows in {time.time() - t0:.0f} s")
    return params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--shard-rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-embeddings", action="store_true", help="null embeddings (a smaller output; no text search)")
    a = p.parse_args()
    build(a.out, a.rows, a.shard_rows, a.seed, not a.no_embeddings)


if __name__ == "__main__":
    main()
