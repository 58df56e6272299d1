"""clip_embed: embeddings and scores against an independent open_clip reference, decode failures,
caption truncation, batch invariance, random-init warnings and checkpoint loading."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import curate
from curate import schema as S
from curate.stage import StageError

# A tiny CLIP of the same open_clip classes as ViT-B-32 (64 px, 16 px patches, 2-layer towers).
TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "page", "hubble_deep_field")
CAPTIONS = ("an astronaut in an orange suit", "a cup of coffee on a saucer", "a tabby cat",
            "a rocket on the launch pad at night", "a man with a camera on a tripod", "a horse", "a page of text",
            "distant galaxies in deep space")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Path of the tiny model config (a NAME.json model config is a valid `model:`)."""
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _encode(stem: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    import skimage.data

    im = Image.fromarray(getattr(skimage.data, stem)())
    im = im.convert("RGB" if fmt == "JPEG" else im.mode).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def table() -> pa.Table:
    images, captions = [], []
    for i, (stem, cap) in enumerate(zip(PHOTOS, CAPTIONS)):
        images.append(_encode(stem, (120 + 17 * i, 90 + 23 * i), "PNG" if i % 3 == 2 else "JPEG"))
        captions.append(cap)
    good = images[0]
    images += [good[: len(good) // 3], b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4, None,
               b"<html>not an image</html>", images[1], images[2]]
    long = " ".join(["photograph of a wonderful landscape with mountains"] * 40)
    captions += ["truncated jpeg", "garbage behind a jpeg header", "no bytes", "html page", long,
                 long + " and a completely different ending that the tokenizer never sees"]
    n = len(images)
    return pa.table({S.UID: [f"u{i:02d}" for i in range(n)], S.URL: [f"http://x/{i}" for i in range(n)],
                     S.CAPTION: captions, S.IMAGE: pa.array(images, pa.binary())})


@pytest.fixture(scope="module")
def result(tiny_clip, table):
    return curate.create_stage("clip_embed", model=tiny_clip, batch_size=4, pipeline_batches=2)(table)


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    return np.array(col.to_pylist(), dtype=np.float32)


def test_decode_failures_rejected_batch_goes_on(result):
    t = result.table
    reasons = dict(zip(t[S.UID].to_pylist(), t[S.REJECT_REASON].to_pylist()))
    assert [u for u, r in reasons.items() if r] == ["u08", "u09", "u10", "u11"]
    bad = t.filter(pa.compute.is_valid(t[S.REJECT_REASON])).to_pylist()
    assert {r[S.REJECT_REASON] for r in bad} == {"decode_failed"}
    assert {r[S.REJECT_STAGE] for r in bad} == {"clip_embed"}
    assert {r[S.ERROR_TYPE] for r in bad} == {"decode_error"}
    assert all(r[S.REJECT_DETAIL] for r in bad)
    assert all(r[S.CLIP_SCORE] is None and r[S.IMAGE_EMBEDDING] is None for r in bad)
    assert result.kept.num_rows == 10


def test_embeddings_normalised_and_score_is_their_cosine(result):
    k = result.kept
    img, txt = _matrix(k[S.IMAGE_EMBEDDING]), _matrix(k[S.TEXT_EMBEDDING])
    assert img.shape == txt.shape == (10, 64)
    assert k.schema.field(S.IMAGE_EMBEDDING).type == pa.list_(pa.float16())
    assert k.schema.field(S.CLIP_SCORE).type == pa.float32()
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(k[S.CLIP_SCORE].to_numpy(), (img * txt).sum(axis=1), atol=3e-3)
    assert set(k[S.CLIP_MODEL].to_pylist()) == {"tiny-test-clip/random-init"}


def test_matches_plain_open_clip_reference(result, tiny_clip, table):
    """Same seed, open_clip's own transform per image, full 77-token context, no batching tricks."""
    import open_clip
    import torch

    open_clip.add_model_config(tiny_clip)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip")
    model.eval()
    tok = open_clip.get_tokenizer("tiny-test-clip")
    k = result.kept
    rows = {r[S.UID]: r for r in table.to_pylist()}
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(io.BytesIO(rows[u][S.IMAGE]))) for u in k[S.UID].to_pylist()])
        i = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        t = torch.nn.functional.normalize(model.encode_text(tok([rows[u][S.CAPTION] for u in k[S.UID].to_pylist()])),
                                          dim=-1)
        ref = (i * t).sum(-1).numpy()
    np.testing.assert_allclose(k[S.CLIP_SCORE].to_numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(_matrix(k[S.IMAGE_EMBEDDING]), i.numpy(), atol=2e-3)
    np.testing.assert_allclose(_matrix(k[S.TEXT_EMBEDDING]), t.numpy(), atol=2e-3)


def test_long_caption_truncated_by_the_tokenizer(result, tiny_clip):
    by_uid = {r[S.UID]: r for r in result.table.to_pylist()}
    a, b = by_uid["u12"], by_uid["u13"]  # same first 76 tokens, different endings far beyond the context
    assert a[S.REJECT_REASON] is None and b[S.REJECT_REASON] is None
    assert a[S.TEXT_EMBEDDING] == b[S.TEXT_EMBEDDING]
    assert a[S.TEXT_EMBEDDING] != by_uid["u00"][S.TEXT_EMBEDDING]
    huge = pa.table({S.UID: ["h"], S.URL: ["x"], S.CAPTION: ["word " * 200_000],
                     S.IMAGE: pa.array([by_uid["u00"][S.IMAGE]], pa.binary())})
    out = curate.create_stage("clip_embed", model=tiny_clip)(huge).kept
    assert out.num_rows == 1 and out[S.CLIP_SCORE][0].as_py() is not None


def test_batching_does_not_change_a_single_bit(result, tiny_clip, table):
    """Fixed row alignment and per-caption length buckets: the same row gives the same bits in any batch."""
    one = curate.create_stage("clip_embed", model=tiny_clip, batch_size=64)(table).table
    for col in (S.CLIP_SCORE, S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        assert one[col].to_pylist() == result.table[col].to_pylist(), col
    # every row alone
    singles = [curate.create_stage("clip_embed", model=tiny_clip, batch_size=1)(table.slice(i, 1)).table
               for i in (0, 5, 13)]
    for i, s in zip((0, 5, 13), singles):
        assert s[S.CLIP_SCORE][0].as_py() == result.table[S.CLIP_SCORE][i].as_py()


def test_text_alone_gives_the_bits_a_row_gets(result, tiny_clip, table):
    """``embed_texts`` (a search query: no image forward pass) gives every caption the text embedding the
    stage stored for its row, bit for bit once stored as float16, and normalised."""
    import torch

    from curate.clip_embedder import ClipEmbedder
    from curate.clip_model import load_clip

    emb = ClipEmbedder(load_clip(tiny_clip, None, torch.device("cpu"), 0), torch.device("cpu"), batch_size=4)
    caps = table[S.CAPTION].to_pylist()
    alone = emb.embed_texts(caps)
    assert alone.dtype == np.float32 and np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)
    stored = result.table[S.TEXT_EMBEDDING].to_pylist()
    rows = [i for i, v in enumerate(stored) if v is not None]  # rows whose image failed to decode store none
    assert len(rows) >= 8
    assert np.array_equal(alone[rows].astype(np.float16), np.array([stored[i] for i in rows], np.float16))
    assert emb.embed_texts([]).shape == (0, 0)


def test_random_init_is_loud_and_checkpoints_load(tiny_clip, table, tmp_path, caplog):
    import open_clip
    import torch

    stage = curate.create_stage("clip_embed", model=tiny_clip)
    assert "RANDOM WEIGHTS" in stage.describe()["warning"]
    with caplog.at_level(logging.WARNING, logger="curate"):
        base = stage(table.slice(0, 4)).table
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)
    # save the seed-0 weights, load them into a model initialised with another seed: same output
    open_clip.add_model_config(tiny_clip)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    loaded = curate.create_stage("clip_embed", model=tiny_clip, pretrained=str(ckpt), seed=7)
    assert "warning" not in loaded.describe()
    out = loaded(table.slice(0, 4)).table
    assert out[S.CLIP_SCORE].to_pylist() == base[S.CLIP_SCORE].to_pylist()
    assert set(out[S.CLIP_MODEL].to_pylist()) == {"tiny-test-clip/tiny.pt"}
    other = curate.create_stage("clip_embed", model=tiny_clip, seed=7)(table.slice(0, 4)).table
    assert other[S.CLIP_SCORE].to_pylist() != base[S.CLIP_SCORE].to_pylist()


@pytest.mark.parametrize("params, match", [
    ({"pretrained": "/nonexistent/weights.pt"}, "not found"),
    ({"model": "ViT-B-32", "pretrained": "no_such_tag"}, "laion2b_s34b_b79k"),
    ({"device": "cuda:0"}, "CUDA"),
])
def test_load_errors_are_clear(params, match, tiny_clip, table):
    import torch

    if params.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    stage = curate.create_stage("clip_embed", **{"model": tiny_clip, **params})
    with pytest.raises(StageError, match=match):
        stage(table.slice(0, 1))


def test_resources_and_configs():
    from pathlib import Path

    from curate.config import load_config

    cpu = curate.create_stage("clip_embed")
    assert cpu.resources.stateful and cpu.resources.batch_size == 256 * 4
    gpu = curate.create_stage("clip_embed", num_gpus=1)
    assert gpu.resources.num_gpus == 1 and gpu.resources.batch_size == 256 * 4
    assert curate.create_stage("clip_embed", batch_size=32, pipeline_batches=2).resources.batch_size == 64
    repo = Path(__file__).resolve().parents[1] / "configs"
    for name, model, rule in (("laion2b.yaml", "ViT-B-32", ("min_score", 0.28)),
                              ("datacomp_clip_top30.yaml", "ViT-L-14", ("top_fraction", 0.3))):
        cfg = load_config(repo / name)
        st = {p.stage: p for p in cfg.stages}
        assert st["clip_embed"].model == model and st["clip_embed"].pretrained
        assert getattr(st["clip_score"], rule[0]) == rule[1]
    demo = [p.stage for p in load_config(repo / "demo.yaml").stages]
    assert demo.index("clip_embed") < demo.index("clip_score")
