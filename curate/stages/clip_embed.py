"""``clip_embed``: open_clip image and caption embeddings and their cosine (the DataComp CLIP score).

Writes L2-normalised ``image_embedding`` / ``text_embedding`` (float16),
``clip_score`` (cosine of the float32 normalised embeddings, computed before
the cast) and ``clip_model``.  An image that cannot be decoded is rejected
with ``decode_failed`` (the rest of the batch goes on); a caption longer than
the tokenizer's context is truncated by the tokenizer.

``pretrained`` is an open_clip tag (fetched once when online, then cached), a
local checkpoint path, or empty: the model is then randomly initialised
(seeded, identical in every worker) and a warning says so in the log,
stats.json and the report.  The default model, ``curate-ViT-T-32``, is a
scaled-down ViT-B-32 that only ever runs with random weights (offline demo).

Throughput: see :mod:`curate.clip_embedder` (threaded decoding into pinned
buffers, batched forward under ``inference_mode`` with bf16/fp16 autocast on
CUDA, decode of batch k+1 overlapping the forward of batch k).  Under the Ray
runner the stage is an actor pool; give it ``num_gpus: 1`` to put one model
per GPU.

Decoding (``decode``): ``cpu`` -- PIL in threads; ``gpu`` -- JPEG rows decoded in batches with
``torchvision.io.decode_jpeg`` on the model's device and resized/cropped/normalised there as tensor ops
mirroring the model's open_clip transform (:mod:`curate.gpu_decode`); other formats, rows over
``max_decode_pixels`` and rows the device fails on take the CPU path, row by row.  ``auto`` (default):
``gpu`` when the model runs on CUDA, else ``cpu``.  ``gpu`` with the model on the CPU runs the same
tensor path on the CPU (torchvision's libjpeg decoder; a warning says so) -- what the tests compare with
the PIL path.  The rows decoded on each path are counted (``ClipEmbed.decode_counts``, logged when the
stage is torn down).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.clip_model import DEFAULT_MODEL, RANDOM_WEIGHTS_WARNING, model_label
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)


class ClipEmbedParams(StageParams):
    stage: Literal["clip_embed"] = "clip_embed"
    model: str = Field(DEFAULT_MODEL, description="open_clip architecture (e.g. ViT-B-32, ViT-L-14), or a path to "
                       "an open_clip model-config NAME.json; default: curate-ViT-T-32, random weights only")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (e.g. laion2b_s34b_b79k), a local "
                                   "checkpoint path, or empty/null: random init (loud warning)")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on CUDA (fp16 if unsupported), fp32 on CPU")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass (default 256 on CUDA, 64 on "
                                   "CPU); each process() call gets (batch_size or 256) x pipeline_batches rows")
    pipeline_batches: int = Field(4, ge=1, description="sizes the calls: decoding of the next forward batches "
                                  "overlaps the forward pass of the current one")
    decode_threads: int | None = Field(None, ge=1, description="threads decoding/resizing images (default: "
                                       "the machine's cores, at most 32)")
    threads: int | None = Field(None, ge=1, description="CPU only: forward passes running at once, each "
                                "single-threaded (default: OMP_NUM_THREADS if set, e.g. by Ray, else all cores)")
    seed: int = Field(0, description="seed of the random initialisation (random weights only)")
    decode: Literal["cpu", "gpu", "auto"] = Field(
        "auto", description="where JPEGs are decoded and preprocessed: cpu (PIL threads), gpu (batched "
        "decode_jpeg + tensor ops on the model's device; other formats and failed rows: CPU), auto: gpu "
        "when the model runs on CUDA")
    max_decode_pixels: int = Field(4096 * 4096, ge=1, description="decode gpu: JPEGs whose header claims more "
                                   "pixels take the CPU path (bounds device memory per row)")


@register
class ClipEmbed(MapStage):
    name = "clip_embed"
    Params = ClipEmbedParams
    needs = (S.IMAGE, S.CAPTION)
    produces = (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING, S.CLIP_SCORE, S.CLIP_MODEL)
    default_resources = Resources(num_cpus=1.0, num_gpus=0.0, batch_size=1024, stateful=True)
    params: ClipEmbedParams

    @property
    def resources(self) -> Resources:
        r = super().resources  # rows per call: the device is only known in setup(), so size for a GPU
        rows = (self.params.batch_size or 256) * self.params.pipeline_batches
        return Resources(r.num_cpus, r.num_gpus, rows, r.concurrency, r.stateful)

    @property
    def label(self) -> str:
        return model_label(self.params.model, self.params.pretrained)

    def setup(self) -> None:
        from curate.clip_embedder import ClipEmbedder
        from curate.clip_model import load_clip, resolve_device

        p = self.params
        try:
            device = resolve_device(p.device)
            loaded = load_clip(p.model, p.pretrained, device, p.seed)
        except Exception as e:  # noqa: BLE001 - bad name/tag/path, offline without cache...
            hint = "" if not p.pretrained else " (offline? put the weights in the open_clip/HF cache or give a path)"
            raise StageError(f"clip_embed: cannot load model {p.model!r} pretrained={p.pretrained!r}: {e}{hint}") from e
        decode = p.decode if p.decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
        if p.decode == "gpu" and device.type != "cuda":
            log.warning("clip_embed: decode: gpu but the model runs on %s: the tensor decode path runs there "
                        "(torchvision's CPU JPEG decoder), not on a GPU", device)
        self._embedder = ClipEmbedder(loaded, device, p.precision, p.batch_size, p.decode_threads, p.threads,
                                      decode, p.max_decode_pixels)
        if decode == "gpu" and self._embedder.decode != "gpu":
            log.warning("clip_embed: decode: gpu unavailable for %s (its transform has no tensor equivalent): "
                        "decoding on the CPU", p.model)
        if loaded.random_init:
            log.warning(RANDOM_WEIGHTS_WARNING.format(model=p.model))
        e = self._embedder
        log.info("clip_embed: %s on %s (%s, batch %d, %d forward worker(s), %d decode threads, decode %s, "
                 "text trimming %s)", self.label, device, e.precision, e.batch_size, e.workers, e.decode_threads,
                 e.decode, "on" if loaded.trim_text else "off")

    @property
    def decode_counts(self) -> dict[str, int]:
        """Rows decoded since setup: ``tensor`` (on the model's device), ``cpu`` (PIL: decode cpu, other
        formats, over max_decode_pixels), ``fallback`` (the device failed, then PIL)."""
        e = getattr(self, "_embedder", None)
        return {k: int(e.counts.get(k, 0)) if e else 0 for k in ("tensor", "cpu", "fallback")}

    def teardown(self) -> None:
        c = self.decode_counts
        if sum(c.values()):
            log.info("clip_embed: rows decoded on the device %d, on the CPU %d, device failures redone on the "
                     "CPU %d", c["tensor"], c["cpu"], c["fallback"])
        e = getattr(self, "_embedder", None)
        if e is not None:
            e.close()

    def process(self, table: pa.Table) -> pa.Table:
        out = self._embedder.embed(table[S.IMAGE].to_pylist(), table[S.CAPTION].to_pylist())
        failed = np.array([e is not None for e in out.errors], dtype=bool)
        table = with_column(table, S.IMAGE_EMBEDDING, _list_f16(out.image, failed))
        table = with_column(table, S.TEXT_EMBEDDING, _list_f16(out.text, failed))
        table = with_column(table, S.CLIP_SCORE, pa.array(out.score, pa.float32(), mask=failed))
        table = with_column(table, S.CLIP_MODEL, pa.array([None if f else self.label for f in failed], pa.string()))
        if failed.any():
            table = self.reject(table, pa.array(failed), "decode_failed", out.errors, "decode_error")
        return table

    def describe(self) -> dict[str, Any]:
        p = self.params
        info: dict[str, Any] = {"model": self.label, "pretrained": p.pretrained or None, "device": p.device,
                                "precision": p.precision, "decode": p.decode, "batch_size": p.batch_size or "auto (256 cuda / 64 cpu)"}
        if not (p.pretrained or "").strip():
            info["warning"] = RANDOM_WEIGHTS_WARNING.format(model=p.model)
        return info


def _list_f16(matrix: np.ndarray, null: np.ndarray) -> pa.Array:
    """(n, d) float16 -> list<float16> with nulls where ``null``."""
    n = matrix.shape[0]
    d = matrix.shape[1] if matrix.ndim == 2 else 0
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if d else np.zeros(n + 1, np.int32))
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float16).reshape(-1), pa.float16())
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float16()), mask=pa.array(null))
