"""Loading Hugging Face models for the text/vision-language stages, and their offline defaults.

Real models load by hub name or local directory (``from_pretrained``).  Weights
cannot be downloaded in the offline demo and tests, so the default is a small
*randomly initialised* model of a real architecture, built in-process:

* tokenizer: CLIP's byte-level BPE (49,408 tokens), rebuilt from the merges file
  that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), as a
  ``transformers.CLIPTokenizer`` -- token for token what open_clip and
  ``openai/clip-vit-base-patch32`` produce;
* ``random_causal_lm``: GPT-2 (tiny: 2 layers, 64 wide; base: GPT-2 small's shapes);
* ``random_blip``: a BLIP captioner (``BlipForConditionalGeneration`` + ``BlipProcessor``;
  tiny: 2+2 layers, 64 wide, 64x64 images; base: BLIP-base's shapes).

Weights are seeded, so every worker builds the same model.  The tiny ones
use ``initializer_range=0.2`` (10x the default) so that outputs depend visibly on the
input; with the default scale a random model writes the same words for every image.
Everything is imported lazily: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RANDOM_INIT_SCALE = 0.2
TINY_LM_NAME = "random-init tiny GPT-2 (2 layers, d=64, CLIP BPE tokenizer)"
TINY_BLIP_NAME = "random-init tiny BLIP (2+2 layers, d=64, 64px, CLIP BPE tokenizer)"


def random_weights_warning(what: str, param: str) -> str:
    return (f"{what}: RANDOM WEIGHTS -- the output is meaningless; set `{param}` to a real model "
            "(hub name or local path) for real data")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2, CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_bpe_tables() -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: it ships the BPE merges of the offline tokenizer")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # the slice open_clip uses
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges  # type: ignore[return-value]


def clip_bpe_tokenizer():
    """CLIP's tokenizer, built offline from open_clip's bundled merges (bos/eos/pad set)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_tables()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges))


def _seeded(factory, seed: int):
    """``factory()`` under a private, seeded torch RNG: every process builds the same weights."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def random_causal_lm(size: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random-init GPT-2 with CLIP's BPE vocabulary.

    ``tiny``: 2 layers, d=64 (tests, demo); ``base``: GPT-2 small's shapes (12 layers, d=768; benchmarks).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = clip_bpe_tokenizer()
    shape = dict(n_positions=256, n_embd=64, n_layer=2, n_head=2, initializer_range=RANDOM_INIT_SCALE) \
        if size == "tiny" else {}
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **shape)
    return _seeded(lambda: GPT2LMHeadModel(cfg), seed).eval(), tok


def random_blip(size: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """(model, processor): a random-init BLIP captioner (``BlipForConditionalGeneration`` + ``BlipProcessor``).

    ``tiny``: 2+2 layers, d=64, 64 px images (tests, demo); ``base``: BLIP-base's shapes (ViT-B/16 at
    384 px, BERT-base-sized text decoder; benchmarks).
    """
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = clip_bpe_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               sep_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if size == "tiny":
        image_size = 64
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     initializer_range=RANDOM_INIT_SCALE)
        text = dict(ids, max_position_embeddings=128, encoder_hidden_size=64, **small)
        vision = dict(image_size=image_size, patch_size=16, **small)
        extra = dict(projection_dim=64, initializer_range=RANDOM_INIT_SCALE)
    else:
        image_size = 384
        text, vision, extra = ids, dict(image_size=image_size), {}
    cfg = BlipConfig(text_config=text, vision_config=vision, **extra)
    model = _seeded(lambda: BlipForConditionalGeneration(cfg), seed)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    return model.eval(), processor


def dtype_kwarg(dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword for the dtype: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def pick_dtype(dtype: str, device: str, cpu_default: str = "float32"):
    """``auto`` -> bfloat16 on a GPU that supports it (else float16), ``cpu_default`` on the CPU."""
    import torch

    names = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return names[cpu_default]
    return names[dtype]
