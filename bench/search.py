"""Benchmark of `curate index` / `curate search` on synthetic CLIP-like embeddings.

    python bench/search.py [--rows 1000000] [--dim 512] [--memory 4GiB] [--queries 1000] [--on-disk-from ROWS|never]

Writes a synthetic curate output (seeded: cluster centres + a 32-dimensional latent per row + a
little isotropic noise, L2-normalised, stored as float16 like clip_embed's columns) in Parquet
shards of 100k rows, builds the index through curate.index.build_index in a child process (its
build time and peak RSS are the child's alone), then searches held-out queries (new rows from the
same distribution) at k = 10 with the chosen index and with exact flat search (the baseline, IndexFlatIP
over the same vectors), and prints queries/s of both, their ratio and recall@10 against the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD = 100_000


def vectors(rng: np.random.Generator, n: int, centres: np.ndarray, proj: np.ndarray) -> np.ndarray:
    c = centres[rng.integers(0, len(centres), n)]
    x = c + rng.standard_normal((n, proj.shape[0]), dtype=np.float32) @ proj
    x += 0.05 * rng.standard_normal(x.shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def distribution(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres and latent projection (the first draws of the seeded generator)."""
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    return centres, rng.standard_normal((32, dim), dtype=np.float32) * 0.5


def write_output(out: Path, rows: int, dim: int, seed: int, captions: bool = False,
                 row_group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic output: ``data/`` files of ``SHARD`` rows with uids and float16 embeddings (``captions``:
    a caption per row too; ``row_group_size``: rows per Parquet row group, default one per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate import schema as S

    rng = np.random.default_rng(seed)
    centres, proj = distribution(rng, dim)
    (out / "data").mkdir(parents=True)
    for f, lo in enumerate(range(0, rows, SHARD)):
        n = min(SHARD, rows - lo)
        x = vectors(rng, n, centres, proj).astype(np.float16)
        offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1), pa.float16()))
        cols = {S.UID: pa.array([f"{lo + i:032x}" for i in range(n)])}
        if captions:
            cols[S.CAPTION] = pa.array([f"synthetic row {lo + i}" for i in range(n)])
        cols[S.IMAGE_EMBEDDING] = emb
        pq.write_table(pa.table(cols), out / "data" / f"{f:05d}.parquet", row_group_size=row_group_size)
    return centres, proj


def child_build(out: str, memory: str, on_disk_from: str) -> None:
    from curate.index import build_index
    from curate.index_plan import ON_DISK_BYTES, parse_bytes

    t0 = time.perf_counter()
    meta = build_index(out, memory=parse_bytes(memory),
                       on_disk_from=None if on_disk_from == "never" else int(float(on_disk_from)),
                       on_disk_bytes=None if on_disk_from == "never" else ON_DISK_BYTES)
    e = meta["indices"]["kept.image"]
    e["wall"] = time.perf_counter() - t0
    e["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({k: e.get(k, 0) for k in ("factory", "reason", "rows", "params", "recall_at_10", "wall",
                                               "peak_rss", "index_bytes", "ivfdata_bytes")}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--memory", default="4GiB")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-disk-from", default=None,
                   help="curate index --on-disk-from (default: curate's; 'never': the in-RAM IVF-PQ of earlier "
                        "figures; bench/index_disk.py compares the two)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.on_disk_from is None:
        from curate.index_plan import ON_DISK_FROM

        a.on_disk_from = str(ON_DISK_FROM)
    if a.child:
        return child_build(a.child, a.memory, a.on_disk_from)
    import faiss
    import pyarrow.parquet as pq

    from curate.dedup.vectors import matrix
    from curate.index_plan import human_bytes
    from curate.search import Searcher

    with tempfile.TemporaryDirectory(prefix="curate-bench-search-") as tmp:
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        centres, proj = write_output(out, a.rows, a.dim, a.seed)
        print(f"synthetic output: {a.rows} x {a.dim} float16 embeddings in {time.perf_counter() - t0:.1f}s")
        r = subprocess.run([sys.executable, __file__, "--child", str(out), "--memory", a.memory,
                            "--on-disk-from", a.on_disk_from],
                           capture_output=True, text=True, check=True)
        b = json.loads(r.stdout.strip().splitlines()[-1])
        lists = f" + {human_bytes(b['ivfdata_bytes'])} of memory-mapped lists" if b["ivfdata_bytes"] else ""
        print(f"index: {b['factory']} ({b['reason']}); params {b['params']}; {human_bytes(b['index_bytes'])}{lists} "
              "on disk")
        print(f"build: {b['wall']:.1f}s, peak RSS {human_bytes(b['peak_rss'])} (child process: streaming read, "
              f"training, adding, exact top-10 of 1000 sampled queries); build-time recall@10 {b['recall_at_10']:.3f}")
        q = vectors(np.random.default_rng(a.seed + 99), a.queries, centres, proj).astype(np.float16).astype(np.float32)
        x = np.concatenate([matrix(pq.read_table(f, columns=["image_embedding"]).column(0)).astype(np.float32)
                            for f in sorted((out / "data").glob("*.parquet"))])
        faiss.normalize_L2(x)
        flat = faiss.IndexFlatIP(a.dim)
        flat.add(x)
        del x
        t0 = time.perf_counter()
        _, exact = flat.search(q, 10)
        flat_qps = a.queries / (time.perf_counter() - t0)
        idx = Searcher(out).index("kept", "image").index
        t0 = time.perf_counter()
        _, found = idx.search(q, 10)
        qps = a.queries / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(min(200, a.queries)):  # one query at a time, as `curate search` / the web app do
            idx.search(q[i:i + 1], 10)
        single_qps = min(200, a.queries) / (time.perf_counter() - t0)
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
        print(f"queries (k=10, {a.queries} held-out, batched): {qps:.0f} q/s vs exact flat {flat_qps:.0f} q/s "
              f"= {qps / flat_qps:.1f}x; one at a time: {single_qps:.0f} q/s")
        print(f"recall@10 vs exact flat search: {recall:.3f}")


if __name__ == "__main__":
    main()
