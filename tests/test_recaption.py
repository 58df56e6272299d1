"""recaption: batched == one-by-one generation, caption_mode variants, real loading path, both runners."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import curate
from curate import schema as S

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "hubble_deep_field"]


def _jpeg(name: str) -> bytes:
    import skimage.data
    from PIL import Image

    im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    im.thumbnail((128, 128))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> pa.Table:
    caps = ["An astronaut.", "a cup of coffee", "cat", "rocket on the pad!", "man with a camera", "coins", "",
            "deep field"]
    return pa.table({"uid": [f"p{i}" for i in range(len(PHOTOS))], "caption": caps,
                     "image": [_jpeg(n) for n in PHOTOS]})


@pytest.fixture(scope="module")
def greedy(images):
    stage = curate.create_stage("recaption", prompt="a picture of", max_new_tokens=10, gen_batch_size=8,
                                caption_mode="fused")
    return stage, stage(images).table


def test_batched_generation_equals_one_by_one(greedy, images):
    stage, out = greedy
    batched = out[S.RECAPTION].to_pylist()
    one = [stage.generate([img]) for img in _pil(images)]
    assert batched == [o[0] for o in one]
    assert all(batched) and len(set(batched)) >= len(PHOTOS) - 1  # image-dependent captions
    assert not any(r.startswith("a picture of") for r in batched)  # the prompt is not echoed
    assert set(out[S.RECAPTION_MODEL].to_pylist()) == {stage.model_name} and "random" in stage.model_name
    assert out[S.CAPTION].to_pylist() == images["caption"].to_pylist()  # the alt-text is kept as is
    assert "RANDOM WEIGHTS" in stage.describe()["warning"]


def _pil(table: pa.Table) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in table["image"].to_pylist()]


def test_caption_modes(greedy, images):
    _, fused = greedy
    rec = fused[S.RECAPTION].to_pylist()
    caps = images["caption"].to_pylist()
    assert fused[S.TRAINING_CAPTION].to_pylist() == [
        f"An astronaut. {rec[0]}", f"a cup of coffee. {rec[1]}", f"cat. {rec[2]}", f"rocket on the pad! {rec[3]}",
        f"man with a camera. {rec[4]}", f"coins. {rec[5]}", rec[6], f"deep field. {rec[7]}"]
    kw = dict(prompt="a picture of", max_new_tokens=10, gen_batch_size=3)
    orig = curate.create_stage("recaption", caption_mode="original", **kw)(images).table
    syn = curate.create_stage("recaption", caption_mode="synthetic", **kw)(images).table
    tmpl = curate.create_stage("recaption", caption_mode="fused", fuse_template="{recaption} | {caption}",
                               **kw)(images).table
    assert orig[S.RECAPTION].to_pylist() == rec == syn[S.RECAPTION].to_pylist()  # batch size 3 vs 8: same text
    assert orig[S.TRAINING_CAPTION].to_pylist() == caps
    assert syn[S.TRAINING_CAPTION].to_pylist() == rec
    assert tmpl[S.TRAINING_CAPTION].to_pylist()[0] == f"{rec[0]} | An astronaut."


def test_sampling_is_seeded(images):
    kw = dict(max_new_tokens=8, do_sample=True, top_k=50, temperature=1.5)
    a = curate.create_stage("recaption", seed=1, **kw)(images).table[S.RECAPTION].to_pylist()
    b = curate.create_stage("recaption", seed=1, **kw)(images).table[S.RECAPTION].to_pylist()
    c = curate.create_stage("recaption", seed=2, **kw)(images).table[S.RECAPTION].to_pylist()
    assert a == b and a != c


def test_undecodable_image_is_rejected_not_fatal(images):
    t = images.slice(0, 3)
    t = t.set_column(2, "image", pa.array([t["image"][0].as_py(), b"not an image", None], pa.binary()))
    out = curate.create_stage("recaption", max_new_tokens=5)(t).table
    assert out[S.REJECT_REASON].to_pylist() == [None, "decode_failed", "decode_failed"]
    assert out[S.RECAPTION][0].as_py() and out[S.RECAPTION][1].as_py() is None


def test_only_kept_false_captions_earlier_rejects_without_unrejecting(images):
    from curate.table_ops import mark_rejected, prepare_for_stages

    t = mark_rejected(prepare_for_stages(images), [i % 2 == 1 for i in range(len(PHOTOS))], "clip_score", "clip")
    kept_only = curate.create_stage("recaption", max_new_tokens=5)
    everything = curate.create_stage("recaption", max_new_tokens=5, only_kept=False)
    a, b = kept_only.run_batch(t), everything.run_batch(t)
    assert a[S.REJECT_REASON].to_pylist() == b[S.REJECT_REASON].to_pylist() == t[S.REJECT_REASON].to_pylist()
    assert [r is None for r in a[S.RECAPTION].to_pylist()] == [i % 2 == 1 for i in range(len(PHOTOS))]
    assert all(b[S.RECAPTION].to_pylist())
    assert b.filter(pc.is_null(b[S.REJECT_REASON]))[S.RECAPTION].equals(a.filter(pc.is_null(a[S.REJECT_REASON]))[S.RECAPTION])


def test_model_loads_from_local_directory_via_autoprocessor(greedy, images, tmp_path):
    """The real loading path: AutoProcessor + AutoModelForImageTextToText.from_pretrained on a saved BLIP."""
    from curate.stages.hf_models import random_blip

    model, processor = random_blip("tiny", seed=0)
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    stage = curate.create_stage("recaption", model=str(tmp_path / "blip"), prompt="a picture of", max_new_tokens=10,
                                num_beams=1)
    out = stage(images).table
    assert out[S.RECAPTION].to_pylist() == greedy[1][S.RECAPTION].to_pylist()
    assert set(out[S.RECAPTION_MODEL].to_pylist()) == {str(tmp_path / "blip")}
    assert "warning" not in stage.describe()
    beams = curate.create_stage("recaption", model=str(tmp_path / "blip"), max_new_tokens=6, num_beams=3,
                                gen_batch_size=4)
    one = curate.create_stage("recaption", model=str(tmp_path / "blip"), max_new_tokens=6, num_beams=3,
                              gen_batch_size=1)
    assert beams(images).table[S.RECAPTION].to_pylist() == one(images).table[S.RECAPTION].to_pylist()


@pytest.mark.ray
def test_local_and_ray_runners_give_the_same_recaptions(demo_input, ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from helpers import read_dir, rows_by_uid

    src = pq.read_table(demo_input).slice(0, 40)
    pq.write_table(src, tmp_path / "in.parquet")
    outs = {}
    for runner in ("local", "ray"):
        res = curate.run({
            "input": {"path": str(tmp_path / "in.parquet"), "url_col": "url", "caption_col": "caption",
                      "uid_col": "uid", "shard_size": 20},
            "output": {"path": str(tmp_path / runner)},
            "runner": {"kind": runner, "num_cpus": 2},
            "stages": [{"stage": "download", "image_size": 64, "timeout": 2, "thread_count": 8},
                       {"stage": "recaption", "max_new_tokens": 8, "caption_mode": "fused", "batch_size": 16}],
        })
        outs[runner] = res.output
    a, b = read_dir(outs["local"] / "data"), read_dir(outs["ray"] / "data")
    assert a.num_rows > 10 and rows_by_uid(a) == rows_by_uid(b)
    assert all(a[S.RECAPTION].to_pylist()) and all(a[S.TRAINING_CAPTION].to_pylist())
