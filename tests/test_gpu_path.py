"""The GPU path, checked on the CPU through the same code: tensor JPEG decoding (clip_embed decode: gpu)
against the PIL path, hostile rows, FAISS's GPU branch (k-NN pair search, centroid search, k-means) against
the CPU branch, and bench/gpu.py --small."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from curate import schema as S

REPO = Path(__file__).resolve().parents[1]
#: measured on the photos below (docs/CONTRACT.md): preprocessed pixels differ by at most 2 grey levels
#: (0.2 % of values differ at all), embeddings of random-init curate-ViT-T-32 / ViT-B-32 by <= 1.3e-4
#: (min cosine 0.9999999); asserted with margin
PIXEL_TOL, EMB_ABS_TOL, EMB_MIN_COS = 3, 1e-3, 0.9999


def _jpeg(im, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Real photographs (scikit-image's bundled files) at several sizes, qualities, one grayscale."""
    from PIL import Image

    from curate.demo.corpus import _load_photos

    out = []
    for k, im in enumerate(_load_photos().values()):
        im = im.convert("RGB")
        for side in (256, 301, 480):
            w, h = im.size
            s = side / min(w, h)
            r = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
            out.append(_jpeg(r, 90 if side != 301 else 70))
        if k == 0:
            out.append(_jpeg(im.convert("L").resize((320, 256))))
    return out


@pytest.fixture(scope="module")
def clip():
    from curate.clip_model import load_clip

    return load_clip("curate-ViT-T-32", None, torch.device("cpu"))


def test_tensor_transform_mirrors_pil_pixels(clip, photos):
    from PIL import Image

    from curate.gpu_decode import TensorDecoder, jpeg_size, tensor_transform

    tf = tensor_transform(clip.pil_part, clip.image_size)
    assert tf is not None and tf.crop == (224, 224) and tf.antialias
    sizes = [jpeg_size(b, 1 << 30) for b in photos]
    got = TensorDecoder(tf, torch.device("cpu"))(photos, sizes)
    ref = [np.asarray(clip.pil_part(Image.open(io.BytesIO(b))).convert("RGB")).astype(int) for b in photos]
    diff = [np.abs(r - g.permute(1, 2, 0).numpy().astype(int)) for r, g in zip(ref, got)]
    assert max(d.max() for d in diff) <= PIXEL_TOL
    # the check can fail: another interpolation than the model's gives visibly different pixels
    from dataclasses import replace

    from torchvision.transforms import InterpolationMode

    wrong = TensorDecoder(replace(tf, interpolation=InterpolationMode.NEAREST), torch.device("cpu"))(photos, sizes)
    assert max(np.abs(r - g.permute(1, 2, 0).numpy().astype(int)).max() for r, g in zip(ref, wrong)) > 3 * PIXEL_TOL


def test_tensor_path_embeddings_match_pil(clip, photos):
    from curate.clip_embedder import ClipEmbedder

    caps = ["a photo"] * len(photos)
    dev = torch.device("cpu")
    cpu = ClipEmbedder(clip, dev, decode="cpu", batch_size=16).embed(photos, caps)
    emb = ClipEmbedder(clip, dev, decode="gpu", batch_size=16)
    gpu = emb.embed(photos, caps)
    assert emb.counts["tensor"] == len(photos) and not emb.counts["cpu"] and not emb.counts["fallback"]
    a, b = cpu.image.astype(np.float32), gpu.image.astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.abs(a - b).max() <= EMB_ABS_TOL and cos.min() >= EMB_MIN_COS
    np.testing.assert_array_equal(cpu.text, gpu.text)


def _lying_jpeg(data: bytes, h: int, w: int) -> bytes:
    """The JPEG with its SOF0 header claiming h x w pixels (the data stays as it was)."""
    i = data.index(b"\xff\xc0")
    b = bytearray(data)
    b[i + 5:i + 7], b[i + 7:i + 9] = h.to_bytes(2, "big"), w.to_bytes(2, "big")
    return bytes(b)


def test_hostile_rows_fall_back_per_row(photos, caplog):
    """PNG, WebP, CMYK JPEG, a header claiming 30000 x 30000, missing bytes: CPU path.  A zeroed stretch of
    the body and a header claiming more pixels than the data holds decode on the device (libjpeg warns and
    fills, as PIL does: same embeddings); a truncated file fails on the device, alone, and the CPU path
    decides (decode_failed).  The good rows of the same batch are not affected."""
    from PIL import Image

    import curate
    from curate.table_ops import prepare_for_stages

    im = Image.open(io.BytesIO(photos[0])).convert("RGB")
    png, webp = io.BytesIO(), io.BytesIO()
    im.save(png, "PNG")
    im.save(webp, "WEBP")
    corrupt = bytearray(photos[1])
    corrupt[700:4000] = bytes(3300)
    good = photos[2:6]
    rows = {"png": png.getvalue(), "webp": webp.getvalue(), "cmyk": _jpeg(im.convert("CMYK")),
            "bomb": _lying_jpeg(photos[0], 30000, 30000), "none": None, "corrupt": bytes(corrupt),
            "truncated": photos[1][: len(photos[1]) // 2], "lying": _lying_jpeg(photos[0], 2000, 2000)}
    images = good[:2] + list(rows.values()) + good[2:]
    names = ["g0", "g1", *rows, "g2", "g3"]
    table = prepare_for_stages(pa.table({S.UID: names, S.URL: [""] * len(names), S.CAPTION: ["x"] * len(names),
                                         S.IMAGE: pa.array(images, pa.binary())}))
    with caplog.at_level(logging.WARNING, logger="curate.stages.clip_embed"):
        stage = curate.create_stage("clip_embed", device="cpu", decode="gpu", batch_size=8)
        out = stage(table).table
    assert "the tensor decode path runs there" in caplog.text
    reason = dict(zip(out[S.UID].to_pylist(), out[S.REJECT_REASON].to_pylist()))
    failed = {"bomb", "none", "truncated"}
    assert {u for u, r in reason.items() if r} == failed and {reason[u] for u in failed} == {"decode_failed"}
    assert stage.decode_counts == {"tensor": 6, "cpu": 5, "fallback": 1}
    ref = curate.create_stage("clip_embed", device="cpu", decode="cpu", batch_size=8)(table).table
    assert ref[S.REJECT_REASON].to_pylist() == out[S.REJECT_REASON].to_pylist()
    ok = [i for i, n in enumerate(names) if n not in failed]
    a = np.array([ref[S.IMAGE_EMBEDDING][i].as_py() for i in ok], np.float32)
    b = np.array([out[S.IMAGE_EMBEDDING][i].as_py() for i in ok], np.float32)
    assert np.abs(a - b).max() <= EMB_ABS_TOL
    alone = curate.create_stage("clip_embed", device="cpu", decode="gpu", batch_size=8)(table.take([0, 1, 10, 11]))
    emb = np.array(out[S.IMAGE_EMBEDDING].to_pylist(), dtype=object)
    np.testing.assert_array_equal(np.array(list(emb[[0, 1, 10, 11]])), np.array(alone.table[S.IMAGE_EMBEDDING].to_pylist()))


def test_decode_option_is_validated_and_auto_means_cpu_here():
    import curate
    from curate.config import Config

    with pytest.raises(Exception, match="decode"):
        Config.model_validate({"input": {"path": "x.parquet"}, "output": {"path": "o"},
                               "stages": [{"stage": "clip_embed", "decode": "nvjpeg"}]})
    stage = curate.create_stage("clip_embed", device="cpu")
    stage.ensure_setup()
    assert stage._embedder.decode == "cpu" and stage.describe()["decode"] == "auto"
    stage.ensure_teardown()


# -- FAISS: the GPU branch, run on CPU FAISS indexes, gives the CPU branch's results ------------------
def _clustered(n: int, d: int, seed: int, dup_groups: int = 3, group: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 300), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d))
    for g in range(dup_groups):  # groups of near-copies: k must grow past 64 in the k-NN pair search
        lo = g * 1000
        x[lo:lo + group] = x[lo] + 0.01 * rng.standard_normal((group, d))
    return x.astype(np.float32)


def test_faiss_gpu_branch_falls_back_with_a_log_line_and_matches_cpu(caplog, monkeypatch):
    from curate.dedup import vectors

    if vectors.gpu_available():
        pytest.skip("FAISS sees a GPU: see test_faiss_on_gpu_matches_cpu")
    vectors._warned.clear()
    x = _clustered(3000, 32, 0)
    with caplog.at_level(logging.WARNING, logger="curate.dedup.vectors"):
        c_gpu = vectors.spherical_kmeans(x, 10, 8, 1234, "cuda")
        i_g, j_g, s_g = vectors.similar_pairs(x, 0.95, "cuda")
    assert "FAISS k-means: device cuda but FAISS sees no GPU" in caplog.text
    assert "FAISS k-NN search: device cuda but FAISS sees no GPU" in caplog.text
    np.testing.assert_array_equal(c_gpu, vectors.spherical_kmeans(x, 10, 8, 1234, "cpu"))
    i_c, j_c, s_c = vectors.similar_pairs(x, 0.95, "cpu")
    assert len(i_c) > 3 * 120 * 119 // 2  # the planted groups at least
    key = lambda i, j: np.sort(i * len(x) + j)  # noqa: E731
    np.testing.assert_array_equal(key(i_g, j_g), key(i_c, j_c))
    np.testing.assert_array_equal(np.sort(s_g), np.sort(s_c))
    np.testing.assert_array_equal(vectors.nearest(x, c_gpu, "cuda"), vectors.nearest(x, c_gpu, "cpu"))
    # rows beyond the k-NN limit go through the range search
    monkeypatch.setattr(vectors, "_GPU_MAX_K", 100)
    i_r, j_r, _ = vectors.similar_pairs(x, 0.95, "cuda")
    np.testing.assert_array_equal(key(i_r, j_r), key(i_c, j_c))


def _without_faiss(monkeypatch) -> None:
    """This process as on a machine without FAISS (the lent GPU machine's image): ``import faiss`` fails."""
    from curate.dedup import vectors

    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(vectors, "faiss_installed", lambda: False)


def test_without_faiss_the_searches_run_in_torch_with_the_same_results(monkeypatch):
    """No FAISS: the "cuda" branches run torch products (on the GPU when torch has one, here the CPU) and give
    the pairs, neighbours and nearest centroids of the FAISS and CPU branches (decided in float64)."""
    from curate.dedup import vectors

    x = _clustered(3000, 32, 0)
    c = vectors.spherical_kmeans(x, 10, 8, 1234, "cpu")  # FAISS's centroids, computed before hiding it
    i_c, j_c, s_c = vectors.similar_pairs(x, 0.95, "cpu")
    s_f, n_f = vectors.knn_search(x[:50], x, 5, "cpu")
    _without_faiss(monkeypatch)
    with pytest.raises(Exception, match="FAISS is not installed"):
        vectors.import_faiss()
    i_t, j_t, s_t = vectors.similar_pairs(x, 0.95, "cuda")  # n > _DENSE_MAX: the torch block product
    key = lambda i, j: np.sort(i * len(x) + j)  # noqa: E731
    np.testing.assert_array_equal(key(i_t, j_t), key(i_c, j_c))
    np.testing.assert_array_equal(np.sort(s_t), np.sort(s_c))
    s_t, n_t = vectors.knn_search(x[:50], x, 5, "cuda")
    np.testing.assert_array_equal(n_t[:, 0], n_f[:, 0])
    np.testing.assert_allclose(s_t, s_f, atol=1e-5)
    np.testing.assert_array_equal(vectors.nearest(x, c, "cuda"), vectors.nearest(x, c, "cpu"))


def test_torch_kmeans_finds_planted_clusters_and_dedup_semantic_runs_without_faiss(monkeypatch):
    """kmeans_backend: torch needs no FAISS; its clustering is as tight as FAISS's on planted clusters, and
    SemDeDup removes what it removes with FAISS (all near-copies of one group but one)."""
    import pyarrow as pa

    import curate
    from curate import schema as S
    from curate.context import FitContext
    from curate.dedup import vectors
    from curate.table_ops import prepare_for_stages

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((8, 24)) * 4
    lab = rng.integers(0, 8, 4000)
    x = (centres[lab] + 1.5 * rng.standard_normal((4000, 24))).astype(np.float32)
    x[100:140] = x[100] + 0.001 * rng.standard_normal((40, 24))  # a group of near-copies
    t = prepare_for_stages(pa.table({S.UID: [f"e{i:05d}" for i in range(len(x))],
                                     S.IMAGE_EMBEDDING: pa.array(list(x.astype(np.float16)),
                                                                 pa.list_(pa.float16()))}))

    def removed(**kw) -> set:
        st = curate.create_stage("dedup_semantic", mode="semdedup", method="kmeans", eps=0.01, n_clusters=8, **kw)
        st.set_state(st.fit(FitContext.from_table(t)))
        out = st(t).table
        return set(out.filter(pa.compute.is_valid(out[S.REJECT_REASON]))[S.UID].to_pylist())

    with_faiss = removed()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    def fit(c: np.ndarray) -> float:  # the spherical k-means objective: mean cosine to the nearest centroid
        return float((unit @ c.T).max(axis=1).mean())

    c_faiss = vectors.spherical_kmeans(x, 8, 20, 0, "cpu")
    _without_faiss(monkeypatch)
    with pytest.raises(Exception, match="FAISS is not installed"):
        curate.create_stage("dedup_semantic", mode="semdedup", method="kmeans", eps=0.01)
    c = vectors.spherical_kmeans(x, 8, 20, 0, "cuda", backend="torch")
    assert np.allclose(np.linalg.norm(c, axis=1), 1) and fit(c) >= fit(c_faiss) - 0.02, (fit(c), fit(c_faiss))
    got = vectors.nearest(x, c, "cpu")
    assert len(set(got[100:140])) == 1  # the near-copies share a cluster
    without = removed(kmeans_backend="torch", device="cuda")
    group = {f"e{i:05d}" for i in range(100, 140)}
    # which copy stays depends on its distance to the centroid (another centroid, another pick); the rest go
    assert len(with_faiss) == len(without) == 39 and with_faiss <= group and without <= group


@pytest.mark.skipif(not __import__("curate.dedup.vectors", fromlist=["x"]).gpu_available(), reason="no FAISS GPU")
def test_faiss_on_gpu_matches_cpu():
    """On a GPU: separated clusters (no near-tied rows) give the CPU's assignments and centroids; pairs and
    nearest centroids are decided in float64, so they are identical on any data."""
    from curate.dedup import vectors

    x = _clustered(20000, 64, 1)
    c_cpu, c_gpu = vectors.spherical_kmeans(x, 50, 10, 0, "cpu"), vectors.spherical_kmeans(x, 50, 10, 0, "cuda")
    np.testing.assert_allclose(c_gpu, c_cpu, atol=1e-6)
    np.testing.assert_array_equal(vectors.nearest(x, c_cpu, "cuda"), vectors.nearest(x, c_cpu, "cpu"))
    (i_g, j_g, _), (i_c, j_c, _) = vectors.similar_pairs(x[:5000], 0.9, "cuda"), vectors.similar_pairs(x[:5000], 0.9, "cpu")
    assert sorted(zip(i_g, j_g)) == sorted(zip(i_c, j_c))


@pytest.mark.ray
def test_bench_gpu_small_runs(tmp_path):
    """bench/gpu.py --device cpu --small: every section present with positive figures (it must not rot)."""
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--small", "--out",
                        str(out), "--tmp", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {"meta", "clip", "perplexity", "recaption", "faiss", "seconds"} <= set(r)
    for model, m in r["clip"].items():
        assert set(m["runs"]) == {"local_cpu_decode", "local_gpu_decode", "ray_gpu_decode"}
        for run in m["runs"].values():
            assert run["rows"] == m["images"] and run["img_s"] > 0 and run["wall_s"] > 0
        assert all(v > 0 for v in m["ratio"].values()) and m["decode_agreement"]["min_cosine"] >= EMB_MIN_COS
    assert r["perplexity"]["captions_s"] > 0 and r["perplexity"]["ratio"]["batched_vs_one_at_a_time"] > 0
    assert r["recaption"]["img_s"] > 0 and r["recaption"]["ratio"]["batched_vs_one_at_a_time"] > 0
    f = r["faiss"]
    assert f["kmeans"]["s"] > 0 and f["kmeans"]["cpu_s"] > 0 and f["semdedup"]["s"] > 0 and f["semdedup"]["cpu_s"] > 0
    assert "local_gpu_decode img/s" in p.stdout and "SemDeDup" in p.stdout
