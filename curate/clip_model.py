"""open_clip models for curate: loading (tag, local checkpoint or random init) and text encoding.

Used by the ``clip_embed`` stage (with :mod:`curate.clip_embedder`, the batched engine) and
``bench/clip.py``.  Nothing heavy is imported at module import; torch/open_clip come in with
:func:`load_clip`.

* ``pretrained`` is an open_clip tag, a local checkpoint, or empty (seeded random init).
  Weights trained with QuickGELU get it even when the model config lacks it (open_clip
  only warns, and the scores would be wrong).
* :func:`encode_text` trims captions to a given length instead of the full context: exact
  for causal CLIP text towers pooled at EOT, checked numerically at load (else full context).
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The offline default: a scaled-down ViT-B-32 CLIP (same open_clip classes, 224 px, 32 px patches,
#: 6-layer width-192 towers, 15.5M parameters) shipped in curate/clip_configs.  No weights exist for it:
#: it always runs with random weights, for demos and tests only.
DEFAULT_MODEL = "curate-ViT-T-32"
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
RANDOM_WEIGHTS_WARNING = ("{model}: RANDOM WEIGHTS (no pretrained checkpoint) -- embeddings and clip_score "
                          "are meaningless; set `pretrained:` to an open_clip tag or a checkpoint path")

_config_lock = threading.Lock()
_registered: set[str] = set()


def register_model_configs(extra: str | Path | None = None) -> None:
    """Register curate's configs (and ``extra``, a JSON file or folder) with open_clip's registry."""
    import open_clip

    with _config_lock:
        for path in (CONFIG_DIR, extra):
            if path is not None and str(path) not in _registered:
                open_clip.add_model_config(Path(path))
                _registered.add(str(path))


def resolve_model_name(model: str) -> str:
    """An open_clip model name; a path to a ``NAME.json`` model config is registered and gives NAME."""
    p = Path(model).expanduser()
    if model.endswith(".json"):
        if not p.is_file():
            raise FileNotFoundError(f"model config {model} not found")
        register_model_configs(p)
        return p.stem
    register_model_configs()
    return model


def is_checkpoint_path(pretrained: str) -> bool:
    return (os.sep in pretrained or pretrained.startswith((".", "~"))
            or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def model_label(model: str, pretrained: str | None) -> str:
    """The ``clip_model`` value: ``ARCH/TAG``, ``ARCH/FILE`` or ``ARCH/random-init``."""
    arch = Path(model).stem if model.endswith(".json") else model
    if not pretrained:
        return f"{arch}/random-init"
    return f"{arch}/{Path(pretrained).name if is_checkpoint_path(pretrained) else pretrained}"


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast_for(device: Any, precision: str) -> tuple[Any, str]:
    """(autocast context factory, resolved precision) for ``precision`` in auto/fp32/bf16/fp16."""
    import torch

    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


@dataclass
class LoadedClip:
    model: Any
    tokenizer: Any
    preprocess: Any  # open_clip's eval transform (PIL -> normalised float tensor)
    pil_part: Any  # the transforms before ToTensor (PIL -> PIL), or None: use preprocess whole
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    context_length: int
    trim_text: bool
    random_init: bool


def load_clip(model: str, pretrained: str | None, device: Any, seed: int = 0) -> LoadedClip:
    """``open_clip.create_model_and_transforms`` with curate's checks; random init is seeded."""
    import open_clip
    import torch

    name = resolve_model_name(model)
    pretrained = (pretrained or "").strip() or None
    if pretrained and is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {pretrained} not found")
        pretrained = str(path)
    quick_gelu = False
    if pretrained and not is_checkpoint_path(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tags and pretrained not in tags:
            raise ValueError(f"{name} has no pretrained tag {pretrained!r} (known: {', '.join(tags)})")
        # weights trained with QuickGELU (OpenAI's, MetaCLIP...) need it, whatever the config says:
        # open_clip only warns, and the scores would silently be wrong
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu")) and not \
            (open_clip.get_model_config(name) or {}).get("quick_gelu")
        if quick_gelu:
            log.info("%s/%s was trained with QuickGELU: forcing it (same as %s-quickgelu)", name, pretrained, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random init is the same in every worker and every run
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device="cpu",
                                                                    force_quick_gelu=quick_gelu)
    clip = clip.eval().to(device)
    tokenizer = open_clip.get_tokenizer(name)
    size = getattr(clip.visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    ctx = int(getattr(tokenizer, "context_length", None) or getattr(clip, "context_length", 77))
    pil_part, mean, std = _split_preprocess(preprocess, size)
    loaded = LoadedClip(clip, tokenizer, preprocess, pil_part, mean, std, size, ctx, False, pretrained is None)
    loaded.trim_text = _check_trim(loaded, device)
    return loaded


def _split_preprocess(preprocess: Any, size: tuple[int, int]) -> tuple[Any, tuple, tuple]:
    """Split open_clip's Compose into its PIL part and the final ToTensor + Normalize."""
    from PIL import Image
    from torchvision.transforms import Compose

    ts = list(getattr(preprocess, "transforms", []))
    if len(ts) < 2 or type(ts[-1]).__name__ != "Normalize" or "ToTensor" not in type(ts[-2]).__name__:
        log.info("unusual open_clip transform %s: preprocessing whole images per thread", preprocess)
        return None, (), ()
    pil_part = Compose(ts[:-2])
    probe = Image.new("RGB", (size[1] * 2 + 7, size[0] + 3), (10, 200, 30))
    try:
        out = pil_part(probe)
        ok = isinstance(out, Image.Image) and out.size == (size[1], size[0])
    except Exception:  # noqa: BLE001 - anything odd: fall back to the whole transform
        ok = False
    if not ok:
        return None, (), ()
    return pil_part, tuple(float(m) for m in ts[-1].mean), tuple(float(s) for s in ts[-1].std)


def encode_text(loaded: LoadedClip, tokens: Any, trim: bool | None = None, length: int | None = None) -> Any:
    """Text features (not normalised) of a token batch, trimmed to ``length`` positions (default: the
    longest caption) when the model allows it."""
    import torch
    from open_clip.transformer import text_global_pool

    m = loaded.model
    if not (loaded.trim_text if trim is None else trim):
        return m.encode_text(tokens)
    # EOT has the largest id: the longest caption ends at position argmax
    L = length or int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :L]
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:L].to(cast)
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:L, :L]))
    x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    if m.text_projection is None:
        return x
    return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection


def _check_trim(loaded: LoadedClip, device: Any) -> bool:
    """Trimming is exact for causal towers pooled at EOT; verify it on this model before using it."""
    import open_clip
    import torch

    m = loaded.model
    if not (isinstance(m, open_clip.model.CLIP) and getattr(m, "text_pool_type", None) == "argmax"
            and getattr(m, "attn_mask", None) is not None):
        return False
    probe = ["a photo of a cat", "two red motorcycles parked in a garage next to a wall of boxes", ""]
    with torch.inference_mode():
        tokens = loaded.tokenizer(probe).to(device)
        full = m.encode_text(tokens).float()
        try:
            cut = encode_text(loaded, tokens, trim=True).float()
        except Exception as e:  # noqa: BLE001
            log.info("text trimming unavailable for this model (%s)", e)
            return False
    err = float((full - cut).abs().max() / full.abs().max().clamp_min(1e-6))
    if err > 1e-3:
        log.warning("trimmed text encoding differs from the full one (rel. err %.2e): using full context", err)
        return False
    return True
