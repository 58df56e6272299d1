"""Dedup stages: phash, dedup_exact, dedup_phash, dedup_semantic (keep_one and semdedup modes).

Stages are checked against small independent reference implementations, on parquet shards
written here (embedding columns included, as clip_embed would write them).  Runner/layout
independence and the demo corpus: tests/test_dedup_runs.py.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pytest

import dedup_corpus as dc
from curate import registry
from curate import schema as S
from curate.stage import StageError


# -- helpers ---------------------------------------------------------------------------------
def ref_keep_one(rank: list[int], near: dict[tuple[int, int], float]) -> dict[int, int]:
    """Sequential best-first reference: removed row -> target."""
    kept, out = [], {}
    for v in sorted(range(len(rank)), key=lambda i: rank[i]):
        cands = [(near[min(u, v), max(u, v)], -rank[u], u) for u in kept if (min(u, v), max(u, v)) in near]
        if cands:
            out[v] = max(cands)[2]
        else:
            kept.append(v)
    return out


def order_rank(metric: list, uids: list[str]) -> list[int]:
    order = sorted(range(len(uids)), key=lambda i: (metric[i] is None, -(metric[i] or 0), uids[i]))
    r = [0] * len(uids)
    for pos, i in enumerate(order):
        r[i] = pos
    return r


def phash_reference(hashes: list[int], uids: list[str], width, reject: list, radius: int) -> dict:
    """dedup_phash by brute force (keep rule largest_image with height 10): uid -> (duplicate_of, detail)."""
    n = len(hashes)
    # identical hashes collapse onto their best row, then best-first over distinct hashes
    active = [i for i in range(n) if reject[i] is None]
    rank = order_rank([float(width[i]) * 10 for i in active], [uids[i] for i in active])
    best: dict[int, int] = {}
    for pos, i in sorted(zip(rank, active)):
        best.setdefault(hashes[i], i)
    vals = sorted(best)
    vrank = [rank[active.index(best[h])] for h in vals]
    near = {(x, y): -bin(vals[x] ^ vals[y]).count("1") for x, y in itertools.combinations(range(len(vals)), 2)
            if bin(vals[x] ^ vals[y]).count("1") <= radius}
    vt = ref_keep_one(vrank, near)
    want = {}
    for i in active:
        x = vals.index(hashes[i])
        if best[hashes[i]] != i or x in vt:
            tgt = best[vals[vt[x]]] if x in vt else best[hashes[i]]
            want[uids[i]] = (uids[tgt], f"phash distance {bin(hashes[i] ^ hashes[tgt]).count('1')} to {uids[tgt]}")
    return want


def jpeg(seed: int, size=(64, 48), q: int = 90) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return buf.getvalue()


# -- phash -------------------------------------------------------------------------------------
def test_phash_column_is_imagehash_phash():
    import imagehash
    from PIL import Image

    imgs = [jpeg(1), jpeg(2, (100, 30)), b"\xff\xd8\xffnot really a jpeg", None]
    out = registry.create({"stage": "phash"})(dc.table_of(uid=["a", "b", "c", "d"], image=imgs)).table
    assert out.schema.field(S.PHASH).type == pa.uint64()
    got = out[S.PHASH].to_pylist()
    for data, h in zip(imgs[:2], got):
        assert h == int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)
    assert got[2] is None and got[3] is None
    assert out[S.REJECT_REASON].null_count == 4


# -- exact -------------------------------------------------------------------------------------
def test_exact_keep_rules_and_keys(tmp_path):
    a, b = "sha-a", "sha-b"
    t = dc.table_of(uid=["u5", "u1", "u3", "u4", "u2", "u6"], image_sha256=[a, a, a, b, b, None],
                 url=["http://x.org/1", "HTTPS://WWW.X.org:443/1/#frag", "http://x.org/2", " http://x.org/1/ ",
                      "http://y.org/1", "http://x.org/1?a=1"],
                 caption=["A  cat", "a cat", "a Cat ", "dog", "a cat", "a cat"],
                 clip_score=pa.array([0.5, None, 0.5, 0.1, 0.9, 0.9], pa.float32()),
                 width=pa.array([10, 50, 10, 10, 10, 99], pa.int32()), height=pa.array([10] * 6, pa.int32()))

    def dups(**params):
        r = registry.create({"stage": "dedup_exact", **params})(t)
        return {u: d for u, d in zip(r.table[S.UID].to_pylist(), r.table[S.DUPLICATE_OF].to_pylist()) if d}

    # clip_score: u3 and u5 tie at 0.5 -> smaller uid u3; u1 (null) is last
    assert dups(keep="clip_score") == {"u5": "u3", "u1": "u3", "u4": "u2"}
    assert dups(keep="largest_image") == {"u5": "u1", "u3": "u1", "u4": "u2"}
    assert dups(keep="smallest_uid") == {"u5": "u1", "u3": "u1", "u4": "u2"}
    # normalised urls: scheme, case of host, www., default port, fragment and trailing / do not matter
    assert dups(key=["url"], keep="smallest_uid") == {"u4": "u1", "u5": "u1"}
    # (caption, image): u1/u3/u5 share an image and a normalised caption; u4/u2 captions differ
    assert dups(key=["caption", "image"], keep="smallest_uid") == {"u3": "u1", "u5": "u1"}
    r = registry.create({"stage": "dedup_exact"})(t)
    assert r.rejected.num_rows == 3 and set(r.rejected[S.DUPLICATE_KIND].to_pylist()) == {"exact"}
    assert r.rejected[S.REJECT_DETAIL].to_pylist()[0].startswith("same image bytes as u")


def test_keep_rule_sql_and_pyarrow_orders_agree():
    from curate.dedup import store
    from curate.dedup.base import metric_array, metric_sql, rank

    rng = np.random.default_rng(3)
    n = 300
    t = dc.table_of(uid=[f"u{rng.integers(0, 10**6):07d}" for _ in range(n)],
                 clip_score=pa.array([None if x < 0.1 else round(x, 1) for x in rng.random(n)], pa.float32()),
                 original_width=pa.array([None if x < 5 else int(x) for x in rng.integers(0, 20, n)], pa.int32()),
                 original_height=pa.array(rng.integers(1, 4, n).astype(np.int32)),
                 width=pa.array(rng.integers(1, 20, n).astype(np.int32)),
                 height=pa.array(rng.integers(1, 4, n).astype(np.int32)))
    con = store.duckdb_connect("/tmp")
    con.register("t", t)
    for keep in ("clip_score", "largest_image", "smallest_uid"):
        sql = store.arrow(con.sql(f"SELECT uid FROM (SELECT uid, {metric_sql(keep, t.column_names)} AS _m FROM t) "
                                  "ORDER BY _m DESC NULLS LAST, uid"))["uid"].to_pylist()
        r = rank(metric_array(t, keep), t["uid"])
        assert [t["uid"][int(i)].as_py() for i in np.argsort(r)] == sql, keep


def test_missing_columns_fail_with_a_clear_message(tmp_path):
    t = dc.table_of(uid=["a", "b"])
    with pytest.raises(StageError, match="image_embedding.*clip_embed"):
        registry.create({"stage": "dedup_semantic"})(t)
    with pytest.raises(StageError, match="phash"):
        registry.create({"stage": "dedup_phash"})(t)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        registry.create({"stage": "dedup_semantic", "threshold": 0.9, "eps": 0.1})
    with pytest.raises(ValidationError):
        registry.create({"stage": "dedup_semantic", "mode": "semdedup", "method": "exact"})


# -- greedy rule -------------------------------------------------------------------------------
def test_keep_one_rule_matches_sequential_reference():
    from curate.dedup.greedy import keep_one

    # a chain A~B~C, A !~ C: best-first keeps A and C, removes B (connected components would drop C)
    removed, target, _ = keep_one(np.array([0, 1, 2]), np.array([0, 1]), np.array([1, 2]), np.array([0.9, 0.9]))
    assert removed.tolist() == [False, True, False] and target[1] == 0
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 120))
        m = int(rng.integers(0, 3 * n))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        near = {}
        for x, y in zip(a, b):
            if x != y:
                near[min(x, y), max(x, y)] = float(rng.integers(0, 5))  # ties in similarity on purpose
        keys = list(near)
        rank = rng.permutation(n)
        ea = np.array([k[0] for k in keys], np.int64)
        eb = np.array([k[1] for k in keys], np.int64)
        removed, target, _ = keep_one(rank, ea, eb, np.array([near[k] for k in keys]))
        ref = ref_keep_one(list(rank), near)
        assert {int(i): int(target[i]) for i in np.flatnonzero(removed)} == ref, trial


# -- pHash near-duplicates ---------------------------------------------------------------------
@pytest.mark.parametrize("radius", [3, 7, 11])
def test_multi_index_hashing_finds_every_pair_exactly_once(radius):
    from curate.dedup import mih

    rng = np.random.default_rng(radius)
    hashes, _ = dc.planted_hashes(rng, 400, radius)
    v = np.unique(np.array(hashes, np.uint64))
    k, idx = mih.keys(v, radius)
    part = mih.partition_of(k, 3)
    got = []
    for p in range(3):
        m = part == p
        a, b, d = mih.pairs(k[m], v[idx[m]], radius)
        got += [(min(x, y), max(x, y), int(dd)) for x, y, dd in zip(idx[m][a], idx[m][b], d)]
    dist = np.bitwise_count(v[:, None] ^ v[None, :])
    want = [(int(x), int(y), int(dist[x, y])) for x, y in zip(*np.nonzero(np.triu(dist <= radius, 1)))]
    assert len(want) > 100 and sorted(got) == sorted(want)  # each pair once, none missing, none farther


@pytest.mark.parametrize("radius,keys_per_partition", [(6, 20_000), (9, 20_000), (6, None)])
def test_phash_dedup_matches_bruteforce_reference(tmp_path, monkeypatch, radius, keys_per_partition):
    from curate.stages import dedup_phash

    if keys_per_partition:  # several MIH key partitions (None: one, keys made where they are used)
        monkeypatch.setattr(dedup_phash, "KEYS_PER_PARTITION", keys_per_partition)
    rng = np.random.default_rng(radius)
    hashes, uids = dc.planted_hashes(rng, 250, radius)
    t, width, reject = dc.phash_rows(rng, hashes, uids, 17)
    paths = dc.write_shards(t, tmp_path / "shards", 97)
    got = dc.fit_apply({"stage": "dedup_phash", "radius": radius, "rows_per_partition": 150}, paths, tmp_path / "w")
    want = phash_reference(hashes, uids, width, reject, radius)
    assert len(want) > 50
    assert got == want


# -- semantic ----------------------------------------------------------------------------------
def _unit(e: np.ndarray) -> np.ndarray:
    x = e.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_keep_one(x: np.ndarray, uids: list[str], score: list, thr: float, groups=None) -> dict:
    n = len(uids)
    groups = np.zeros(n, int) if groups is None else groups
    sims = x @ x.T
    near = {(i, j): sims[i, j] for i in range(n) for j in range(i + 1, n) if sims[i, j] > thr and
            groups[i] == groups[j]}
    return {uids[v]: uids[u] for v, u in ref_keep_one(order_rank(score, uids), near).items()}


@pytest.mark.parametrize("block,bf16", [(512, True), (40, True), (40, False)])  # 40: many block pairs
def test_semantic_exact_and_kmeans_match_reference(tmp_path, monkeypatch, block, bf16):
    from curate.dedup import vectors

    monkeypatch.setattr(vectors, "_BLOCK", block)
    monkeypatch.setattr(vectors, "USE_BF16", bf16)  # bf16 is used only where the CPU has AMX
    rng = np.random.default_rng(7)
    e, t = dc.emb_table(rng)
    paths = dc.write_shards(t, tmp_path / "shards", 64)
    uids, score, x = t["uid"].to_pylist(), t["clip_score"].to_pylist(), _unit(e)
    from curate.stages import dedup_semantic

    with monkeypatch.context() as m:  # the row count is known and small: read directly, no scan
        m.setattr(dedup_semantic, "_scan", None)
        got = dc.fit_apply({"stage": "dedup_semantic", "method": "exact"}, paths, tmp_path / "exact")
    want = _ref_keep_one(x, uids, score, 0.95)
    assert {u: d for u, (d, _) in got.items()} == want and len(want) > 40
    u, (d, detail) = next(iter(got.items()))
    assert detail == f"cosine {float(x[uids.index(u)] @ x[uids.index(d)]):.4f} with {d}"
    # the same decisions when the rows are first counted by the scan (compact copy) instead of read directly
    assert dc.fit_apply({"stage": "dedup_semantic", "method": "exact"}, paths, tmp_path / "scan",
                        count_rows=False) == got
    # k-means: the same rule inside each cluster of the trained centroids
    work = tmp_path / "km"
    got = dc.fit_apply({"stage": "dedup_semantic", "method": "kmeans", "n_clusters": 4}, paths, work)
    c = np.load(work / "centroids.npy")
    want = _ref_keep_one(x, uids, score, 0.95, groups=np.argmax(x @ c.T, axis=1))
    assert {u: d for u, (d, _) in got.items()} == want


def _ref_semdedup(e: np.ndarray, c: np.ndarray, uids: list[str], eps: float) -> dict:
    """SemDeDup as its code does it (in float64): per cluster, farthest from the centroid first by
    ``1 - embedding . centroid`` (the embedding as stored), pairs by cosine."""
    x, raw = _unit(e), e.astype(np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    label = np.argmax(x @ c.T, axis=1)
    out = {}
    for k in range(len(c)):
        idx = np.flatnonzero(label == k)
        dist = 1 - raw[idx] @ c[k]
        idx = idx[np.lexsort((idx, -dist))]  # farthest first, ties by input order
        sim = np.triu(x[idx] @ x[idx].T, 1)
        best, arg = sim.max(axis=0), sim.argmax(axis=0)
        for j in np.flatnonzero(best > 1 - eps):
            out[uids[idx[j]]] = uids[idx[arg[j]]]
    return out


def test_semdedup_mode_reproduces_the_paper_rule_with_given_centroids(tmp_path):
    rng = np.random.default_rng(11)
    e, t = dc.emb_table(rng)
    cpath = tmp_path / "centroids.npy"
    np.save(cpath, rng.standard_normal((5, e.shape[1])))
    paths = dc.write_shards(t, tmp_path / "shards", 50)
    got = dc.fit_apply({"stage": "dedup_semantic", "mode": "semdedup", "eps": 0.05, "centroids_path": str(cpath)},
                    paths, tmp_path / "w")
    want = _ref_semdedup(e, np.load(cpath), t["uid"].to_pylist(), 0.05)
    assert {u: d for u, (d, _) in got.items()} == want and len(want) > 40




def test_degenerate_inputs():
    """No candidate rows at all, rows without hashes/embeddings, and already-rejected rows."""
    emb = pa.array([[1.0, 0.0], None, [1.0, 0.0]], pa.list_(pa.float16()))
    t = dc.table_of(uid=["a", "b", "c"], phash=pa.array([None, None, None], pa.uint64()), image_embedding=emb,
                 image_sha256=["x", "x", "x"], width=pa.array([1, 1, 1], pa.int32()),
                 height=pa.array([1, 1, 1], pa.int32()), clip_score=pa.array([0.1, 0.9, 0.5], pa.float32()),
                 reject_reason=pa.array([None, None, "download_failed"]))
    for params in ({"stage": "dedup_phash"}, {"stage": "dedup_exact"}, {"stage": "dedup_semantic"},
                   {"stage": "dedup_semantic", "mode": "semdedup"}):
        out = registry.create(params)(t).table
        assert out[S.REJECT_REASON].to_pylist()[2] == "download_failed"  # untouched
        if params["stage"] == "dedup_exact":
            assert out[S.DUPLICATE_OF].to_pylist() == [None, "a", None]  # "c" was rejected before
        else:
            assert out[S.DUPLICATE_OF].null_count == 3, params
    one = t.slice(0, 1)
    for params in ({"stage": "dedup_phash"}, {"stage": "dedup_semantic", "mode": "semdedup"}):
        assert registry.create(params)(one).rejected.num_rows == 0
