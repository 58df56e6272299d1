"""Density-based pruning and embedding heads at scale, on synthetic clustered embeddings.

* ``density_prune``'s fit on N x D float16 embeddings in 10,000-row shard files (as a run's fit reads
  them): seconds and peak RSS, with centroids given (as when shared from dedup_semantic) -- the
  assignment pass, the quotas and the per-cluster selection;
* ``embedding_head`` (the LAION aesthetic MLP, random weights) over the same embeddings: rows/s of
  the batched stage against the baseline named by the issue, a plain per-row loop (one forward per
  row, measured on a sample and reported as rows/s).

    python bench/density.py --n 1000000 --d 768
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema as S


def _write_shards(root: Path, n: int, d: int, k: int, shard: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = rng.uniform(0.02, 0.08, size=k).astype(np.float32)
    paths = []
    for s, lo in enumerate(range(0, n, shard)):
        m = min(shard, n - lo)
        lab = rng.integers(0, k, m)
        x = centers[lab] + spread[lab, None] * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), d).cast(
            pa.list_(pa.float16()))
        t = pa.table({S.UID: [f"{s:05d}-{i:06d}" for i in range(m)], S.SHARD: pa.array([f"{s:05d}"] * m),
                      S.IMAGE_EMBEDDING: emb, S.REJECT_REASON: pa.nulls(m, pa.string())})
        path = root / f"{s:05d}.parquet"
        pq.write_table(t, path, use_dictionary=[S.SHARD])
        paths.append(str(path))
    return paths, centers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--shard", type=int, default=10_000)
    ap.add_argument("--loop-sample", type=int, default=2_000, help="rows the per-row baseline runs on")
    args = ap.parse_args()
    import torch

    import curate
    from curate.context import FitContext

    work = Path(tempfile.mkdtemp(prefix="curate-bench-density-"))
    try:
        t0 = time.perf_counter()
        (work / "in").mkdir()
        paths, centers = _write_shards(work / "in", args.n, args.d, args.clusters, args.shard)
        np.save(work / "centroids.npy", centers)
        print(f"{args.n:,} x {args.d} embeddings in {len(paths)} shards written in {time.perf_counter() - t0:.0f}s",
              flush=True)
        stage = curate.create_stage("density_prune", keep_fraction=0.5, centroids_path=str(work / "centroids.npy"))
        ctx = FitContext(paths, work / "state", total_rows=args.n)
        ctx.work_dir.mkdir(parents=True)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        state = stage.fit(ctx)
        fit_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"density_prune fit: {fit_s:.1f}s ({args.n / fit_s:,.0f} rows/s), removed {state['removed']:,}, "
              f"{state['clusters_with_rows']} clusters; peak RSS {rss / 2**20:.2f} GB (before the fit "
              f"{rss0 / 2**20:.2f} GB)", flush=True)

        from curate.stages.embedding_head import build_head

        torch.manual_seed(0)
        head = build_head("laion_aesthetic", args.d, [], "none")
        torch.save(head.state_dict(), work / "aesthetic.pth")
        st = curate.create_stage("embedding_head", preset="laion_aesthetic", weights=str(work / "aesthetic.pth"),
                                 device="cpu")
        st.ensure_setup()
        t0 = time.perf_counter()
        rows = 0
        for p in paths:
            t = pq.read_table(p)
            for lo in range(0, t.num_rows, st.resources.batch_size):
                rows += st.process(t.slice(lo, st.resources.batch_size)).num_rows
        batched = rows / (time.perf_counter() - t0)
        sample = pq.read_table(paths[0]).slice(0, args.loop_sample)
        x = np.array(sample[S.IMAGE_EMBEDDING].to_pylist(), dtype=np.float32)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for v in x:  # the baseline: one row at a time, as a per-row UDF would
                v = v / np.linalg.norm(v)
                float(head.layers(torch.from_numpy(v)[None])[0, 0])
        loop = len(x) / (time.perf_counter() - t0)
        print(f"embedding_head (LAION aesthetic MLP, CPU): batched {batched:,.0f} rows/s (incl. Parquet read) vs "
              f"per-row loop {loop:,.0f} rows/s = {batched / loop:.1f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
