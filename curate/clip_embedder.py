"""Batched CLIP embedding of encoded images and captions (the engine of ``clip_embed``).

Throughput design:

* Decoding and the PIL part of open_clip's own eval transform (resize, centre
  crop, RGB) run in a thread pool (PIL releases the GIL), each thread writing
  uint8 pixels straight into a (pinned, on CUDA) batch buffer.  ``ToTensor`` +
  ``Normalize`` then run once per batch on the device, so a quarter of the
  bytes cross PCIe and the CPU never touches float pixels.
* Forward passes run in batches under ``torch.inference_mode`` (bf16/fp16
  autocast on CUDA); while batch *k* runs, the threads decode the next ones.
  On CPU several single-threaded forward passes run at once (one per core),
  which scales without OpenMP's barrier stalls on busy machines.
* Captions are tokenized once per call and encoded in groups of similar length,
  each trimmed to its length bucket instead of the full 77-token context
  (exact for causal CLIP text towers pooled at EOT; checked numerically at
  load, else the full context is used).
* ``decode="gpu"``: JPEG rows are decoded, resized and cropped as tensor ops on the model's device
  (:mod:`curate.gpu_decode`, batched nvJPEG on CUDA); the threads then only read headers (and
  decode the other rows with PIL).  A row the device cannot decode falls back to PIL, alone.
* Batch invariance: forward batches are padded to a multiple of 8 rows and a
  caption's length bucket depends only on itself, so a row's embedding is
  bit-identical whatever the batching (shard size, runner, thread count) --
  verified on CPU; GPU libraries may pick different kernels per batch shape.
"""

from __future__ import annotations

import io
import os
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from curate.clip_model import LoadedClip, autocast_for, encode_text

#: Captions are cut to this many characters per context token before BPE (the tokenizer keeps
#: the first context_length tokens anyway; this only bounds the work on pathological captions).
CHARS_PER_TOKEN_BOUND = 50
#: forward batches are padded to a multiple of this many rows (and captions trimmed to a multiple of
#: this many tokens): CPU GEMM kernels give bit-identical rows only when M is a multiple of 8.
ROW_ALIGN = 8
#: forward batches decoded ahead of those in flight (bounds host memory per call)
PREFETCH_BATCHES = 2
#: a row queued for the tensor (device) decode path
_TENSOR = "\0tensor"


def _aligned(rows: int) -> int:
    return (rows + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN


def _pad_rows(t: Any) -> Any:
    import torch

    extra = _aligned(t.shape[0]) - t.shape[0]
    return torch.cat([t, t.new_zeros((extra,) + tuple(t.shape[1:]))]) if extra else t


def forward_workers(device: Any, requested: int | None) -> int:
    """Forward passes run at once: 1 on a GPU; on CPU ``requested``, else OMP_NUM_THREADS (Ray sets it
    per worker), else every core.  Each CPU forward runs single-threaded (intra-op 1): independent
    passes in parallel scale like one multi-threaded pass on an idle machine, and do not collapse on
    a busy one, where OpenMP teams spin at their barriers waiting for descheduled threads."""
    if device.type != "cpu":
        return 1
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)


@dataclass
class Embeddings:
    image: np.ndarray  # (n, d) float16, L2-normalised (rows with errors: zeros)
    text: np.ndarray  # (n, d) float16, L2-normalised
    score: np.ndarray  # (n,) float32 cosine of the float32 normalised embeddings
    errors: list[str | None]  # per row: why the image could not be decoded, else None


class ClipEmbedder:
    """Batched image + caption embedding: threads decode, ``workers`` threads run forward passes."""

    def __init__(self, loaded: LoadedClip, device: Any, precision: str = "auto", batch_size: int | None = None,
                 decode_threads: int | None = None, threads: int | None = None, decode: str = "cpu",
                 max_decode_pixels: int | None = None) -> None:
        import torch
        from concurrent.futures import ThreadPoolExecutor

        self.clip = loaded
        self.device = device
        self.autocast, self.precision = autocast_for(device, precision)
        self.batch_size = batch_size or (256 if device.type == "cuda" else 64)
        self.pin = device.type == "cuda"
        self.decode_threads = decode_threads or min(32, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="clip-decode")
        self.workers = forward_workers(device, threads)
        self.compute = ThreadPoolExecutor(self.workers, thread_name_prefix="clip-forward")
        h, w = loaded.image_size
        self.slot_shape = (h, w, 3) if loaded.pil_part is not None else (3, h, w)
        self.slot_dtype = torch.uint8 if loaded.pil_part is not None else torch.float32
        if loaded.pil_part is not None:  # ToTensor + Normalize as one multiply-add: x * scale + shift
            mean = torch.tensor(loaded.mean, dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(loaded.std, dtype=torch.float64).view(1, 3, 1, 1)
            self.scale = (1.0 / (255.0 * std)).float().to(device)
            self.shift = (-mean / std).float().to(device)
        self.max_chars = loaded.context_length * CHARS_PER_TOKEN_BOUND
        self.tensor = None  # the device decode path (decode="gpu"), when the model's transform allows it
        if decode == "gpu" and loaded.pil_part is not None:
            from curate.gpu_decode import MAX_PIXELS, TensorDecoder, tensor_transform

            tf = tensor_transform(loaded.pil_part, loaded.image_size)
            self.tensor = TensorDecoder(tf, device) if tf is not None else None
            self.max_decode_pixels = max_decode_pixels or MAX_PIXELS
        self.decode = "gpu" if self.tensor is not None else "cpu"
        #: rows decoded per path: tensor (on the device), cpu (PIL), fallback (device failed, then PIL)
        self.counts: Counter = Counter()
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.compute.shutdown(wait=False, cancel_futures=True)

    # -- CPU side --------------------------------------------------------------------------------
    def _decode_into(self, data: bytes | None, slot: Any) -> str | None:
        from PIL import Image

        if data is None:
            slot.zero_()
            return "no image bytes"
        try:
            with Image.open(io.BytesIO(data)) as im:
                if self.clip.pil_part is None:
                    slot.copy_(self.clip.preprocess(im))
                    return None
                out = self.clip.pil_part(im)
                if out.mode != "RGB":
                    out = out.convert("RGB")
                arr = np.asarray(out)
            if arr.shape != self.slot_shape:
                raise ValueError(f"preprocessed to {arr.shape}, expected {self.slot_shape}")
            np.copyto(slot.numpy(), arr)
            return None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a per-row outcome
            slot.zero_()
            return f"{type(e).__name__}: {e}"[:500]

    def _route(self, data: bytes | None, slot: Any) -> Any:
        """In a decode thread: a JPEG the device may decode -> (h, w) from its header (the row waits for
        the batched device decode); any other row is decoded by PIL into its slot here."""
        if self.tensor is not None:
            from curate.gpu_decode import jpeg_size

            size = jpeg_size(data, self.max_decode_pixels)
            if size is not None:
                return _TENSOR, size
        return self._decode_into(data, slot)

    def _device_decode(self, datas: list, buf: Any, results: list) -> tuple[list[str | None], list, list]:
        """Batched device decode of the rows routed to it; failures are decoded by PIL into ``buf``.
        Returns (errors per row, rows decoded on the device, their uint8 (3, h, w) images)."""
        rows = [j for j, r in enumerate(results) if isinstance(r, tuple) and r[0] == _TENSOR]
        routed = set(rows)
        errors = [None if j in routed else r for j, r in enumerate(results)]
        got = self.tensor([datas[j] for j in rows], [results[j][1] for j in rows]) if rows else []
        done, images, failed = [], [], 0
        for j, im in zip(rows, got):
            if im is None:
                failed += 1
                errors[j] = self._decode_into(datas[j], buf[j])
            else:
                done.append(j)
                images.append(im)
        with self._count_lock:
            self.counts.update(tensor=len(done), cpu=len(results) - len(rows), fallback=failed)
        return errors, done, images

    def tokenize(self, captions: list[str | None]) -> Any:
        return self.clip.tokenizer([(c or "")[: self.max_chars] for c in captions])

    def _submit_decode(self, images: list[bytes | None], start: int) -> tuple[int, Any, list]:
        """Queue the decoding of one forward batch into a fresh (pinned) buffer."""
        import torch

        rows = min(self.batch_size, len(images) - start)
        with torch.inference_mode(False):  # the decoding threads write into it outside inference mode
            buf = torch.empty((_aligned(rows),) + self.slot_shape, dtype=self.slot_dtype, pin_memory=self.pin)
        buf[rows:].zero_()  # padding rows: fixed shapes keep every row's result batch-independent
        futs = [self.pool.submit(self._route, images[start + j], buf[j]) for j in range(rows)]
        return start, buf, futs, images[start: start + rows]

    # -- forward passes (run in the compute threads; inference mode and autocast are per thread) ---
    def _to_device(self, t: Any) -> Any:
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _image_task(self, job: tuple[int, Any, list, list]) -> tuple[int, Any, list[str | None]]:
        import torch
        import torch.nn.functional as F

        start, buf, futs, datas = job
        errors, done, images = [f.result() for f in futs], [], []
        if self.tensor is not None:
            with torch.inference_mode():
                errors, done, images = self._device_decode(datas, buf, errors)
        else:
            with self._count_lock:
                self.counts.update(cpu=len(futs))
        with torch.inference_mode():
            x = buf.to(self.device, non_blocking=True)
            if done:  # (B, H, W, 3) like the PIL rows
                x[torch.tensor(done, device=self.device)] = torch.stack(images).permute(0, 2, 3, 1)
            if self.clip.pil_part is not None:
                x = torch.addcmul(self.shift, x.permute(0, 3, 1, 2).float(), self.scale)
            with self.autocast():
                feats = self.clip.model.encode_image(x)
            return start, F.normalize(feats[: len(futs)].float(), dim=-1), errors

    def _text_task(self, tokens: Any, idx: Any, length: int) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            with self.autocast():
                feats = encode_text(self.clip, self._to_device(_pad_rows(tokens[idx, :length])), length=length)
            return idx, F.normalize(feats[: idx.numel()].float(), dim=-1)

    def _text_jobs(self, tokens: Any) -> list[tuple[Any, int]]:
        """(rows, length) groups: captions grouped by their own length rounded up to a multiple of
        ``ROW_ALIGN`` and trimmed to it, so a caption's shapes never depend on its neighbours."""
        import torch

        n, ctx = tokens.shape
        if self.clip.trim_text:
            ends = tokens.argmax(dim=-1) + 1
            bucket = torch.clamp((ends + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN, max=ctx)
        else:
            bucket = torch.full((n,), ctx, dtype=torch.long)
        jobs = []
        for length in torch.unique(bucket).tolist():
            rows = torch.nonzero(bucket == length).flatten()
            jobs += [(rows[i: i + self.batch_size], int(length)) for i in range(0, rows.numel(), self.batch_size)]
        return jobs

    def embed(self, images: list[bytes | None], captions: list[str | None]) -> Embeddings:
        if not images:
            z = np.zeros((0, 0), np.float16)
            return Embeddings(z, z, np.zeros(0, np.float32), [])
        with self._one_thread():
            return self._embed(images, captions)

    def embed_texts(self, captions: list[str]) -> np.ndarray:
        """Normalised text embeddings (float32) of ``captions`` alone, computed as :meth:`embed` computes the
        text half of a row (same jobs, same trimming): a query needs no image forward pass (a search's text
        took 43 ms through :meth:`embed` with a placeholder image, 2.5 ms without, on 2 cores)."""
        import torch

        if not captions:
            return np.zeros((0, 0), np.float32)
        with self._one_thread(), torch.inference_mode():
            return self._gather_texts(len(captions), self._submit_texts(self.tokenize(list(captions)))).cpu().numpy()

    @contextmanager
    def _one_thread(self) -> Iterator[None]:
        import torch

        single = self.device.type == "cpu" and torch.get_num_threads() != 1
        previous = torch.get_num_threads()
        if single:
            torch.set_num_threads(1)  # scoped: other stages of the process keep theirs
        try:
            yield
        finally:
            if single:
                torch.set_num_threads(previous)

    def _embed(self, images: list[bytes | None], captions: list[str | None]) -> Embeddings:
        import torch

        n = len(images)
        starts = list(range(0, n, self.batch_size))
        window = self.workers + PREFETCH_BATCHES  # forward batches decoded or in flight at once
        text_futs = self._submit_texts(self.tokenize(captions))  # while the first batches decode
        image_futs = [self.compute.submit(self._image_task, self._submit_decode(images, s)) for s in starts[:window]]
        with torch.inference_mode():
            return self._gather(n, starts, window, images, text_futs, image_futs)

    def _submit_texts(self, tokens: Any) -> list:
        return [self.compute.submit(self._text_task, tokens, idx, length) for idx, length in self._text_jobs(tokens)]

    def _gather_texts(self, n: int, futs: list) -> Any:
        """The ``n`` rows' normalised text features (float32, on the device) from :meth:`_submit_texts`'s jobs."""
        import torch

        txt = None
        for f in futs:
            idx, feats = f.result()
            if txt is None:
                txt = torch.empty((n, feats.shape[1]), dtype=torch.float32, device=self.device)
            txt[idx.to(self.device)] = feats
        return txt

    def _gather(self, n: int, starts: list[int], window: int, images: list, text_futs: list,
                image_futs: list) -> Embeddings:
        import torch

        txt = self._gather_texts(n, text_futs)
        errors: list[str | None] = [None] * n
        img_parts, scores = [], []
        for k in range(len(starts)):
            start, img, errs = image_futs[k].result()
            if k + window < len(starts):
                image_futs.append(self.compute.submit(self._image_task, self._submit_decode(images, starts[k + window])))
            errors[start: start + len(errs)] = errs
            scores.append((img * txt[start: start + img.shape[0]]).sum(dim=-1))
            img_parts.append(img.half())
        image = torch.cat(img_parts).cpu().numpy()
        score = torch.cat(scores).cpu().numpy().astype(np.float32)
        return Embeddings(image, txt.half().cpu().numpy(), score, errors)
