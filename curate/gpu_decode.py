"""JPEG decoding and CLIP preprocessing as batched tensor ops on the model's device (``clip_embed decode:``).

The CPU path of :mod:`curate.clip_embedder` decodes each image with PIL and applies open_clip's PIL
transforms (resize of the shortest side, centre crop, RGB) in threads.  This module does the same work on
the device: ``torchvision.io.decode_jpeg`` decodes a list of JPEGs at once (nvJPEG on CUDA, libjpeg-turbo
on the CPU), then ``torchvision.transforms.v2.functional`` resizes and crops the uint8 tensors -- images
of one size as one batch -- with the interpolation, antialiasing and sizes read from the model's own
open_clip transform (:func:`tensor_transform`; a transform it cannot mirror disables the path).  The
result is uint8 like PIL's, so both paths end in the same normalisation.  On the CPU (``device="cpu"``)
it is the identical code, which is how the tests check it against the PIL path: the embeddings are not
bit-identical (PIL's and torch's bicubic kernels differ by a few grey levels), see docs/CONTRACT.md for
the measured tolerance.

Hostile input: only rows whose *header* says JPEG, in a mode the decoder converts like PIL (RGB, L), with
at most ``max_pixels`` pixels (:func:`curate.io.images.image_header`) are handed to the decoder; a chunk
of rows sent to the device at once holds at most ``BATCH_PIXELS`` pixels.  When the batched call fails,
rows are decoded one by one, and a row that still fails -- or decodes to another size than its header
claimed -- is returned as failed: the caller decodes it on the CPU path (which gives the row's error if
it is really broken).  Nothing here fails a batch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: image modes whose ``decode_jpeg(mode=RGB)`` output equals PIL's ``convert("RGB")`` (CMYK/YCCK do not)
JPEG_MODES = ("RGB", "L")
#: default per-row bound of the device path (larger rows take the CPU path): 4096 x 4096
MAX_PIXELS = 4096 * 4096
#: at most this many header pixels are decoded by one call on the device (~0.8 GB of uint8 RGB)
BATCH_PIXELS = 1 << 28


@dataclass(frozen=True)
class TensorTransform:
    """open_clip's PIL eval transform (before ToTensor) as tensor-op parameters."""

    resize: Any  # torchvision Resize.size (int: shortest side; sequence: (h, w)), or None
    max_size: int | None
    interpolation: Any  # torchvision InterpolationMode
    antialias: bool
    crop: tuple[int, int] | None
    out_size: tuple[int, int]


def tensor_transform(pil_part: Any, out_size: tuple[int, int]) -> TensorTransform | None:
    """Read resize/crop parameters from open_clip's PIL transform (``LoadedClip.pil_part``); None when it
    holds anything this module cannot reproduce as tensor ops."""
    from torchvision import transforms as T

    resize = crop = None
    for t in list(getattr(pil_part, "transforms", [])):
        if isinstance(t, T.Resize) and resize is None and crop is None:
            resize = t
        elif isinstance(t, T.CenterCrop) and crop is None:
            crop = t
        elif type(t).__name__ == "MaybeConvertMode" and getattr(t, "mode", "RGB") == "RGB":
            continue  # decode_jpeg(mode=RGB) converts
        elif getattr(t, "__name__", "") == "_convert_to_rgb":
            continue  # older open_clip
        else:
            log.info("tensor decode path unavailable: cannot mirror %r as tensor ops", t)
            return None
    if resize is None and crop is None:
        return None
    size = None if crop is None else tuple(crop.size) if len(crop.size) == 2 else (crop.size[0], crop.size[0])
    return TensorTransform(resize=None if resize is None else resize.size,
                           max_size=None if resize is None else resize.max_size,
                           interpolation=None if resize is None else resize.interpolation,
                           antialias=True if resize is None else bool(resize.antialias),
                           crop=size, out_size=tuple(out_size))


def jpeg_size(data: bytes | None, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) from the header when the row may take the device path, else None."""
    from curate.io.images import image_header

    if not data:
        return None
    try:
        fmt, mode, w, h = image_header(data)
    except Exception:  # noqa: BLE001 - unreadable header: the CPU path gives the row its error
        return None
    if fmt != "JPEG" or mode not in JPEG_MODES or w < 1 or h < 1 or w * h > max_pixels:
        return None
    return h, w


class TensorDecoder:
    """Decode + resize + crop a list of JPEGs on ``device`` (uint8 ``(3, H, W)`` results)."""

    def __init__(self, transform: TensorTransform, device: Any) -> None:
        self.tf = transform
        self.device = device

    def _decode(self, datas: list[bytes]) -> list[Any]:
        """Decoded (3, h, w) uint8 tensors on the device, None for rows that failed."""
        import numpy as np
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # read-only bytes: decode_jpeg only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = [torch.from_numpy(np.frombuffer(d, np.uint8)) for d in datas]
        try:
            out = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
            return list(out)
        except Exception as e:  # noqa: BLE001 - one bad row fails the call: retry row by row
            log.debug("batched decode_jpeg failed (%s): decoding %d rows one by one", e, len(raw))
        got = []
        for r in raw:
            try:
                got.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
            except Exception:  # noqa: BLE001 - this row goes to the CPU path
                got.append(None)
        return got

    def _preprocess(self, x: Any) -> Any:
        """(B, 3, H, W) uint8 of one size -> (B, 3, h, w) uint8, as open_clip's PIL transform does."""
        import torchvision.transforms.v2.functional as F

        tf = self.tf
        if tf.resize is not None:
            size = [tf.resize] if isinstance(tf.resize, int) else list(tf.resize)
            x = F.resize(x, size, interpolation=tf.interpolation, max_size=tf.max_size, antialias=tf.antialias)
        if tf.crop is not None:
            x = F.center_crop(x, list(tf.crop))
        return x

    def __call__(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[Any]:
        """Preprocessed (3, h, w) uint8 device tensors in order; None where the row must take the CPU path."""
        import torch

        out: list[Any] = [None] * len(datas)
        lo = 0
        while lo < len(datas):  # chunks of at most BATCH_PIXELS header pixels
            hi, px = lo, 0
            while hi < len(datas) and (hi == lo or px + sizes[hi][0] * sizes[hi][1] <= BATCH_PIXELS):
                px += sizes[hi][0] * sizes[hi][1]
                hi += 1
            imgs = self._decode(datas[lo:hi])
            groups: dict[tuple[int, int], list[int]] = {}
            for j, im in enumerate(imgs):
                if im is not None and tuple(im.shape) == (3, *sizes[lo + j]):  # the header did not lie
                    groups.setdefault(tuple(im.shape[1:]), []).append(j)
            for rows in groups.values():
                res = self._preprocess(torch.stack([imgs[j] for j in rows]))
                if tuple(res.shape[2:]) != tuple(self.tf.out_size):
                    continue  # transform gave another size: CPU path
                for j, r in zip(rows, res):
                    out[lo + j] = r
            lo = hi
        return out
