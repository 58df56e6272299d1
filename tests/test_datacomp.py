"""DataComp's image-based filter (nearest given centroid, target clusters) against numpy, and the
DataComp / LAION-5B configs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import curate
from curate import schema as S
from curate.table_ops import prepare_for_stages


def test_image_cluster_and_target_filter_equal_numpy(tmp_path):
    rng = np.random.default_rng(0)
    c = rng.normal(size=(10, 8))
    np.save(tmp_path / "centroids.npy", c.astype(np.float32))
    np.save(tmp_path / "targets.npy", np.array([1, 3, 5, 3]))
    x = rng.normal(size=(50, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = [None if i in (4, 9) else list(v) for i, v in enumerate(x.astype(np.float16))]
    t = prepare_for_stages(pa.table({S.UID: [f"u{i}" for i in range(50)],
                                     S.IMAGE_EMBEDDING: pa.array(emb, pa.list_(pa.float16()))}))
    out = curate.create_stage("image_cluster", centroids_path=str(tmp_path / "centroids.npy"))(t).table
    want = (x.astype(np.float16).astype(np.float64) @ c.astype(np.float32).astype(np.float64).T).argmax(1)
    got = out[S.IMAGE_CLUSTER].to_pylist()
    assert got[4] is None and got[9] is None
    assert [g for i, g in enumerate(got) if i not in (4, 9)] == [int(w) for i, w in enumerate(want) if i not in (4, 9)]
    kept = curate.create_stage("cluster", target_path=str(tmp_path / "targets.npy"))(out)
    reasons = kept.table[S.REJECT_REASON].to_pylist()
    for i, g in enumerate(got):
        assert reasons[i] == ("cluster_missing" if g is None else None if g in (1, 3, 5) else "cluster_not_in_target")
    inline = curate.create_stage("cluster", targets=[1, 3, 5])(out).table
    assert inline[S.REJECT_REASON].to_pylist() == reasons


def test_image_cluster_errors(tmp_path):
    from curate.stage import StageError

    np.save(tmp_path / "c.npy", np.zeros((3, 4), np.float32))
    t = prepare_for_stages(pa.table({S.UID: ["a"], S.IMAGE_EMBEDDING: pa.array([[0.1] * 8], pa.list_(pa.float16()))}))
    with pytest.raises(StageError, match="centroids have 4 dimensions, the image embeddings 8"):
        curate.create_stage("image_cluster", centroids_path=str(tmp_path / "c.npy"))(t)
    with pytest.raises(StageError, match="no such file"):
        curate.create_stage("image_cluster", centroids_path=str(tmp_path / "none.npy"))(t)


@pytest.mark.parametrize("name", ["datacomp_basic", "datacomp_image_based", "laion5b_safety"])
def test_the_paper_configs_validate(name):
    from curate import pipelines

    cfg = pipelines.load(name, input="x.parquet", output="out")
    names = [s.stage for s in cfg.stages]
    if name == "datacomp_basic":
        assert names[1:] == ["caption", "image_size", "aspect_ratio", "language_id", "language"]
        assert cfg.stages[2].min_side == 200 and cfg.stages[3].max_ratio == 3.0
    elif name == "datacomp_image_based":
        assert names.index("clip_score") < names.index("image_cluster") < names.index("cluster")
    else:
        cuts = {s.id: s.max for s in cfg.stages if s.stage == "score"}
        assert cuts == {"unsafe": 0.5, "watermarked": 0.8}


def _tiny_fasttext(path) -> None:
    """A supervised fastText classifier with lid.176's label format, trained here (no download)."""
    import random

    import fasttext

    rng = random.Random(0)
    words = {"en": "a photo of the red car on street with house tree dog".split(),
             "de": "ein foto von dem roten auto auf strasse mit haus baum hund".split(),
             "fr": "une photo de la voiture rouge dans rue avec maison arbre chien".split()}
    lines = [f"__label__{lang} " + " ".join(rng.choices(w, k=6)) for lang, w in words.items() for _ in range(200)]
    rng.shuffle(lines)
    train = path.parent / "train.txt"
    train.write_text("\n".join(lines) + "\n")
    fasttext.train_supervised(str(train), epoch=5, lr=0.1, dim=8, minCount=1, verbose=0, thread=1,
                              seed=0).save_model(str(path))


def test_fasttext_language_id_is_datacomps_top1_rule(tmp_path):
    import fasttext

    from curate.config import ConfigError

    _tiny_fasttext(tmp_path / "lid.bin")
    caps = ["a red car on the street", "ein roter hund\nauf der strasse", "une maison rouge", "", None]
    t = prepare_for_stages(pa.table({S.UID: list("abcde"), S.CAPTION: caps}))
    out = curate.create_stage("language_id", backend="fasttext", model_path=str(tmp_path / "lid.bin"))(t).table
    model = fasttext.load_model(str(tmp_path / "lid.bin"))
    for cap, lang, score in zip(caps, out[S.LANGUAGE].to_pylist(), out[S.LANGUAGE_SCORE].to_pylist()):
        if not cap:
            assert lang is None and score is None
            continue
        ((p, label),) = model.f.predict(cap.replace("\n", " "), 1, 0.0, "strict")  # DataComp: newlines -> spaces
        assert lang == label.removeprefix("__label__") and score == pytest.approx(p)
    assert out[S.LANGUAGE].to_pylist()[:3] == ["en", "de", "fr"]
    with pytest.raises(ConfigError, match="needs model_path"):
        curate.load_config({"input": {"path": "x"}, "output": {"path": "y"},
                            "stages": [{"stage": "language_id", "backend": "fasttext"}]})
