"""``density_prune``: density-based pruning (Abbas et al. 2024, "Effective pruning of web-scale
datasets based on complexity of concept clusters"), on the k-means clusters of semantic dedup.

Rule (followed from the paper, Sec. 3, and its reference ``DBP`` code in facebookresearch/SemDeDup's
``clustering`` utilities for the per-cluster distances):

* every live row with an ``image_embedding`` goes to its nearest centroid (max cosine); its
  distance is ``d = 1 - cosine`` (float64 decision, as :func:`curate.dedup.vectors.nearest`);
* per cluster j (clusters with members only): ``d_intra_j`` = mean ``d`` of its members;
  ``d_inter_j`` = mean of ``1 - cos(c_j, c_i)`` over its ``neighbours`` (20) nearest other
  centroids; complexity ``C_j = d_inter_j * d_intra_j``; ``P = softmax(C / temperature)`` (0.5);
* target ``N = floor(keep_fraction * rows)``; the quotas solve the reference's QP (``pruning_qp`` in
  the authors' effective_pruning repository): ``min ||x - P * N||^2`` with ``sum x = N`` and
  ``lb_j <= x_j <= n_j``, i.e. ``x_j = clip(P_j * N + mu, lb_j, n_j)`` for the one shift ``mu`` that
  makes the sum ``N`` (capped clusters' excess is spread evenly over the others, not in proportion to
  P); ``lb_j = min(m, n_j - 1)`` with the reference's class-balance floor ``m = floor(cluster_balance *
  N / k)`` (its ``cls_bal_ratio``, default 0.5; ``m = 1`` when 0; k: clusters with rows), raised to
  ``min(min_per_cluster, n_j)``; integers: the floors, then one more row to the clusters with the
  largest fractional parts (ties: lower cluster id) until the sum is exactly ``N`` (the reference
  rounds with ``rint`` and may miss ``N`` by a few rows);
* inside a cluster keep the ``N_j`` rows farthest from the centroid (``keep: hard``, the paper's
  choice), the closest (``easy``) or a seeded random pick (``random``: by a hash of seed and uid);
  ties by uid.  The others are rejected with ``density_pruned``.

Clusters: the centroids of the pipeline's ``dedup_semantic`` stage (``clusters_from``; it must have
used k-means), or ``centroids_path`` (a ``.npy``), else k-means is trained here on a sample
(``n_clusters``).  Work is partitioned: one pass over the shards (assignment, per-cluster sums),
the quotas on the driver (k numbers), one task per bucket of clusters for the selection.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate import schema as S
from curate.dedup import store, vectors
from curate.dedup.base import DecisionStage, check_columns
from curate.io import fs
from curate.registry import register
from curate.stage import StageError, StageParams

log = logging.getLogger(__name__)


class DensityPruneParams(StageParams):
    stage: Literal["density_prune"] = "density_prune"
    keep_fraction: float = Field(gt=0, le=1, description="fraction of the rows reaching the stage to keep")
    temperature: float = Field(0.5, gt=0, description="softmax temperature over cluster complexities")
    neighbours: int = Field(20, ge=1, description="nearest other centroids averaged in d_inter")
    cluster_balance: float = Field(0.5, ge=0, le=1, description="the reference's class-balance floor "
                                   "(cls_bal_ratio): every cluster keeps at least floor(cluster_balance * "
                                   "target / clusters) rows, at most all but one (0: at least 1)")
    min_per_cluster: int = Field(0, ge=0, description="keep at least this many rows of every cluster "
                                 "(on top of cluster_balance's floor)")
    keep: Literal["hard", "easy", "random"] = Field("hard", description="inside a cluster keep the farthest "
                                                    "from the centroid (hard), the closest (easy) or random")
    seed: int = Field(0, description="keep random: the seed of the pick; k-means trained here: its seed")
    clusters_from: str | None = Field("dedup_semantic", description="id of the semantic dedup stage whose "
                                      "k-means centroids to use (when it ran k-means)")
    centroids_path: str | None = Field(None, description=".npy (k, d) centroids (instead of clusters_from)")
    n_clusters: int | None = Field(None, ge=1, description="k-means trained here: clusters (default rows / 2000)")
    rows_per_bucket: int = Field(2_000_000, ge=1, description="rows per cluster-bucket task of the selection")


def lower_bounds(sizes: np.ndarray, target: int, balance: float, min_per_cluster: int = 0) -> np.ndarray:
    """Rows every cluster keeps at least: the reference's ``min(m, n_j - 1)`` with its class-balance floor
    ``m = floor(balance * target / k)`` (``m = 1`` when ``balance`` is 0; k: clusters with rows), raised to
    ``min(min_per_cluster, n_j)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k = int((sizes > 0).sum())
    m = int(target / k * balance) if balance > 0 and k else 1  # the reference's int((N / k) * cls_bal_ratio)
    lb = np.maximum(np.minimum(m, sizes - 1), 0)
    return np.maximum(lb, np.minimum(min_per_cluster, sizes))


def quotas(p: np.ndarray, sizes: np.ndarray, target: int, lb: np.ndarray) -> np.ndarray:
    """Integer rows kept per cluster: the solution of the reference's QP (``pruning_qp``)

        min ||x - p * target||^2   s.t.   sum(x) = target,   lb <= x <= sizes,

    which is the additive shift ``x_j = clip(p_j * target + mu, lb_j, n_j)`` (``mu`` by bisection: the sum
    is monotone in it), rounded by largest remainders (ties: lower cluster id) so that the quotas sum to
    exactly ``target``.  The reference rounds with ``rint`` and may miss the total by a few rows.  A target
    outside ``[sum(lb), sum(sizes)]`` is moved to the nearest end."""
    sizes = np.asarray(sizes, dtype=np.float64)
    lb = np.minimum(np.asarray(lb, dtype=np.float64), sizes)
    target = int(min(max(target, int(lb.sum())), int(sizes.sum())))
    want = np.asarray(p, dtype=np.float64) * target

    def total(mu: float) -> float:
        return float(np.clip(want + mu, lb, sizes).sum())

    a = float((lb - want).min()) - 1.0  # every cluster at its lower bound: total(a) = sum(lb) <= target
    b = float((sizes - want).max()) + 1.0  # every cluster full: total(b) = sum(sizes) >= target
    for _ in range(200):  # bisection to float precision
        m = (a + b) / 2.0
        if total(m) < target:
            a = m
        else:
            b = m
    real = np.clip(want + b, lb, sizes)
    out = np.floor(real + 1e-9).astype(np.int64)
    left = target - int(out.sum())
    if left > 0:
        frac = np.where(out < sizes, real - out, -1.0)
        order = np.lexsort((np.arange(len(frac)), -frac))  # largest fraction first, then lower id
        out[order[:left]] += 1
    elif left < 0:  # floats summing a hair over the target: take back from the smallest fractions above lb
        frac = np.where(out > lb, real - out, np.inf)
        order = np.lexsort((np.arange(len(frac)), frac))
        out[order[:-left]] -= 1
    return out


def complexity(centroids: np.ndarray, counts: np.ndarray, dist_sums: np.ndarray, neighbours: int) -> np.ndarray:
    """``d_inter * d_intra`` of every cluster with members (NaN for empty ones)."""
    c = vectors.normalise(centroids)
    live = np.flatnonzero(counts > 0)
    d_intra = dist_sums[live] / counts[live]
    sims = c[live] @ c.T  # (live clusters, k): k centroids fit in memory (k is ~rows / 2000)
    sims[np.arange(len(live)), live] = -np.inf  # not itself
    m = min(neighbours, c.shape[0] - 1)
    d_inter = np.zeros(len(live))
    if m > 0:
        top = -np.partition(-sims, m - 1, axis=1)[:, :m]
        d_inter = (1.0 - top).mean(axis=1)
    out = np.full(len(counts), np.nan)
    out[live] = d_inter * d_intra
    return out


def _assign(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One group of input files: nearest centroid and distance of every live row with an embedding,
    written by cluster bucket; returns per-cluster counts and distance sums."""
    from curate.stages.dedup_semantic import _read_active

    files, centroids, buckets, out, name = args
    c64 = fs.load_npy(centroids)
    out = fs.as_path(out)
    counts, sums = np.zeros(len(c64), np.int64), np.zeros(len(c64))
    for j, path in enumerate(files):
        t, x = _read_active(path, [S.UID, S.SHARD, S.IMAGE_EMBEDDING], S.IMAGE_EMBEDDING)
        if t.num_rows == 0:
            continue
        u = vectors.normalise(x)
        labels = vectors.nearest(x, c64)
        dist = 1.0 - np.einsum("ij,ij->i", u, c64[labels])
        np.add.at(counts, labels, 1)
        np.add.at(sums, labels, dist)
        rows = pa.table({S.UID: t[S.UID], S.SHARD: t[S.SHARD], "cluster": pa.array(labels, pa.int64()),
                         "dist": pa.array(dist, pa.float64())})
        store.write_partitioned(rows, labels % buckets, out, f"{name}-{j:05d}")
    return counts, sums


def _sample(args: tuple[list[str], int, int]) -> list[np.ndarray]:
    """The k-means sample rows of a group of input files: ``crc32(uid) % total < want``."""
    import zlib

    from curate.stages.dedup_semantic import _read_active

    files, total, want = args
    out = []
    for path in files:
        t, x = _read_active(path, [S.UID], S.IMAGE_EMBEDDING)
        if t.num_rows:
            h = np.array([zlib.crc32(u.encode()) for u in t[S.UID].to_pylist()])
            out.append(x[h % total < want])
    return out


def _order_key(t: pa.Table, keep: str, seed: int) -> np.ndarray:
    """Sort key inside a cluster: the first rows are kept."""
    if keep == "hard":
        return -t["dist"].to_numpy()
    if keep == "easy":
        return t["dist"].to_numpy()
    salt = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(salt + u.encode(), digest_size=8).digest(), "big")
                     for u in t[S.UID].to_pylist()], np.float64)


def _select(args: tuple) -> int:
    """One bucket of clusters: the rows beyond each cluster's quota become decisions."""
    assign_dir, b, quota_file, keep, seed, parts_dir, buckets = args
    files = store.partition_files(assign_dir, b)
    if not files:
        return 0
    quota = fs.load_npy(quota_file)
    t = pa.concat_tables(store.read_files(files))
    keyed = pa.table({"c": t["cluster"], "k": pa.array(_order_key(t, keep, seed)), "u": t[S.UID]})
    order = pc.sort_indices(keyed, sort_keys=[("c", "ascending"), ("k", "ascending"), ("u", "ascending")]).to_numpy()
    labels = t["cluster"].to_numpy()[order]  # by cluster, then keep-first, then uid
    starts = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    drop = order[rank >= quota[labels]]
    if len(drop) == 0:
        return 0
    sub = t.take(pa.array(drop))
    q, n = quota[sub["cluster"].to_numpy()], np.bincount(labels, minlength=len(quota))[sub["cluster"].to_numpy()]
    detail = [f"cluster {c}: keeps {a} of {m} ({keep})" for c, a, m in zip(sub["cluster"].to_pylist(), q, n)]
    dec = store.decisions_table(sub[S.SHARD], sub[S.UID], [None] * sub.num_rows, detail)
    return store.write_decisions(dec, parts_dir, f"d{b:05d}", buckets)


@register
class DensityPrune(DecisionStage):
    name = "density_prune"
    Params = DensityPruneParams
    needs = (S.UID, S.SHARD, S.IMAGE_EMBEDDING)
    params: DensityPruneParams

    def fit(self, ctx: Any) -> Any:
        p = self.params
        check_columns(self, ctx, (S.UID, S.SHARD, S.IMAGE_EMBEDDING))
        work = fs.as_path(ctx.work_dir)
        for sub in ("assign", "parts"):
            fs.remove(work / sub)
            fs.makedirs(work / sub)
        centroids, source = self._centroids(ctx, work)
        c64 = fs.load_npy(centroids)
        k = len(c64)
        cb = store.n_partitions(ctx.total_rows or 1, p.rows_per_bucket)
        groups = store.file_groups(ctx.paths)
        res = ctx.map(_assign, [(g, centroids, cb, str(work / "assign"), f"a{i:05d}") for i, g in enumerate(groups)])
        counts = np.sum([r[0] for r in res], axis=0) if res else np.zeros(k, np.int64)
        sums = np.sum([r[1] for r in res], axis=0) if res else np.zeros(k)
        n = int(counts.sum())
        cx = complexity(c64, counts, sums, p.neighbours)
        live = np.flatnonzero(counts > 0)
        prob = np.zeros(k)
        if len(live):
            z = cx[live] / p.temperature
            e = np.exp(z - z.max())
            prob[live] = e / e.sum()
        target = math.floor(p.keep_fraction * n)
        quota = quotas(prob, counts, target, lower_bounds(counts, target, p.cluster_balance, p.min_per_cluster))
        fs.save_npy(work / "quota.npy", quota)
        buckets = store.n_buckets(len(ctx.paths))
        removed = sum(ctx.map(_select, [(str(work / "assign"), b, str(work / "quota.npy"), p.keep, p.seed,
                                         str(work / "parts"), buckets) for b in range(cb)]))
        fs.remove(work / "assign")
        info = {"centroids": source, "n_clusters": k, "clusters_with_rows": len(live), "rows_with_embedding": n,
                "target": int(quota.sum()), "removed": int(removed),
                "decisions": store.compact_decisions(ctx, work / "parts", buckets)}
        log.info("%s: %d of %d rows kept in %d clusters (centroids: %s)", self.id, n - removed, n, len(live), source)
        return info

    def _centroids(self, ctx: Any, work: Any) -> tuple[str, str]:
        """(path of unit centroids, where they came from)."""
        p = self.params
        if p.centroids_path:
            fs.save_npy(work / "centroids.npy", vectors.normalise(fs.load_npy(p.centroids_path)))
            return str(work / "centroids.npy"), p.centroids_path
        shared = fs.as_path(ctx.work_dir).parent / p.clusters_from / "centroids.npy" if p.clusters_from else None
        if shared is not None and fs.exists(shared):
            return str(shared), f"stage {p.clusters_from}"
        return self._train(ctx, work), "trained here"

    def _train(self, ctx: Any, work: Any) -> str:
        """No clustering to share: spherical k-means (FAISS) on a sample of at most 256 rows per centroid."""
        p = self.params
        total = max(1, ctx.total_rows or 1)
        k = p.n_clusters or max(1, math.ceil(total / 2000))
        want = min(total, k * vectors.FAISS_MAX_POINTS)
        # a uid-hash sample (bounded: k * 256 rows), read by mapped tasks, kept in input order
        xs = [x for part in ctx.map(_sample, [(g, total, want) for g in store.file_groups(ctx.paths)]) for x in part]
        if not xs or sum(len(x) for x in xs) == 0:
            raise StageError(f"{self.id}: no row has an image_embedding (put clip_embed before it)")
        x = np.concatenate(xs).astype(np.float32)
        out = work / "centroids.npy"
        fs.save_npy(out, vectors.spherical_kmeans(x, min(k, len(x)), 20, p.seed))
        return str(out)

    def process(self, table: pa.Table) -> pa.Table:
        found = self.removed(table)
        if found is None:
            return table
        mask, _, detail = found
        return self.reject(table, pa.array(mask, pa.bool_()), "density_pruned", pa.array(detail, pa.string()))
