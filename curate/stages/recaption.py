"""``recaption``: write a synthetic caption for each image with a vision-language model.

Any image-to-text model of transformers, by hub name or local directory, through
its ``AutoProcessor``: BLIP / BLIP-2 (plain prefix prompt such as ``"a picture
of"``), Florence-2 (task prompt ``"<MORE_DETAILED_CAPTION>"``), LLaVA-style models
and Qwen2-VL (chat models: the prompt is wrapped by the processor's chat template
with the image, ``prompt_format: auto``).  Images are decoded, processed and
generated in batches of ``gen_batch_size`` (left padding for decoder-only models,
so one batch's captions equal one-by-one generation with greedy/beam decoding).
On a GPU the model runs in bf16; the same code runs on the CPU, in float64 by
default there, so that float rounding (which depends on the batch shape and thread
count) cannot flip a near-tied token: the local and Ray runners write the same
captions.  Without ``model`` a tiny randomly initialised BLIP is used (offline
demo/tests) and a warning says so.  On a GPU cluster give the stage ``num_gpus``
(e.g. 1: one actor per GPU under the Ray runner; Ray hides GPUs from workers that
did not ask for one).

It is the most expensive stage, so it belongs last: it only sees rows that passed
every earlier filter.  ``only_kept: false`` also captions rows rejected earlier, in any segment
(that have an image) without changing their rejection, so a later threshold change
needs no new recaptioning.

Writes ``recaption`` (only the generated text, never the prompt), ``recaption_model``
and ``training_caption`` chosen by ``caption_mode``: ``original`` (the alt-text),
``synthetic`` (the recaption; the alt-text where generation gave nothing) or ``fused``
(alt-text followed by the synthetic description, as LaCLIP/VeCLIP/DreamLIP combine
them; ``fuse_template`` to change the format).  ``caption`` is never modified.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)


class RecaptionParams(StageParams):
    stage: Literal["recaption"] = "recaption"
    model: str | None = Field(None, description="hub name or local directory of an image-to-text model "
                                                "(empty: tiny random-init BLIP, offline)")
    prompt: str | None = Field(None, description="text prompt: BLIP prefix, Florence-2 task token, or the "
                                                 "instruction of a chat model")
    prompt_format: Literal["auto", "plain", "chat"] = Field(
        "auto", description="chat: wrap prompt + image with the processor's chat template; auto: chat when the "
                            "processor has one")
    max_new_tokens: int = Field(40, ge=1, description="tokens generated at most")
    num_beams: int = Field(1, ge=1, description="beam search width (1: greedy or sampling)")
    do_sample: bool = Field(False, description="sample instead of greedy/beam search")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int | None = Field(None, ge=1, description="top-k sampling")
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = Field(0, description="seeds sampling (per batch) and the random-init offline model")
    gen_batch_size: int = Field(16, ge=1, description="images per generate() call")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float64", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on a GPU; float64 on the CPU (greedy/beam captions then do not depend "
                            "on the batching, thread count or runner)")
    revision: str | None = Field(None, description="model revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the hub (Florence-2 "
                                                       "before transformers had it)")
    only_kept: bool = Field(True, description="false: also caption rows rejected by earlier stages")
    caption_mode: Literal["original", "synthetic", "fused"] = Field(
        "original", description="what training_caption holds: alt-text, recaption, or both fused")
    fuse_template: str | None = Field(None, description="format of fused captions with {caption} and {recaption} "
                                                        "(default: alt-text, '. ' if it has no end punctuation, "
                                                        "recaption)")


_END = re.compile(r"[.!?。！？]$")


def fuse(caption: str | None, recaption: str | None, template: str | None = None) -> str | None:
    """Alt-text + synthetic description (either alone when the other is empty)."""
    cap, rec = (caption or "").strip(), (recaption or "").strip()
    if not rec or not cap:
        return cap or rec or caption
    if template:
        return template.format(caption=cap, recaption=rec)
    return f"{cap} {rec}" if _END.search(cap) else f"{cap}. {rec}"


def training_captions(captions: list[str | None], recaps: list[str | None], mode: str,
                      template: str | None = None) -> list[str | None]:
    if mode == "original":
        return list(captions)
    if mode == "synthetic":
        return [r if r and r.strip() else c for c, r in zip(captions, recaps)]
    return [fuse(c, r, template) for c, r in zip(captions, recaps)]


def _decode(data: bytes | None):
    from PIL import Image

    if data is None:
        raise ValueError("no image")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@register
class Recaption(MapStage):
    name = "recaption"
    Params = RecaptionParams
    needs = (S.IMAGE, S.CAPTION)
    produces = (S.RECAPTION, S.RECAPTION_MODEL, S.TRAINING_CAPTION)
    default_resources = Resources(num_cpus=1.0, batch_size=64, stateful=True)
    params: RecaptionParams

    # -- setup ----------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from curate.stages.hf_models import TINY_BLIP_NAME, pick_device, pick_dtype, random_blip

        p = self.params
        try:
            self.device = pick_device(p.device)
            self.dtype = pick_dtype(p.dtype, self.device, cpu_default="float64")
            if p.model:
                self.model, self.processor = self._load(p.model)
                self.model_name = f"{p.model}@{p.revision}" if p.revision else p.model
            else:
                self.model, self.processor = random_blip("tiny", p.seed)
                self.model = self.model.to(self.dtype)
                self.model_name = f"{TINY_BLIP_NAME} [random weights]"
                log.warning(self._warning())
        except (OSError, RuntimeError, ValueError) as e:
            raise StageError(f"stage {self.id!r}: cannot load the captioning model {p.model!r}: {e}") from e
        self.model.to(self.device)
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        if not self.encoder_decoder and hasattr(self.tokenizer, "padding_side"):
            self.tokenizer.padding_side = "left"  # decoder-only generation continues right after the prompt
        has_template = bool(getattr(self.processor, "chat_template", None))
        self.text = self._prompt_text(p.prompt_format == "chat" or (p.prompt_format == "auto" and has_template))
        self._torch = torch

    def _load(self, name: str):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        from curate.stages.hf_models import dtype_kwarg

        p = self.params
        kw = dict(revision=p.revision, trust_remote_code=p.trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, **kw)
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, **dtype_kwarg(self.dtype), **kw)
        except ValueError:  # remote-code models registered as causal LMs (older Florence-2 checkpoints)
            model = AutoModelForCausalLM.from_pretrained(name, **dtype_kwarg(self.dtype), **kw)
        return model.eval(), processor

    def _prompt_text(self, chat: bool) -> str | None:
        prompt = self.params.prompt
        if not chat:
            return prompt or None
        content: list[dict[str, str]] = [{"type": "image"}]
        if prompt:
            content.append({"type": "text", "text": prompt})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _warning(self) -> str:
        from curate.stages.hf_models import TINY_BLIP_NAME, random_weights_warning

        return random_weights_warning(f"recaption model {TINY_BLIP_NAME}", "model")

    # -- generation -------------------------------------------------------------------
    def _gen_kwargs(self) -> dict[str, Any]:
        p = self.params
        kw: dict[str, Any] = dict(max_new_tokens=p.max_new_tokens, num_beams=p.num_beams, do_sample=p.do_sample,
                                  repetition_penalty=p.repetition_penalty)
        if p.do_sample:
            kw.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        return kw

    def generate(self, images: list, key: str = "") -> list[str]:
        """Captions for PIL images, one generate() call (sampling seeded by ``seed`` and ``key``)."""
        torch = self._torch
        kw: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.text is not None:
            kw.update(text=[self.text] * len(images), padding=True)
        inputs = self.processor(**kw)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  if hasattr(v, "to") else v for k, v in inputs.items()}
        seed = int.from_bytes(hashlib.sha256(f"{self.params.seed}:{key}".encode()).digest()[:4], "little")
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, **self._gen_kwargs())
        prompt_ids = inputs.get("input_ids")
        texts = []
        for r, seq in enumerate(out.tolist()):
            if prompt_ids is not None and not self.encoder_decoder:  # drop the echoed prompt (and left pads)
                prompt = prompt_ids[r].tolist()
                j = 0
                while j < min(len(seq), len(prompt)) and seq[j] == prompt[j]:
                    j += 1
                seq = seq[j:]
            texts.append(self.tokenizer.decode(seq, skip_special_tokens=True).strip())
        return texts

    def caption_images(self, table: pa.Table) -> tuple[list[str | None], list[str | None]]:
        """(recaption per row, decode error per row), in gen_batch_size chunks."""
        n = table.num_rows
        recaps: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        images, rows = [], []
        for i, data in enumerate(table[S.IMAGE].to_pylist()):
            try:
                images.append(_decode(data))
                rows.append(i)
            except Exception as e:  # noqa: BLE001 - one bad image never stops the batch
                errors[i] = f"cannot decode the image: {e}"
        uids = table[S.UID].to_pylist()
        bs = self.params.gen_batch_size
        for s in range(0, len(rows), bs):
            chunk = rows[s: s + bs]
            for i, text in zip(chunk, self.generate(images[s: s + bs], uids[chunk[0]] or "")):
                recaps[i] = text
        return recaps, errors

    # -- stage ----------------------------------------------------------------------------
    def _set_columns(self, table: pa.Table, recaps: list[str | None]) -> pa.Table:
        p = self.params
        names = [self.model_name if r is not None else None for r in recaps]
        table = with_column(table, S.RECAPTION, recaps)
        table = with_column(table, S.RECAPTION_MODEL, names)
        caps = table[S.CAPTION].to_pylist()
        return with_column(table, S.TRAINING_CAPTION, training_captions(caps, recaps, p.caption_mode, p.fuse_template))

    def process(self, table: pa.Table) -> pa.Table:
        recaps, errors = self.caption_images(table)
        table = self._set_columns(table, recaps)
        bad = [e is not None for e in errors]
        if any(bad):
            table = self.reject(table, bad, "decode_failed", errors, "decode_error")
        return table

    @property
    def applies_to(self) -> str:
        return "live" if self.params.only_kept else "all"  # only_kept false: rejected rows get captions too

    def describe(self) -> dict[str, Any]:
        from curate.stages.hf_models import TINY_BLIP_NAME

        p = self.params
        d: dict[str, Any] = {"model": p.model or TINY_BLIP_NAME, "prompt": p.prompt, "caption_mode": p.caption_mode,
                             "generation": self._gen_kwargs(), "only_kept": p.only_kept}
        if getattr(self, "device", None):
            d.update(device=self.device, dtype=str(self.dtype).replace("torch.", ""))
        if not p.model:
            d["warning"] = self._warning()
        return d
