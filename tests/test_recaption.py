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
    kept_a, kept_b = (x.filter(pc.is_null(x[S.REJECT_REASON]))[S.RECAPTION] for x in (a, b))
    assert kept_a.equals(kept_b)


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
def test_local_and_ray_runners_give_the_same_recaptions(demo_site, demo_input, ray_cluster, tmp_path):
    """download -> dedup_exact -> recaption (only_kept: false) over the demo server: 16 photos, exact
    duplicates of some of them and 2 corrupt images, 4 shards, both runners.  The duplicates are
    rejected in an earlier segment (dedup_exact is global) and still get captions, rejection unchanged."""
    import pyarrow.parquet as pq

    from helpers import manifest, read_dir, rows_by_uid

    rec = manifest(demo_site)
    kinds = [r["kind"] for r in rec]
    rows = [i for i, k in enumerate(kinds) if k == "original"][:16]
    rows += [i for i, r in enumerate(rec) if r["kind"] == "exact_duplicate" and r["duplicate_of"] in rows][:3]
    rows += [i for i, k in enumerate(kinds) if k == "corrupt"][:2]
    src = pq.read_table(demo_input).take(sorted(rows))
    pq.write_table(src, tmp_path / "in.parquet")
    outs = {}
    for runner in ("local", "ray"):
        res = curate.run({
            "input": {"path": str(tmp_path / "in.parquet"), "url_col": "url", "caption_col": "caption",
                      "uid_col": "uid", "shard_size": 6},
            "output": {"path": str(tmp_path / runner)},
            "runner": {"kind": runner, "num_cpus": 2},
            "stages": [{"stage": "download", "image_size": 64, "timeout": 2, "thread_count": 8,
                        "allow_networks": ["127.0.0.1/32"]},
                       {"stage": "dedup_exact"},
                       {"stage": "recaption", "max_new_tokens": 8, "caption_mode": "fused", "batch_size": 16,
                        "only_kept": False}],
        })
        outs[runner] = res.output
    a, b = read_dir(outs["local"] / "data"), read_dir(outs["ray"] / "data")
    assert a.num_rows == 16 and rows_by_uid(a) == rows_by_uid(b)
    assert all(a[S.RECAPTION].to_pylist()) and all(a[S.TRAINING_CAPTION].to_pylist())
    rej = read_dir(outs["local"] / "rejected")
    assert rows_by_uid(rej) == rows_by_uid(read_dir(outs["ray"] / "rejected"))
    dups = rej.filter(pc.equal(rej[S.REJECT_STAGE], "dedup_exact"))
    assert dups.num_rows == 3 and all(dups[S.RECAPTION].to_pylist())  # rejected in segment 1, captioned anyway
    assert set(dups[S.REJECT_REASON].to_pylist()) == {"duplicate"}
    broken = rej.filter(pc.equal(rej[S.REJECT_STAGE], "download"))
    assert broken.num_rows == 2 and broken[S.RECAPTION].null_count == 2  # no image: nothing to caption


def test_a_stage_for_rejected_rows_too_must_come_after_the_last_global_stage(tmp_path):
    import pyarrow.parquet as pq

    from curate.config import ConfigError

    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red bicycle"]}), tmp_path / "in.parquet")
    with pytest.raises(ConfigError, match="after the last global stage"):
        curate.run({"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out")},
                    "stages": [{"stage": "recaption", "only_kept": False}, {"stage": "dedup_exact"}]})


def _tiny_qwen2_vl(path) -> None:
    """A random-init Qwen2-VL (2 layers, d=64) + Qwen2VLProcessor with a chat template, saved to ``path``."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from curate.stages.hf_models import clip_bpe_tokenizer

    tok = clip_bpe_tokenizer()
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, initializer_range=0.2),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=0.2,
                         rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [4, 6, 6]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    images = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=template).save_pretrained(path)


def test_chat_vlm_with_variable_image_sizes(tmp_path):
    """A Qwen2-VL-style chat model: chat template, a different number of image tokens per image (left padding)."""
    import skimage.data
    from PIL import Image

    _tiny_qwen2_vl(tmp_path / "qwen")
    data = []
    for name, side in (("astronaut", 60), ("coffee", 120), ("chelsea", 90), ("rocket", 100)):
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG")
        data.append(buf.getvalue())
    t = pa.table({"uid": list("abcd"), "caption": ["alt"] * 4, "image": data})
    stage = curate.create_stage("recaption", model=str(tmp_path / "qwen"), prompt="Describe the image.",
                                max_new_tokens=6, caption_mode="synthetic")
    out = stage(t).table
    assert stage.text.startswith("<|im_start|>user\n<|vision_start|>") and stage.text.endswith("assistant\n")
    batched = out[S.RECAPTION].to_pylist()
    assert batched == [stage.generate([im])[0] for im in _pil(t)]
    assert all(batched) and not any("assistant" in r or "Describe" in r for r in batched)
    assert out[S.TRAINING_CAPTION].to_pylist() == batched
