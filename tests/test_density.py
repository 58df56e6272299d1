"""density_prune against an independent numpy implementation of Abbas et al.'s rule, and on both runners
sharing semantic dedup's k-means clusters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import curate
from curate import schema as S
from curate.context import FitContext
from curate.table_ops import prepare_for_stages

SIZES = [5, 30, 60, 100, 8, 40, 25]
SPREAD = [0.05, 0.3, 0.1, 0.5, 0.2, 0.15, 0.4]


def _corpus(seed: int = 0, d: int = 16) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(SIZES), d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = [c + s * rng.normal(size=(n, d)) for c, n, s in zip(centers, SIZES, SPREAD)]
    x = np.concatenate(rows).astype(np.float16)
    uids = [f"u{i:04d}" for i in rng.permutation(len(x))]
    t = prepare_for_stages(pa.table({S.UID: uids, S.IMAGE_EMBEDDING: pa.array(list(x), pa.list_(pa.float16()))}))
    return t, centers


def _reference(t: pa.Table, centers: np.ndarray, keep_fraction: float, tau: float = 0.5, m: int = 20,
               keep: str = "hard") -> set[str]:
    """The rule written out plainly: assignment, complexities, softmax, capped redistribution, rounding."""
    x = np.array(t[S.IMAGE_EMBEDDING].to_pylist(), dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    sim = x @ c.T
    lab = sim.argmax(1)
    dist = 1 - sim[np.arange(len(x)), lab]
    k = len(c)
    n = np.bincount(lab, minlength=k).astype(float)
    intra = np.array([dist[lab == j].mean() for j in range(k)])
    cc = c @ c.T
    inter = np.array([np.mean(sorted(1 - np.delete(cc[j], j))[:min(m, k - 1)]) for j in range(k)])
    cx = inter * intra
    p = np.exp(cx / tau) / np.exp(cx / tau).sum()
    target = int(np.floor(keep_fraction * len(x)))
    q = p * target
    fixed = np.zeros(k, bool)
    while True:  # cap at the cluster size, hand the excess to the others in proportion to p
        over = (q > n) & ~fixed
        if not over.any():
            break
        excess = (q[over] - n[over]).sum()
        q[over] = n[over]
        fixed |= over
        q[~fixed] += excess * p[~fixed] / p[~fixed].sum()
    out = np.floor(q + 1e-9).astype(int)
    for j in sorted(range(k), key=lambda j: (-(q[j] - out[j]) if out[j] < n[j] else 1, j))[:target - out.sum()]:
        out[j] += 1
    uids = np.array(t[S.UID].to_pylist())
    kept = set()
    for j in range(k):
        idx = np.flatnonzero(lab == j)
        sign = -1 if keep == "hard" else 1
        order = sorted(idx, key=lambda i: (sign * dist[i], uids[i]))
        kept |= set(uids[order[:out[j]]])
    return kept


def _run(t: pa.Table, **params) -> pa.Table:
    stage = curate.create_stage("density_prune", **params)
    stage.set_state(stage.fit(FitContext.from_table(t)))
    return stage(t).table


@pytest.mark.parametrize("keep_fraction,keep", [(0.5, "hard"), (0.3, "easy"), (0.9, "hard")])
def test_kept_set_equals_a_numpy_implementation(tmp_path, keep_fraction, keep):
    t, centers = _corpus()
    np.save(tmp_path / "c.npy", centers)
    out = _run(t, keep_fraction=keep_fraction, keep=keep, centroids_path=str(tmp_path / "c.npy"))
    kept = set(out.filter(pc.is_null(out[S.REJECT_REASON]))[S.UID].to_pylist())
    assert kept == _reference(t, centers, keep_fraction, keep=keep)
    assert len(kept) == int(np.floor(keep_fraction * t.num_rows))
    gone = out.filter(pc.is_valid(out[S.REJECT_REASON]))
    assert set(gone[S.REJECT_REASON].to_pylist()) == {"density_pruned"}
    assert all(d.startswith("cluster ") for d in gone[S.REJECT_DETAIL].to_pylist())


def test_the_quota_is_capped_by_cluster_size_and_floored(tmp_path):
    from curate.stages.density_prune import quotas

    p = np.array([0.7, 0.2, 0.05, 0.05])
    sizes = np.array([10, 100, 50, 3])
    q = quotas(p, sizes, 60, 0)
    assert q.sum() == 60 and q[0] == 10 and (q <= sizes).all()
    q = quotas(p, sizes, 60, 5)
    assert q.sum() == 60 and q[3] == 3 and q[2] >= 5 and (q <= sizes).all()
    t, centers = _corpus(1)
    np.save(tmp_path / "c.npy", centers)
    out = _run(t, keep_fraction=0.2, min_per_cluster=4, centroids_path=str(tmp_path / "c.npy"))
    x = np.array(out[S.IMAGE_EMBEDDING].to_pylist(), dtype=np.float64)
    lab = (x @ centers.T).argmax(1)
    live = pc.is_null(out[S.REJECT_REASON]).to_numpy(zero_copy_only=False)
    per = np.bincount(lab[live], minlength=len(SIZES))
    assert (per >= np.minimum(4, np.bincount(lab, minlength=len(SIZES)))).all()
    assert live.sum() == int(0.2 * t.num_rows)


def test_random_keep_is_seeded(tmp_path):
    t, centers = _corpus(2)
    np.save(tmp_path / "c.npy", centers)
    a, b, c = (_run(t, keep_fraction=0.5, keep="random", seed=s, centroids_path=str(tmp_path / "c.npy"))
               for s in (1, 1, 2))
    assert a[S.REJECT_REASON].equals(b[S.REJECT_REASON]) and not a[S.REJECT_REASON].equals(c[S.REJECT_REASON])


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed % 5)  # 5 kinds of picture: the embeddings form clusters
    base = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    noise = np.random.default_rng(seed).integers(-20, 20, (48, 64, 3))
    im = Image.fromarray(np.clip(np.kron(base, np.ones((8, 8, 1))).astype(int) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.mark.ray
def test_on_both_runners_with_semantic_dedup_clusters(ray_cluster, tmp_path):
    """clip_embed -> dedup_semantic (k-means) -> density_prune on its centroids: local == Ray, and the
    clustering is not trained twice."""
    import pyarrow.parquet as pq
    from helpers import read_dir, rows_by_uid

    n = 60
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": [f"picture {i} of a thing" for i in range(n)],
                             "jpg": [_jpeg(i) for i in range(n)]}), tmp_path / "in.parquet")
    outs = {}
    for runner in ("local", "ray"):
        outs[runner] = curate.run({
            "input": {"path": str(tmp_path / "in.parquet"), "image_col": "jpg", "shard_size": 20},
            "output": {"path": str(tmp_path / runner)},
            "runner": {"kind": runner, "num_cpus": 2},
            "stages": [{"stage": "clip_embed"},
                       {"stage": "dedup_semantic", "method": "kmeans", "n_clusters": 5, "threshold": 0.99999},
                       {"stage": "density_prune", "keep_fraction": 0.5}],
        })
    a, b = (read_dir(outs[r].output / "data") for r in ("local", "ray"))
    assert rows_by_uid(a) == rows_by_uid(b)
    assert rows_by_uid(read_dir(outs["local"].output / "rejected")) == rows_by_uid(read_dir(outs["ray"].output /
                                                                                          "rejected"))
    st = {s["id"]: s for s in outs["local"].stats["stages"]}
    info = st["density_prune"]["info"]
    assert info["centroids"] == "stage dedup_semantic" and info["n_clusters"] == 5
    reaching = st["density_prune"]["rows_in"]
    assert st["density_prune"]["rows_out"] == reaching // 2
    assert st["density_prune"]["rejected"] == {"density_pruned": reaching - reaching // 2}


def test_without_clusters_to_share_it_trains_its_own_on_a_sample():
    t, _ = _corpus(3)
    stage = curate.create_stage("density_prune", keep_fraction=0.4, n_clusters=4, clusters_from=None)
    stage.set_state(stage.fit(FitContext.from_table(t)))
    out = stage(t).table
    assert stage.state["centroids"] == "trained here" and stage.state["n_clusters"] == 4
    assert pc.sum(pc.is_null(out[S.REJECT_REASON])).as_py() == int(0.4 * t.num_rows)
