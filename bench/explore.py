"""Exploring a large output: DuckDB views, the report, and the exports, against named baselines.

    python bench/explore.py [--rows 200000] [--files 20] [--work bench/_work/explore]

Builds a synthetic output (every contract column, 32-hex uids, float16 embeddings, tiny
JPEGs) and measures, each against a baseline run in the same process:

* per-reason counts + a clip_score histogram through the DuckDB views, vs reading the
  columns with pyarrow.dataset and aggregating with pyarrow.compute;
* the report at N rows vs N/10 rows (its sampling keeps the work bounded);
* the DataComp uid file (DuckDB sort + memory-mapped fill) vs the recipe of DataComp's
  README (a Python list comprehension of int(uid[:16], 16) pairs + np.sort);
* the WebDataset export (samples/s) vs reading the kept rows with pyarrow alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import schema as S  # noqa: E402

REASONS = ["download_failed", "duplicate", "clip_score_too_low", "perplexity", "caption_too_short"]


def _jpegs() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        im.thumbnail((32, 32))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def build(root: Path, rows: int, files: int) -> None:
    rng = np.random.default_rng(0)
    jpegs = _jpegs()
    (root / "data").mkdir(parents=True)
    (root / "rejected").mkdir()
    per = rows // files
    for f in range(files):
        n = per
        idx = np.arange(f * per, f * per + n)
        uids = [hashlib.md5(int(i).to_bytes(8, "little")).hexdigest() for i in idx]
        reason = np.where(rng.random(n) < 0.3, rng.choice(REASONS, n), None)
        emb = rng.normal(size=(n, 16)).astype(np.float16)
        t = pa.table({
            S.UID: uids, S.URL: [f"http://127.0.0.1/{i}.jpg" for i in idx],
            S.CAPTION: [f"a photo number {i}" for i in idx],
            S.IMAGE: pa.array([jpegs[i % 4] for i in idx], pa.binary()),
            S.ORIGINAL_WIDTH: pa.array(rng.integers(32, 2000, n), pa.int32()),
            S.ORIGINAL_HEIGHT: pa.array(rng.integers(32, 2000, n), pa.int32()),
            S.IMAGE_EMBEDDING: pa.array(list(emb), pa.list_(pa.float16())),
            S.CLIP_SCORE: pa.array(rng.normal(0.25, 0.05, n), pa.float32()),
            S.CAPTION_PERPLEXITY: pa.array(rng.lognormal(6, 1, n), pa.float32()),
            S.REJECT_REASON: pa.array(reason.tolist(), pa.string()),
            S.REJECT_STAGE: pa.array([r and "stage_" + r for r in reason.tolist()], pa.string()),
            S.ERROR_TYPE: pa.nulls(n, pa.string()),
        })
        kept = pc.is_null(t[S.REJECT_REASON])
        pq.write_table(t.filter(kept), root / "data" / f"{f:05d}.parquet")
        pq.write_table(t.filter(pc.invert(kept)), root / "rejected" / f"{f:05d}.parquet")
    (root / "config.resolved.yaml").write_text("stages:\n  - stage: clip_score\n    min_score: 0.2\n")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("bench/_work/explore"))
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    big, small = a.work / "big", a.work / "small"
    t, _ = timed(lambda: build(big, a.rows, a.files))
    build(small, a.rows // 10, max(1, a.files // 10))
    print(f"built {a.rows:,} rows in {a.files} files: {t:.1f}s")

    from curate.export import export_datacomp_uids, export_webdataset
    from curate.query import connect
    from curate.report import build_report

    tconn, con = timed(lambda: connect(big))  # creating the views reads every file's footer

    def duck():
        r = con.execute("SELECT reject_reason, count(*) FROM samples GROUP BY 1").fetchall()
        h = con.execute("SELECT floor(clip_score * 50)::INT AS b, count(*) FROM samples GROUP BY 1").fetchall()
        return dict(r), dict(h)

    def arrow():
        files = [str(f) for d in ("data", "rejected") for f in sorted((big / d).glob("*.parquet"))]
        t = ds.dataset(files, format="parquet").to_table(
            columns=[S.REJECT_REASON, S.CLIP_SCORE])
        r = t.group_by(S.REJECT_REASON).aggregate([([], "count_all")])
        b = pc.cast(pc.floor(pc.multiply(t[S.CLIP_SCORE], 50)), pa.int32())
        h = pa.table({"b": b}).group_by("b").aggregate([([], "count_all")])
        return dict(zip(r[S.REJECT_REASON].to_pylist(), r["count_all"].to_pylist())), \
            dict(zip(h["b"].to_pylist(), h["count_all"].to_pylist()))

    td, rd = timed(duck)
    ta, ra = timed(arrow)
    assert rd == ra
    con.close()
    print(f"reason counts + clip histogram over {a.rows:,} rows: duckdb views {td * 1000:.0f} ms "
          f"(+ {tconn * 1000:.0f} ms to connect), pyarrow.dataset baseline {ta * 1000:.0f} ms "
          f"(speed-up {ta / td:.2f}x; {ta / (td + tconn):.2f}x counting the connect)")

    tb, html = timed(lambda: build_report(big))
    ts, _ = timed(lambda: build_report(small))
    print(f"report: {a.rows:,} rows {tb:.2f}s ({len(html) / 1024:.0f} kB), {a.rows // 10:,} rows {ts:.2f}s "
          f"(10x the rows costs {tb / ts:.2f}x the time)")

    tc, info = timed(lambda: export_datacomp_uids(big, a.work / "uids.npy"))

    def readme_recipe():
        uids = pq.read_table(big / "data", columns=[S.UID])[S.UID].to_pylist()
        arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
        arr.sort()
        return arr

    tr, ref = timed(readme_recipe)
    assert (np.load(a.work / "uids.npy") == ref).all()
    print(f"datacomp uids ({info['uids']:,}): curate {tc:.2f}s, DataComp README recipe {tr:.2f}s "
          f"(ratio {tr / tc:.2f}x)")

    tw, m = timed(lambda: export_webdataset(big, a.work / "wds", shard_size=10_000))
    tp, n = timed(lambda: sum(b.num_rows for b in ds.dataset(big / "data").to_batches(
        columns=[S.UID, S.IMAGE, S.CAPTION])))
    assert n == m["samples"]
    print(f"webdataset export: {m['samples']:,} samples in {len(m['shards'])} shards, {tw:.2f}s "
          f"({m['samples'] / tw:,.0f} samples/s); pyarrow read of the same columns alone {tp:.2f}s "
          f"(export costs {tw / tp:.1f}x a bare read)")


if __name__ == "__main__":
    main()
