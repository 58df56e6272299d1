"""Benchmark: curate's semantic and pHash dedup vs the SemDeDup reference and exact brute force.

    python bench/dedup.py --only semdedup --repeat 3          # SemDeDup side by side: 200k x 512, k=100
    python bench/dedup.py --only semdedup --semdedup-n 1000000 --k 500
    python bench/dedup.py                                     # every section (long: 1M-row sections)
    python bench/dedup.py --n 200000 --phash-n 200000 --exact-n 20000   # quicker
    python bench/dedup_scale.py                               # driver peak RSS at N and 10 N rows (Ray)

Data (deterministic, ``--seed``): L2-normalised float16 embeddings in topics (within-topic
cosine ~0.5) with planted near-duplicate pairs (0.5 % of rows get a copy at cosine
0.96-0.995), written as parquet work shards like curate's own; 64-bit pHashes drawn
uniformly with planted pairs 1-6 bits apart.  Each measurement runs in its own process, so
peak RSS is that method's alone.  Recall = planted pairs found (a duplicate_of linking them);
ground truth is checked by the exact runs (accidental pairs above the threshold are counted).

Sections (``--only``):
* semdedup: SemDeDup's own pipeline (``worker_semdedup_reference``, re-implemented from
  facebookresearch/SemDeDup's clustering.py, sort_clusters.py and semdedup.py) vs curate's
  k-means path in ``mode: semdedup`` with the same k, niter, seed and eps, on --semdedup-n rows;
  prints both times, the ratio reference/curate and whether the removed rows are the same;
  curate runs twice: k-means trained on every row (SemDeDup's own training set, so the very
  same centroids and decisions) and on curate's default sample;
* exact: curate exact path vs curate k-means path vs full FAISS brute force (--exact-n rows);
* kmeans: curate k-means path (fit + applying decisions to every shard) vs FAISS brute force
  (IndexFlatIP range search), timed on --queries query rows and extrapolated to all rows;
* phash: curate dedup_phash (multi-index hashing) vs FAISS IndexBinaryFlat brute force
  (range search, timed on --queries rows and extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD = 50_000
THRESHOLD = 0.95
RADIUS = 6


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM; getrusage would include the pre-exec parent image)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _write(out: Path, cols: dict, n: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, n, SHARD)):
        hi = min(n, lo + SHARD)
        shard = f"00000-{k:05d}"
        t = {"uid": pa.array([f"r{i:08d}" for i in range(lo, hi)]), "_shard": pa.array([shard] * (hi - lo)),
             "source_row": pa.array(np.arange(lo, hi)), "reject_reason": pa.nulls(hi - lo, pa.string()),
             "reject_stage": pa.nulls(hi - lo, pa.string()), "reject_detail": pa.nulls(hi - lo, pa.string()),
             "error_type": pa.nulls(hi - lo, pa.string())}
        for name, fn in cols.items():
            t[name] = fn(lo, hi)
        pq.write_table(pa.table(t), out / f"{shard}.parquet")
        paths.append(str(out / f"{shard}.parquet"))
    return paths


def make_embeddings(out: Path, n: int, d: int, seed: int) -> dict:
    """Topic-structured unit vectors; 0.5 % of rows are near-copies of an earlier row."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(1, n // 1000), d)) / np.sqrt(d)
    n_pairs = n // 200
    src = np.sort(rng.choice(n // 2, n_pairs, replace=False))
    dst = n // 2 + rng.choice(n - n // 2, n_pairs, replace=False)
    emb = np.empty((n, d), np.float16)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = topics[rng.integers(0, len(topics), hi - lo)] + rng.standard_normal((hi - lo, d)) / np.sqrt(d)
        emb[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    tau = rng.uniform(0.1, 0.29, n_pairs)[:, None]
    x = emb[src].astype(np.float64) + tau * rng.standard_normal((n_pairs, d)) / np.sqrt(d)
    emb[dst] = x / np.linalg.norm(x, axis=1, keepdims=True)
    score = rng.random(n).astype(np.float32)

    def col(lo: int, hi: int) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (hi - lo + 1) * d, d, dtype=np.int32)),
                                        pa.array(emb[lo:hi].ravel()))

    paths = _write(out, {"image_embedding": col, "clip_score": lambda lo, hi: pa.array(score[lo:hi])}, n)
    np.save(out / "pairs.npy", np.stack([src, dst], 1))
    return {"paths": paths, "pairs": n_pairs}


def make_phashes(out: Path, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, n).astype(np.uint64)
    n_pairs = n // 200
    src = np.sort(rng.choice(n // 2, n_pairs, replace=False))
    dst = n // 2 + rng.choice(n - n // 2, n_pairs, replace=False)
    for p, q in zip(src, dst):
        flips = rng.choice(64, int(rng.integers(1, RADIUS + 1)), replace=False)
        h[q] = h[p] ^ np.uint64(sum(1 << int(f) for f in flips))
    paths = _write(out, {"phash": lambda lo, hi: pa.array(h[lo:hi], pa.uint64()),
                         "width": lambda lo, hi: pa.array(np.full(hi - lo, 256, np.int32)),
                         "height": lambda lo, hi: pa.array(np.full(hi - lo, 256, np.int32))}, n)
    np.save(out / "pairs.npy", np.stack([src, dst], 1))
    np.save(out / "hashes.npy", h)
    return {"paths": paths, "pairs": n_pairs}


# -- workers (one process each) ---------------------------------------------------------------
def worker_curate(data: Path, params: dict, out: Path) -> dict:
    import importlib

    import torch  # noqa: F401  -- library imports are outside both timings, as in the reference worker

    if params.get("kmeans_backend", "faiss") == "faiss":
        importlib.import_module("faiss")

    from curate import registry
    from curate.context import FitContext

    paths = sorted(str(p) for p in data.glob("*.parquet"))
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=data.parent))
    stage = registry.create(params)
    ctx = FitContext(paths, work, "local", os.cpu_count() or 1, sum(pq.read_metadata(p).num_rows for p in paths))
    t0, c0 = time.perf_counter(), cpu_s()
    stage.set_state(stage.fit(ctx))
    t_fit, c_fit = time.perf_counter() - t0, cpu_s() - c0
    rows, dups = [], []
    cols = ["uid", "_shard", "reject_reason", "reject_stage", "reject_detail", "error_type"]
    for p in paths:
        t = stage.run_batch(pq.read_table(p, columns=cols))
        rows.append(np.array([int(u[1:]) for u in t["uid"].to_pylist()]))
        dups.append(np.array([-1 if d is None else int(d[1:]) for d in t["duplicate_of"].to_pylist()]))
    t_all = time.perf_counter() - t0
    np.save(out.with_suffix(".npy"), np.stack([np.concatenate(rows), np.concatenate(dups)], 1))
    shutil.rmtree(work, ignore_errors=True)
    return {"fit_s": t_fit, "fit_cpu_s": c_fit, "total_s": t_all, "info": stage.describe()}


def _load_emb(data: Path) -> np.ndarray:
    files = sorted(data.glob("*.parquet"))
    n = sum(pq.read_metadata(f).num_rows for f in files)
    out, lo = None, 0
    for f in files:
        col = pq.read_table(f, columns=["image_embedding"])["image_embedding"].combine_chunks()
        part = col.flatten().to_numpy().reshape(len(col), -1)
        if out is None:
            out = np.empty((n, part.shape[1]), np.float32)
        out[lo:lo + len(part)] = part
        lo += len(part)
    return out


def worker_semdedup_reference(data: Path, params: dict, out: Path) -> dict:
    """SemDeDup's own pipeline (facebookresearch/SemDeDup), re-implemented from its code.

    ``clustering/clustering.py``: ``faiss.Kmeans(d, k, niter, seed, spherical=True)`` trained on
    every embedding (FAISS subsamples 256 rows per centroid), then ``kmeans.index.search(x, 1)``;
    ``clustering/sort_clusters.py``: per cluster, rows sorted by ``1 - similarity`` to the centroid,
    descending (``keep_hard``: farthest first; Python's stable ``sorted``); ``semdedup.py``: per
    cluster, ``reps @ reps.T`` (torch, float32), ``fill_diagonal_(0)``, ``triu(diagonal=1)``,
    ``max(dim=0)`` and ``M > 1 - eps`` removes a row.  Their intermediate files (sorted clusters,
    per-cluster pickles) are kept in memory here, which only makes the reference faster.
    """
    import faiss
    import pandas as pd
    import torch

    k, niter, seed, eps = params["k"], params["niter"], params["seed"], params["eps"]
    t0, c0 = time.perf_counter(), cpu_s()
    x = _load_emb(data)  # the float32 (n, d) array SemDeDup memory-maps
    t_load, c_load = time.perf_counter() - t0, cpu_s() - c0
    t1 = time.perf_counter()
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False, gpu=False)
    kmeans.train(x)
    t_train = time.perf_counter() - t1
    t1 = time.perf_counter()
    dist_to_cent, nearest_cent = kmeans.index.search(x, 1)
    dist_to_cent, nearest_cent = dist_to_cent.squeeze(1), nearest_cent.squeeze(1)
    t_assign = time.perf_counter() - t1
    t1 = time.perf_counter()
    dist_df = pd.DataFrame({"paths_list": np.arange(len(x)), "nearest_cent": nearest_cent,
                            "dist_to_cent": dist_to_cent})
    sorted_clusters = []
    for c in range(k):
        cluster_df = dist_df.loc[dist_df["nearest_cent"] == c]
        items = list(cluster_df.index)
        dists = list(1 - cluster_df["dist_to_cent"])  # spherical: cosine distance
        sorted_clusters.append(sorted(zip(list(cluster_df["paths_list"]), items, dists, [c] * len(items)),
                                      key=lambda r: r[2], reverse=True))
    t_sort = time.perf_counter() - t1
    t1 = time.perf_counter()
    removed = []
    for cluster in sorted_clusters:
        if len(cluster) < 2:
            continue
        ids = np.array([r[1] for r in cluster], np.int32)
        reps = torch.tensor(x[ids])
        sim = reps @ reps.T
        sim.fill_diagonal_(0.0)
        m = torch.max(torch.triu(sim, diagonal=1), dim=0)[0].cpu().numpy()
        removed.append(ids[m > 1 - eps])
    t_pairs = time.perf_counter() - t1
    total, c_total = time.perf_counter() - t0, cpu_s() - c0
    rem = np.sort(np.concatenate(removed)) if removed else np.zeros(0, np.int64)
    np.save(out.with_suffix(".npy"), rem.astype(np.int64))
    np.save(out.with_suffix(".centroids.npy"), kmeans.centroids)
    return {"load_s": t_load, "kmeans_s": t_train, "assign_s": t_assign, "sort_s": t_sort, "pairwise_s": t_pairs,
            "total_s": total, "compute_s": total - t_load, "cpu_s": c_total, "compute_cpu_s": c_total - c_load,
            "removed": int(len(rem))}


def worker_bruteforce(data: Path, queries: int, out: Path) -> dict:
    """FAISS exact range search: all rows as the base, ``queries`` rows (0 = all) as queries."""
    import faiss

    t0 = time.perf_counter()
    x = _load_emb(data)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t_load = time.perf_counter() - t0
    n = len(x)
    q = np.arange(n) if not queries or queries >= n else np.random.default_rng(0).choice(n, queries, replace=False)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, nbr = index.range_search(x[q], THRESHOLD)
    t_search = time.perf_counter() - t0
    i = np.repeat(q, np.diff(lims).astype(np.int64))
    np.save(out.with_suffix(".npy"), np.stack([i, nbr], 1)[i != nbr])
    np.save(out.with_suffix(".queries.npy"), q)
    return {"load_s": t_load, "search_s": t_search, "queries": len(q), "n": n,
            "extrapolated_s": t_search * n / len(q)}


def worker_bruteforce_binary(data: Path, queries: int, out: Path) -> dict:
    import faiss

    h = np.load(data / "hashes.npy")
    codes = h.astype(">u8").view(np.uint8).reshape(-1, 8)
    n = len(h)
    q = np.random.default_rng(0).choice(n, min(queries, n), replace=False)
    t0 = time.perf_counter()
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, nbr = index.range_search(codes[q], RADIUS + 1)  # binary range search: distance < radius
    t_search = time.perf_counter() - t0
    i = np.repeat(q, np.diff(lims).astype(np.int64))
    np.save(out.with_suffix(".npy"), np.stack([i, nbr], 1)[i != nbr])
    np.save(out.with_suffix(".queries.npy"), q)
    return {"search_s": t_search, "queries": len(q), "n": n, "extrapolated_s": t_search * n / len(q)}


def run_worker(name: str, data: Path, arg: str, tmp: Path) -> dict:
    out = tmp / f"{name}-{data.name}-{abs(hash(arg)) % 10**8}.json"
    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--arg", arg, "--out", str(out)]
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    res["result"] = np.load(out.with_suffix(".npy"))
    if out.with_suffix(".queries.npy").exists():
        res["queries_idx"] = np.load(out.with_suffix(".queries.npy"))
    return res


# -- scoring -----------------------------------------------------------------------------------
def score_decisions(dec: np.ndarray, pairs: np.ndarray) -> tuple[float, float]:
    dup = np.full(dec[:, 0].max() + 1, -1)
    dup[dec[:, 0]] = dec[:, 1]
    found = (dup[pairs[:, 1]] == pairs[:, 0]) | (dup[pairs[:, 0]] == pairs[:, 1])
    removed = np.flatnonzero(dup >= 0)
    planted = set(map(tuple, pairs.tolist()))
    good = sum((min(r, dup[r]), max(r, dup[r])) in planted for r in removed.tolist())
    return float(found.mean()), good / max(1, len(removed))


def score_pairs(found: np.ndarray, pairs: np.ndarray, queried: np.ndarray | None = None) -> tuple[float, int]:
    """Recall of planted pairs among those with a queried row, and count of unplanted pairs found."""
    got = {(min(a, b), max(a, b)) for a, b in found.tolist()}
    planted = {(min(a, b), max(a, b)) for a, b in pairs.tolist()}
    if queried is not None:
        qs = set(queried.tolist())
        planted = {p for p in planted if p[0] in qs or p[1] in qs}
    return len(got & planted) / max(1, len(planted)), len(got - planted)


def _data(root: Path, name: str, n: int, make, *args) -> tuple[Path, dict, float]:
    """Write a data set once (reused when --workdir already holds the same size)."""
    out = root / name
    stamp = out / "rows.txt"
    if stamp.exists() and stamp.read_text() == str(n):
        return out, {"pairs": len(np.load(out / "pairs.npy"))}, 0.0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    info = make(out, n, *args)
    stamp.write_text(str(n))
    return out, info, time.perf_counter() - t0


def removed_rows(dec: np.ndarray) -> np.ndarray:
    """Rows a curate run removed (its decisions: (row, duplicate_of or -1))."""
    return np.sort(dec[dec[:, 1] >= 0, 0])


def semdedup_side_by_side(a: argparse.Namespace, root: Path) -> None:
    """SemDeDup's pipeline vs curate's k-means path (mode semdedup) on the same planted embeddings.

    The three runs are repeated ``--repeat`` times, interleaved (the machine's load changes
    between runs); the summary gives the median ratio of each curate run to the reference."""
    data, info, t_make = _data(root, "emb_semdedup", a.semdedup_n, make_embeddings, a.dim, a.seed)
    print(f"[SemDeDup side by side, {a.semdedup_n:,} x {a.dim} float16, k={a.k}, niter={a.niter}, "
          f"seed={a.kmeans_seed}, eps={a.eps}] data: {info['pairs']:,} planted pairs"
          + (f", written in {t_make:.1f} s" if t_make else ", reused")
          + "; times exclude library imports; curate = its fit (decisions written), local runner", flush=True)
    base = {"stage": "dedup_semantic", "mode": "semdedup", "eps": a.eps, "method": "kmeans", "n_clusters": a.k,
            "kmeans_iterations": a.niter, "seed": a.kmeans_seed}
    runs = (("curate, k-means sample = every row (SemDeDup's training set)",
             {**base, "kmeans_sample_per_centroid": 10**9, "kmeans_max_sample": 10**9}),
            ("curate, default k-means sample (128 rows per centroid)", base))
    ratios: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in runs}
    for rep in range(a.repeat):
        ref = run_worker("reference", data, json.dumps({"k": a.k, "niter": a.niter, "seed": a.kmeans_seed,
                                                       "eps": a.eps}), root)
        want = ref["result"]
        print(f"  run {rep + 1}: SemDeDup reference (faiss.Kmeans spherical + per-cluster torch matmul): "
              f"{ref['total_s']:.1f} s (parquet load {ref['load_s']:.1f}, k-means {ref['kmeans_s']:.1f}, assign "
              f"{ref['assign_s']:.1f}, sort {ref['sort_s']:.1f}, pairwise {ref['pairwise_s']:.1f}); CPU "
              f"{ref['cpu_s']:.1f} s; peak RSS {ref['peak_rss_mb']:.0f} MB; {len(want):,} rows removed", flush=True)
        for label, params in runs:
            r = run_worker("curate", data, json.dumps(params), root)
            got = removed_rows(r["result"])
            diff = len(np.setxor1d(got, want))
            verdict = "identical to the reference's" if diff == 0 else \
                f"differ from the reference's in {diff:,} rows ({1 - diff / max(1, len(want)):.4f} agreement)"
            ratios[label].append((ref["total_s"] / r["fit_s"], ref["compute_s"] / r["fit_s"]))
            print(f"    {label}: fit {r['fit_s']:.1f} s, CPU {r['fit_cpu_s']:.1f} s; peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB; {len(got):,} rows removed, decisions {verdict}", flush=True)
            print(f"      ratio reference/curate: {ratios[label][-1][0]:.2f}x end to end (both read the same "
                  f"parquet; CPU time {ref['cpu_s'] / r['fit_cpu_s']:.2f}x); {ratios[label][-1][1]:.2f}x against "
                  f"the reference without its parquet load, as if it read a float32 memmap (CPU time "
                  f"{ref['compute_cpu_s'] / r['fit_cpu_s']:.2f}x)", flush=True)
    for label, rs in ratios.items():
        print(f"  median of {len(rs)} run(s), {label}: {np.median([x for x, _ in rs]):.2f}x end to end, "
              f"{np.median([y for _, y in rs]):.2f}x against the memmap reference", flush=True)
    if not a.workdir:
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="semdedup,exact,kmeans,phash",
                    help="comma-separated sections: semdedup, exact, kmeans, phash")
    ap.add_argument("--semdedup-n", type=int, default=200_000, help="rows for the SemDeDup side-by-side run")
    ap.add_argument("--k", type=int, default=100, help="k-means clusters of the SemDeDup side-by-side run")
    ap.add_argument("--niter", type=int, default=20, help="k-means iterations (both pipelines)")
    ap.add_argument("--kmeans-seed", type=int, default=1234, help="k-means seed (both pipelines)")
    ap.add_argument("--eps", type=float, default=0.05, help="SemDeDup eps (threshold 1 - eps)")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions of the SemDeDup side-by-side runs")
    ap.add_argument("--n", type=int, default=1_000_000, help="embedding rows (k-means path vs brute force)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--exact-n", type=int, default=50_000, help="rows for exact path vs k-means vs brute force")
    ap.add_argument("--phash-n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=5_000, help="brute-force query rows at full size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where to write the data (kept, and reused by later runs; "
                    "default: a temp dir, removed)")
    ap.add_argument("--worker"), ap.add_argument("--data"), ap.add_argument("--arg"), ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        data, out = Path(a.data), Path(a.out)
        res = {"curate": lambda: worker_curate(data, json.loads(a.arg), out),
               "reference": lambda: worker_semdedup_reference(data, json.loads(a.arg), out),
               "bruteforce": lambda: worker_bruteforce(data, int(a.arg), out),
               "bruteforce_binary": lambda: worker_bruteforce_binary(data, int(a.arg), out)}[a.worker]()
        res["peak_rss_mb"] = peak_rss_mb()
        out.write_text(json.dumps(res))
        return
    sections = set(a.only.split(","))
    root = Path(a.workdir or tempfile.mkdtemp(prefix="curate-bench-dedup-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"curate dedup benchmark: {os.cpu_count()} cores; data in {root}")
    if "semdedup" in sections:
        semdedup_side_by_side(a, root)
    rows = []

    def report(name: str, n: int, seconds: float, rss: float, recall: float, extra: str = "") -> None:
        rows.append((name, n, seconds, rss, recall, extra))
        print(f"  {name:<46} n={n:>9,}  {seconds:8.1f} s  peak RSS {rss:7.0f} MB  recall {recall:.4f}  {extra}",
              flush=True)

    sem = {"stage": "dedup_semantic", "threshold": THRESHOLD}
    if "exact" in sections:
        # exact path vs k-means path vs brute force on the same --exact-n rows
        small = root / "emb_small"
        t0 = time.perf_counter()
        info = make_embeddings(small, a.exact_n, a.dim, a.seed + 1)
        print(f"[semantic, {a.exact_n:,} x {a.dim}] data written in {time.perf_counter() - t0:.1f} s, "
              f"{info['pairs']:,} planted pairs")
        pairs = np.load(small / "pairs.npy")
        bf = run_worker("bruteforce", small, "0", root)
        rec, extra = score_pairs(bf["result"], pairs)
        report("FAISS brute force (IndexFlatIP range search)", a.exact_n, bf["search_s"], bf["peak_rss_mb"], rec,
               f"unplanted pairs > {THRESHOLD}: {extra}")
        base_s = bf["search_s"]
        for label, params in (("curate exact path", {**sem, "method": "exact"}),
                              ("curate k-means path", {**sem, "method": "kmeans"})):
            r = run_worker("curate", small, json.dumps(params), root)
            rec, prec = score_decisions(r["result"], pairs)
            report(label, a.exact_n, r["total_s"], r["peak_rss_mb"], rec,
                   f"precision {prec:.4f}; fit {r['fit_s']:.1f} s; {r['total_s'] / base_s:.2f}x brute force; "
                   f"clusters {r['info'].get('n_clusters', '-')}")
        shutil.rmtree(small, ignore_errors=True)
    if "kmeans" in sections:
        # full size: k-means path vs (extrapolated) brute force
        big = root / "emb_big"
        t0 = time.perf_counter()
        info = make_embeddings(big, a.n, a.dim, a.seed)
        print(f"[semantic, {a.n:,} x {a.dim} float16] data written in {time.perf_counter() - t0:.1f} s, "
              f"{info['pairs']:,} planted pairs")
        pairs = np.load(big / "pairs.npy")
        r = run_worker("curate", big, json.dumps({**sem, "method": "kmeans"}), root)
        rec, prec = score_decisions(r["result"], pairs)
        km_s = r["total_s"]
        report("curate k-means path (SemDeDup scheme)", a.n, km_s, r["peak_rss_mb"], rec,
               f"precision {prec:.4f}; fit {r['fit_s']:.1f} s; clusters {r['info'].get('n_clusters')}; "
               f"largest {r['info'].get('largest_cluster')}")
        bf = run_worker("bruteforce", big, str(a.queries), root)
        rec, extra = score_pairs(bf["result"], pairs, bf["queries_idx"])
        report("FAISS brute force, extrapolated from queries", a.n, bf["extrapolated_s"], bf["peak_rss_mb"], rec,
               f"{bf['queries']:,} queries took {bf['search_s']:.1f} s; unplanted pairs: {extra}")
        matrix_gb = a.n * a.n * 4 / 1e9
        print(f"  k-means path: {bf['extrapolated_s'] / km_s:.1f}x faster than brute force; peak RSS "
              f"{r['peak_rss_mb'] / 1e3:.2f} GB vs {matrix_gb:,.0f} GB for a full float32 pairwise matrix "
              f"({r['peak_rss_mb'] / 1e3 / matrix_gb:.1e} of it)")
        shutil.rmtree(big, ignore_errors=True)
    if "phash" in sections:
        ph = root / "phash"
        t0 = time.perf_counter()
        info = make_phashes(ph, a.phash_n, a.seed)
        print(f"[pHash, {a.phash_n:,} x 64 bit, radius {RADIUS}] data written in {time.perf_counter() - t0:.1f} s, "
              f"{info['pairs']:,} planted pairs")
        pairs = np.load(ph / "pairs.npy")
        r = run_worker("curate", ph, json.dumps({"stage": "dedup_phash", "radius": RADIUS}), root)
        rec, prec = score_decisions(r["result"], pairs)
        report("curate dedup_phash (multi-index hashing)", a.phash_n, r["total_s"], r["peak_rss_mb"], rec,
               f"precision {prec:.4f}; fit {r['fit_s']:.1f} s; pairs {r['info'].get('pairs')}")
        bf = run_worker("bruteforce_binary", ph, str(a.queries), root)
        rec, extra = score_pairs(bf["result"], pairs, bf["queries_idx"])
        report("FAISS IndexBinaryFlat brute force, extrapolated", a.phash_n, bf["extrapolated_s"], bf["peak_rss_mb"],
               rec, f"{bf['queries']:,} queries took {bf['search_s']:.1f} s; unplanted pairs: {extra}")
        print(f"  dedup_phash: {bf['extrapolated_s'] / r['total_s']:.1f}x faster than brute force")
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
