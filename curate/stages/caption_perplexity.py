"""``caption_perplexity``: how fluent a caption is, under a language model.

Two backends (formulas in their modules):

* ``kenlm`` (:mod:`curate.stages.perplexity_kenlm`): an n-gram KenLM model file (ARPA
  or binary, e.g. CCNet's per-language Wikipedia models ``en.arpa.bin`` with
  ``en.sp.model``), CCNet normalisation, perplexity = 10 ** (-sum log10 P / (words + 1)).
* ``hf`` (:mod:`curate.stages.perplexity_hf`): any causal LM of transformers by hub
  name or local path, batched, bf16 on a GPU; perplexity = exp(mean token NLL) of
  the caption, optionally conditioned on a prompt.  Without ``model`` a tiny
  randomly initialised GPT-2 is used (offline demo/tests) -- say so loudly.

On a GPU cluster give the hf backend ``num_gpus`` (e.g. 1) so that its Ray actors see
a GPU.  Writes ``caption_perplexity`` (float32).  Rows whose caption is null, blank, or
has nothing left to score after normalisation/tokenisation are rejected with
``empty_caption``.  The ``perplexity`` filter thresholds the column.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)

EMPTY_REASON = "empty_caption"


class CaptionPerplexityParams(StageParams):
    stage: Literal["caption_perplexity"] = "caption_perplexity"
    backend: Literal["hf", "kenlm"] = Field("hf", description="hf: a transformers causal LM; kenlm: a KenLM file")
    model: str | None = Field(
        None, description="hf: hub name or local directory (empty: tiny random-init GPT-2, offline); "
                          "kenlm: path of the ARPA or binary model (required)")
    # kenlm
    sp_model: str | None = Field(None, description="kenlm: SentencePiece model the LM was trained on (CCNet's "
                                                   "{lang}.sp.model); empty: whitespace words")
    normalize: bool = Field(True, description="kenlm: CCNet text normalisation before tokenising")
    # hf
    prompt: str | None = Field(None, description="hf: text the caption is conditioned on (not in the mean)")
    prompt_separator: str = Field(" ", description="hf: put between the prompt and the caption (' ' suits byte-level "
                                                   "BPE: GPT-2, Llama 3, Qwen; '' suits SentencePiece tokenizers "
                                                   "that add the leading space themselves)")
    add_eos: bool = Field(False, description="hf: also score the end-of-text token after the caption")
    max_tokens: int = Field(128, ge=1, description="hf: captions are truncated to this many tokens")
    lm_batch_size: int = Field(32, ge=1, description="hf: captions per forward pass")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="hf: padded tokens per forward pass at most (default: logits of at most 2**24 "
                                "values on the CPU, 2**28 on a GPU)")
    device: str = Field("auto", description="hf: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float64", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hf: auto = bfloat16 on a GPU; float64 on the CPU (results independent of batching "
                            "and runner, bit for bit)")
    revision: str | None = Field(None, description="hf: model revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="hf: allow custom modelling code from the hub")
    seed: int = Field(0, description="hf: seed of the random-init offline model")

    @model_validator(mode="after")
    def _check(self) -> "CaptionPerplexityParams":
        if self.backend == "kenlm" and not self.model:
            raise ValueError("backend kenlm needs `model`: the path of an ARPA or KenLM binary file")
        if self.backend == "hf" and self.sp_model:
            raise ValueError("sp_model is for backend kenlm (the hf backend uses the model's own tokenizer)")
        return self


@register
class CaptionPerplexity(MapStage):
    name = "caption_perplexity"
    Params = CaptionPerplexityParams
    needs = (S.CAPTION,)
    produces = (S.CAPTION_PERPLEXITY,)
    default_resources = Resources(num_cpus=1.0, batch_size=256, stateful=True)
    params: CaptionPerplexityParams

    def setup(self) -> None:
        p = self.params
        try:
            if p.backend == "kenlm":
                from curate.stages.perplexity_kenlm import KenLMScorer

                self.scorer = KenLMScorer(p.model or "", p.sp_model, p.normalize)
            else:
                from curate.stages.perplexity_hf import HFScorer

                self.scorer = HFScorer(p.model, prompt=p.prompt, prompt_separator=p.prompt_separator,
                                       add_eos=p.add_eos, max_tokens=p.max_tokens, lm_batch_size=p.lm_batch_size,
                                       max_batch_tokens=p.max_batch_tokens, device=p.device, dtype=p.dtype,
                                       revision=p.revision, trust_remote_code=p.trust_remote_code, seed=p.seed)
        except (OSError, RuntimeError, ValueError) as e:
            raise StageError(f"stage {self.id!r}: cannot load the {p.backend} model: {e}") from e

    def process(self, table: pa.Table) -> pa.Table:
        captions = table[S.CAPTION].to_pylist()
        live = [i for i, c in enumerate(captions) if c is not None and c.strip()]
        scores: list[float | None] = [None] * len(captions)
        if live:
            for i, v in zip(live, self.scorer.score([captions[i] for i in live])):
                scores[i] = v
        table = with_column(table, S.CAPTION_PERPLEXITY, pa.array(scores, pa.float64()).cast(pa.float32()))
        empty = [v is None for v in scores]
        if any(empty):
            details = ["null caption" if c is None else "nothing to score after normalising/tokenising"
                       if c.strip() else "blank caption" for c in captions]
            table = self.reject(table, empty, EMPTY_REASON, details)
        return table

    def describe(self) -> dict[str, Any]:
        """From the params alone (under Ray the driver's copy is never set up), plus the loaded scorer's facts."""
        from curate.stages.hf_models import TINY_LM_NAME, random_weights_warning

        p = self.params
        d: dict[str, Any] = {"backend": p.backend, "model": p.model or TINY_LM_NAME}
        if p.backend == "kenlm":
            d.update(sp_model=p.sp_model, normalize=p.normalize,
                     formula="10 ** (-sum(log10 P(line incl. </s>)) / sum(words + 1)) (CCNet)")
        else:
            d.update(prompt=p.prompt, add_eos=p.add_eos, formula="exp(mean NLL over caption tokens, natural log)")
            if not p.model:
                d["warning"] = random_weights_warning(f"caption_perplexity model {TINY_LM_NAME}", "model")
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            d.update(scorer.describe())
        return d
