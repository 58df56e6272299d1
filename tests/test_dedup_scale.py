"""Dedup steps that scale out: partitioned pHash resolution (connected components), the exact
method's size limit, the blocked similarity search and SemDeDup reproduction.

Memory and speed are measured by bench/dedup.py and bench/dedup_scale.py, not asserted here.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import dedup_corpus as dc
from curate import registry
from curate import schema as S
from curate.context import FitContext
from curate.stage import StageError
from test_dedup import _unit, phash_reference


# -- connected components ----------------------------------------------------------------------
def _scipy_labels(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    _, lab = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    used = np.unique(np.r_[a[a != b], b[a != b]])
    smallest = {int(c): int(ids[used[lab[used] == c]].min()) for c in np.unique(lab[used])}
    return {int(ids[i]): smallest[int(lab[i])] for i in used}


def test_connected_components_match_scipy(tmp_path):
    from curate.dedup import components, store

    rng = np.random.default_rng(0)
    for trial in range(8):
        ids = np.unique(rng.integers(0, 2**64, int(rng.integers(20, 800)), dtype=np.uint64))
        n = len(ids)
        if trial % 2:  # one long chain in random order (many rounds), plus random edges
            perm = rng.permutation(n)
            a, b = np.r_[perm[:-1], rng.integers(0, n, 5)], np.r_[perm[1:], rng.integers(0, n, 5)]
        else:  # many small components, self-loops and repeated edges
            m = int(rng.integers(0, n))
            a, b = rng.integers(0, n, m), rng.integers(0, n, m)
            a, b = np.r_[a, a[:5], 3], np.r_[b, b[:5], 3]
        parts = int(rng.integers(1, 7))
        work = tmp_path / f"t{trial}"
        components.write_adjacency(ids[a], ids[b], work / "adj", parts, "x")
        stars = components.components(FitContext([], work, "local", 2), work / "adj", parts, work / "cc")
        got = {}
        for p in range(parts):
            nodes, comp = components.star_labels(store.partition_files(stars, p))
            got.update(zip(nodes.tolist(), comp.tolist()))
        assert got == _scipy_labels(ids, a, b), trial


# -- pHash: partitioned resolution -------------------------------------------------------------
def _chains(rng, n_chains: int, radius: int) -> list[int]:
    """Chains h0 ~ h1 ~ h2 ... (each step <= radius bits, ends farther apart): components whose
    keep-one result is not "one kept per component"."""
    out = []
    for _ in range(n_chains):
        h = int(rng.integers(0, 2**63)) * 2 + 1
        for _ in range(int(rng.integers(2, 7))):
            out.append(h)
            flip = rng.choice(64, int(rng.integers(radius - 2, radius + 1)), replace=False)
            h ^= sum(1 << int(f) for f in flip)
    return out


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_phash_partitioned_resolution_matches_reference(tmp_path, request, runner):
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    radius = 6
    rng = np.random.default_rng(42)
    hashes, uids = dc.planted_hashes(rng, 120, radius)
    chained = _chains(rng, 25, radius)
    hashes += chained + chained[:7]  # + exact repeats of some hashes
    uids += [f"c{rng.integers(0, 10**9):09d}-{i}" for i in range(len(chained) + 7)]
    n = len(hashes)
    t, width, reject = dc.phash_rows(rng, hashes, uids, 19)
    paths = dc.write_shards(t, tmp_path / "shards", 60)
    stage = registry.create({"stage": "dedup_phash", "radius": radius, "rows_per_partition": 50})  # many partitions
    ctx = FitContext(paths, tmp_path / "w", runner, 2, n)
    ctx.work_dir.mkdir(parents=True)
    stage.set_state(stage.fit(ctx))
    info = stage.describe()
    assert info["graph_partitions"] >= 4 and info["component_buckets"] >= 2 and info["hash_partitions"] >= 4, info
    got = {}
    for path in paths:
        out = stage.run_batch(pq.read_table(path))
        for r in out.filter(pc.equal(out[S.REJECT_STAGE], stage.id)).to_pylist():
            got[r[S.UID]] = (r[S.DUPLICATE_OF], r[S.REJECT_DETAIL])
    want = phash_reference(hashes, uids, width, reject, radius)
    assert len(want) > 80 and got == want


# -- semantic: exact method limit, blocked search, SemDeDup reproduction -----------------------
def test_semantic_exact_method_refuses_above_its_limit(tmp_path):
    rng = np.random.default_rng(3)
    _, t = dc.emb_table(rng, 60)
    paths = dc.write_shards(t, tmp_path / "shards", 50)
    with pytest.raises(StageError) as err:
        dc.fit_apply({"stage": "dedup_semantic", "method": "exact", "exact_max_rows": 100}, paths, tmp_path / "w")
    msg = str(err.value)
    assert "\n" not in msg and f"all {t.num_rows:,} embeddings" in msg and "exact_max_rows=100" in msg
    assert "method: kmeans" in msg
    # method auto switches to k-means instead
    dc.fit_apply({"stage": "dedup_semantic", "exact_max_rows": 100, "n_clusters": 3}, paths, tmp_path / "w2")


@pytest.mark.parametrize("bf16", [True, False])
def test_similar_pairs_are_the_float64_pairs(monkeypatch, bf16):
    from curate.dedup import vectors

    monkeypatch.setattr(vectors, "USE_BF16", bf16)
    monkeypatch.setattr(vectors, "_BLOCK", 64)  # several block pairs, incl. a ragged last block
    rng = np.random.default_rng(1)
    base = rng.standard_normal((150, 48))
    x = np.concatenate([base, base[:60] + rng.uniform(0.05, 0.4, (60, 1)) * rng.standard_normal((60, 48)),
                        base[:5]])  # cosines spread around the threshold, and exact copies
    x16 = x.astype(np.float16)
    u = _unit(x16)
    for thr in (0.9, 0.95, 0.99):
        i, j, s = vectors.similar_pairs(x16, thr)
        sims = u @ u.T
        wi, wj = np.nonzero(np.triu(sims > thr, 1))
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(wi.tolist(), wj.tolist())) and len(wi) > 20
        np.testing.assert_allclose(s, sims[i, j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bf16", [True, False])
def test_nearest_is_the_float64_nearest(monkeypatch, bf16):
    """Rows far from, near and very near (1e-7 relative: below float32's resolution) a tie
    between two centroids get the float64 argmax."""
    from curate.dedup import vectors

    monkeypatch.setattr(vectors, "USE_BF16", bf16)
    rng = np.random.default_rng(4)
    c = vectors.normalise(rng.standard_normal((40, 64)))
    x = [rng.standard_normal((300, 64))]
    for gap in (1e-2, 1e-4, 1e-7):
        a, b = rng.integers(0, 40, 200), rng.integers(0, 40, 200)
        x.append(3.0 * ((0.5 + gap) * c[a] + (0.5 - gap) * c[b]))  # raw rows, not unit
    x = np.concatenate(x).astype(np.float32)
    x64 = x.astype(np.float64)
    want = np.argmax(np.einsum("nd,kd->nk", x64, c), axis=1)
    assert np.array_equal(vectors.nearest(x, c), want)


def test_bf16_products_stay_within_the_margin():
    """The bound behind BF16_MARGIN, checked on the hardware path (skipped without AMX)."""
    import torch

    from curate.dedup import vectors

    if not vectors.native_bf16():
        pytest.skip("no native bf16 matrix unit on this CPU")
    rng = np.random.default_rng(0)
    for d in (64, 512, 2048):
        x = _unit(rng.standard_normal((300, d)))
        x[150:] = _unit(x[:150] + 0.05 * rng.standard_normal((150, d)))  # cosines near 1
        b = torch.from_numpy(x.astype(np.float32)).bfloat16()
        err = np.abs(torch.mm(b, b.T).double().numpy() - x @ x.T).max()
        assert err < 0.0123 < vectors.BF16_MARGIN, (d, err)


def test_kmeans_is_faiss_and_thread_independent():
    import faiss

    from curate.dedup import vectors

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    out = []
    for threads in ("1", "2"):
        import os

        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = threads
        try:
            out.append(vectors.spherical_kmeans(x, 20, 10, 1234))
        finally:
            os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    assert np.array_equal(out[0], out[1])
    km = faiss.Kmeans(32, 20, niter=10, seed=1234, spherical=True)
    km.train(x)
    np.testing.assert_allclose(out[0], vectors.normalise(km.centroids), atol=1e-6)


def test_faiss_training_rows_are_faiss_own_subsample():
    """Training on the rows faiss_training_rows picks gives the centroids FAISS computes when it
    subsamples the whole array itself (beyond 256 rows per centroid)."""
    import faiss

    from curate.dedup import vectors

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    k, seed = 5, 77
    whole = faiss.Kmeans(16, k, niter=8, seed=seed, spherical=True)
    whole.train(x)
    rows = vectors.faiss_training_rows(len(x), k, seed)
    assert len(rows) == k * vectors.FAISS_MAX_POINTS and vectors.faiss_training_rows(1000, k, seed) is None
    np.testing.assert_array_equal(vectors.spherical_kmeans(x[rows], k, 8, seed), vectors.normalise(whole.centroids))


def _semdedup_reference(x32: np.ndarray, k: int, niter: int, seed: int, eps: float) -> set[int]:
    """SemDeDup's pipeline (clustering.py, sort_clusters.py, semdedup.py) on a float32 array."""
    import faiss
    import torch

    kmeans = faiss.Kmeans(x32.shape[1], k, niter=niter, seed=seed, spherical=True)
    kmeans.train(x32)
    dist, near = kmeans.index.search(x32, 1)
    removed = set()
    for c in range(k):
        items = np.flatnonzero(near[:, 0] == c)
        order = sorted(zip(items.tolist(), (1 - dist[items, 0]).tolist()), key=lambda r: r[1], reverse=True)
        ids = np.array([i for i, _ in order], np.int64)
        if len(ids) < 2:
            continue
        reps = torch.tensor(x32[ids])
        sim = reps @ reps.T
        sim.fill_diagonal_(0.0)
        m = torch.max(torch.triu(sim, diagonal=1), dim=0)[0].numpy()
        removed |= set(ids[m > 1 - eps].tolist())
    return removed


def test_semdedup_mode_reproduces_semdedup_pipeline_with_full_sample(tmp_path):
    """mode semdedup, same k / niter / seed, every row in the k-means sample: the decisions are
    those of SemDeDup's own pipeline (same FAISS k-means, same per-cluster rule)."""
    rng = np.random.default_rng(9)
    e, t = dc.emb_table(rng, 400)  # 805 rows: FAISS subsamples 256 per centroid for k = 3
    paths = dc.write_shards(t, tmp_path / "shards", 200)
    k, niter, seed = 3, 15, 1234
    got = dc.fit_apply({"stage": "dedup_semantic", "mode": "semdedup", "eps": 0.05, "n_clusters": k,
                        "kmeans_iterations": niter, "seed": seed, "kmeans_sample_per_centroid": 10**6,
                        "kmeans_max_sample": 10**6}, paths, tmp_path / "w")
    want = _semdedup_reference(e.astype(np.float32), k, niter, seed, 0.05)
    uids = t["uid"].to_pylist()
    assert {uids.index(u) for u in got} == want and len(want) > 100
