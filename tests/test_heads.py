"""embedding_head: heads of the exact published architectures with random weights, saved and loaded
the way a user's file is, scored against a plain numpy forward pass; the score filter; both runners."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import curate
from curate import schema as S
from curate.stage import StageError


def _aesthetic_reference_module():
    """The LAION aesthetic predictor's MLP as its training code writes it
    (christophschuhmann/improved-aesthetic-predictor, simple_inference.py)."""
    import torch.nn as nn

    class MLP(nn.Module):
        def __init__(self, input_size: int) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    return MLP(768)


def _emb_table(rng, n: int, d: int, nulls: tuple[int, ...] = (), text: bool = False) -> pa.Table:
    def col(seed_shift: int) -> pa.Array:
        x = rng.normal(size=(n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        vals = [None if i in nulls else list(v) for i, v in enumerate(x.astype(np.float16))]
        return pa.array(vals, pa.list_(pa.float16()))

    cols = {S.UID: [f"u{i}" for i in range(n)], S.IMAGE_EMBEDDING: col(0)}
    if text:
        cols[S.TEXT_EMBEDDING] = col(1)
    from curate.table_ops import prepare_for_stages

    return prepare_for_stages(pa.table(cols))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    return np.array(col.to_pylist(), dtype=np.float32)


def test_laion_aesthetic_preset_loads_the_released_layout_and_equals_numpy(tmp_path):
    import torch

    torch.manual_seed(0)
    ref = _aesthetic_reference_module()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(ref.state_dict(), path)  # the released file is this state dict
    t = _emb_table(np.random.default_rng(0), 40, 768)
    out = curate.create_stage("embedding_head", preset="laion_aesthetic", weights=str(path))(t).table
    w = {k: v.double().numpy() for k, v in ref.state_dict().items()}
    h = _unit(_matrix(t[S.IMAGE_EMBEDDING]))
    for i in (0, 2, 4, 6, 7):  # linear layers only: no activation between them, dropout off at inference
        h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    got = out[S.AESTHETIC_SCORE].to_numpy()
    assert out.schema.field(S.AESTHETIC_SCORE).type == pa.float32()
    np.testing.assert_allclose(got, h[:, 0], rtol=1e-4, atol=1e-5)
    assert out[S.REJECT_REASON].null_count == 40  # a scoring stage only adds a column


def test_mlp_head_from_safetensors_on_both_embeddings_with_sigmoid(tmp_path):
    import torch
    from safetensors.torch import save_file

    from curate.stages.embedding_head import build_head

    torch.manual_seed(1)
    head = build_head("mlp", 2 * 32, [16, 8], "relu")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "nsfw.safetensors"))
    t = _emb_table(np.random.default_rng(1), 25, 32, nulls=(3, 7), text=True)
    stage = curate.create_stage("embedding_head", preset="mlp", hidden=[16, 8], activation="relu", output="sigmoid",
                                input="image+text", column="punsafe", weights=str(tmp_path / "nsfw.safetensors"))
    out = stage(t).table
    w = {k: v.double().numpy() for k, v in head.state_dict().items()}
    ok = [i for i in range(25) if i not in (3, 7)]
    x = np.concatenate([_unit(_matrix(t[S.IMAGE_EMBEDDING].take(ok))), _unit(_matrix(t[S.TEXT_EMBEDDING].take(ok)))], 1)
    h = np.maximum(x @ w["layers.0.weight"].T + w["layers.0.bias"], 0)
    h = np.maximum(h @ w["layers.2.weight"].T + w["layers.2.bias"], 0)
    p = 1 / (1 + np.exp(-(h @ w["layers.4.weight"].T + w["layers.4.bias"])[:, 0]))
    got = out["punsafe"]
    assert got.null_count == 2 and got[3].as_py() is None and got[7].as_py() is None
    np.testing.assert_allclose(got.take(ok).to_numpy(), p, rtol=1e-4, atol=1e-6)
    assert ((p > 0) & (p < 1)).all()


def test_mlp_with_dropout_modules_loads_a_training_code_layout(tmp_path):
    """Linear, ReLU, Dropout per hidden layer (keys layers.0, .3, .6), as many NSFW-detector ports write it."""
    import torch
    import torch.nn as nn

    torch.manual_seed(5)
    ref = nn.Module()
    ref.layers = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 8), nn.ReLU(),
                               nn.Dropout(0.1), nn.Linear(8, 1))
    torch.save(ref.state_dict(), tmp_path / "nsfw.pth")
    t = _emb_table(np.random.default_rng(5), 12, 32)
    out = curate.create_stage("embedding_head", hidden=[16, 8], dropout=[0.2, 0.1], output="sigmoid",
                              column="punsafe", weights=str(tmp_path / "nsfw.pth"))(t).table
    w = {k: v.double().numpy() for k, v in ref.state_dict().items()}
    h = np.maximum(_unit(_matrix(t[S.IMAGE_EMBEDDING])) @ w["layers.0.weight"].T + w["layers.0.bias"], 0)
    h = np.maximum(h @ w["layers.3.weight"].T + w["layers.3.bias"], 0)
    p = 1 / (1 + np.exp(-(h @ w["layers.6.weight"].T + w["layers.6.bias"])[:, 0]))
    np.testing.assert_allclose(out["punsafe"].to_numpy(), p, rtol=1e-4, atol=1e-6)


def test_linear_head_from_a_lightning_checkpoint(tmp_path):
    import torch

    from curate.stages.embedding_head import build_head

    torch.manual_seed(2)
    head = build_head("linear", 32, [], "none")
    torch.save({"state_dict": head.state_dict(), "epoch": 3}, tmp_path / "wm.ckpt")
    t = _emb_table(np.random.default_rng(2), 10, 32)
    out = curate.create_stage("embedding_head", preset="linear", output="sigmoid", column="pwatermark",
                              weights=str(tmp_path / "wm.ckpt"))(t).table
    w = {k: v.double().numpy() for k, v in head.state_dict().items()}
    z = _unit(_matrix(t[S.IMAGE_EMBEDDING])) @ w["layers.0.weight"].T + w["layers.0.bias"]
    np.testing.assert_allclose(out["pwatermark"].to_numpy(), 1 / (1 + np.exp(-z[:, 0])), rtol=1e-4, atol=1e-6)


def test_head_errors_are_one_clear_line(tmp_path):
    import torch

    from curate.config import ConfigError
    from curate.stages.embedding_head import build_head

    t = _emb_table(np.random.default_rng(3), 4, 32)
    with pytest.raises(StageError, match="no such file"):
        curate.create_stage("embedding_head", preset="laion_aesthetic", weights=str(tmp_path / "nope.pth"))(t)
    torch.save(build_head("mlp", 48, [8], "relu").state_dict(), tmp_path / "h48.pt")
    with pytest.raises(StageError, match="takes 48 inputs, the image embedding has 32"):
        curate.create_stage("embedding_head", hidden=[8], column="s", weights=str(tmp_path / "h48.pt"))(t)
    with pytest.raises(StageError) as e:
        curate.create_stage("embedding_head", preset="laion_aesthetic", weights=str(tmp_path / "h48.pt"))(t)
    msg = str(e.value)  # one line: the file, the preset's layer sizes, what the file holds
    assert "\n" not in msg and str(tmp_path / "h48.pt") in msg and "does not fit preset laion_aesthetic" in msg
    assert "expected Linear layers 48x1024 -> 1024x128 -> 128x64 -> 64x16 -> 16x1" in msg, msg
    assert msg.endswith("found 48x8 -> 8x1"), msg
    assert "hidden []" not in msg  # not the user's unused parameter
    torch.save(build_head("mlp", 48, [8], "relu"), tmp_path / "module.pt")  # the whole module, pickled
    with pytest.raises(StageError) as e:
        curate.create_stage("embedding_head", hidden=[8], column="s", weights=str(tmp_path / "module.pt"))(t)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "module.pt") in msg and "model.state_dict()" in msg, msg
    for bad, match in (({"hidden": [4]}, "fixes the architecture"), ({"preset": "mlp"}, "name the score column"),
                       ({"column": "uid"}, "not a score"), ({"column": "Bad-Name"}, "lower-case")):
        with pytest.raises(ConfigError, match=match):
            curate.load_config({"input": {"path": "x"}, "output": {"path": "y"},
                                "stages": [{"stage": "embedding_head", "preset": "laion_aesthetic", "weights": "w",
                                            **bad}]})


def test_score_filter_reasons_and_declared_thresholds():
    from curate.table_ops import prepare_for_stages

    t = prepare_for_stages(pa.table({S.UID: list("abcde"),
                                     "punsafe": pa.array([0.1, 0.5, 0.51, None, 0.9], pa.float32())}))
    st = curate.create_stage("score", column="punsafe", max=0.5)
    out = st(t).table
    assert out[S.REJECT_REASON].to_pylist() == [None, None, "punsafe_too_high", "punsafe_missing",
                                                "punsafe_too_high"]
    assert st.thresholds() == [{"metric": "punsafe", "value": 0.5, "side": "max", "name": "max"}]
    lo = curate.create_stage("score", column="punsafe", min=0.2)(t).table
    assert lo[S.REJECT_REASON].to_pylist()[:3] == ["punsafe_too_low", None, None]


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.mark.ray
def test_heads_and_score_filters_on_both_runners(ray_cluster, tmp_path):
    """clip_embed (tiny, d=256) -> aesthetic head -> NSFW head -> score filters -> DataComp's
    image-based filter (nearest centroid, target clusters): local == Ray, the report draws the score
    columns with their thresholds."""
    import pyarrow.parquet as pq
    import torch
    from helpers import read_dir, rows_by_uid

    from curate.stages.embedding_head import build_head

    torch.manual_seed(4)
    aesthetic = _aesthetic_reference_module()
    aesthetic.layers[0] = torch.nn.Linear(256, 1024)  # the same head on the tiny model's 256-d embeddings
    torch.save(aesthetic.state_dict(), tmp_path / "aesthetic.pth")
    torch.save(build_head("mlp", 256, [32], "relu").state_dict(), tmp_path / "nsfw.pt")
    n = 24
    from curate.table_ops import prepare_for_stages

    probe = prepare_for_stages(pa.table({S.UID: [f"p{i}" for i in range(6)], S.IMAGE: [_jpeg(i) for i in range(6)],
                                         S.CAPTION: ["x"] * 6}))
    emb = curate.create_stage("clip_embed")(probe).table[S.IMAGE_EMBEDDING]  # the run's own embeddings
    np.save(tmp_path / "centroids.npy", np.array(emb.to_pylist(), np.float32))  # rows 0-5 are the centroids
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": [f"a photo number {i} of something" for i in range(n)],
                             "jpg": [_jpeg(i) for i in range(n)]}), tmp_path / "in.parquet")
    outs = {}
    for runner in ("local", "ray"):
        res = curate.run({
            "input": {"path": str(tmp_path / "in.parquet"), "image_col": "jpg", "shard_size": 8},
            "output": {"path": str(tmp_path / runner)},
            "runner": {"kind": runner, "num_cpus": 2},
            "stages": [{"stage": "clip_embed"},
                       {"stage": "embedding_head", "preset": "laion_aesthetic", "weights": str(tmp_path / "aesthetic.pth")},
                       {"stage": "embedding_head", "id": "nsfw", "column": "punsafe", "hidden": [32],
                        "output": "sigmoid", "weights": str(tmp_path / "nsfw.pt")},
                       {"stage": "image_cluster", "centroids_path": str(tmp_path / "centroids.npy")},
                       {"stage": "cluster", "targets": [0, 1, 2]},
                       {"stage": "score", "id": "unsafe", "column": "punsafe", "max": 0.5},
                       {"stage": "score", "id": "aesthetic", "column": "aesthetic_score", "min": -1e9}],
        })
        outs[runner] = res
    a, b = (read_dir(outs[r].output / "data") for r in ("local", "ray"))
    ra, rb = (read_dir(outs[r].output / "rejected") for r in ("local", "ray"))
    assert rows_by_uid(a) == rows_by_uid(b) and rows_by_uid(ra) == rows_by_uid(rb)
    both = pa.concat_tables([a, ra], promote_options="permissive")
    assert both.num_rows == n and both["punsafe"].null_count == 0 and both[S.AESTHETIC_SCORE].null_count == 0
    assert both[S.IMAGE_CLUSTER].null_count == 0
    inside = pc.is_in(both[S.IMAGE_CLUSTER], pa.array([0, 1, 2], pa.int32()))
    outside = both.filter(pc.invert(inside))
    assert 0 < outside.num_rows < n and set(outside[S.REJECT_REASON].to_pylist()) == {"cluster_not_in_target"}
    unsafe = both.filter(pc.and_(inside, pc.greater(both["punsafe"], 0.5)))
    assert set(unsafe[S.REJECT_REASON].to_pylist()) <= {"punsafe_too_high"}
    assert a.num_rows == n - outside.num_rows - unsafe.num_rows
    page = (outs["local"].output / "report.html").read_text()
    assert "punsafe" in page and "unsafe: keep ≤ 0.5" in page and "Aesthetic score" in page
