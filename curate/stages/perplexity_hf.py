"""Hugging Face backend of ``caption_perplexity``: any causal LM, batched and padded.

For a caption tokenised as c_1..c_n (``add_special_tokens=False``; after an optional
prompt p_1..p_m, itself after the tokenizer's BOS token -- or EOS when it has no
BOS, GPT-2's convention -- so that c_1 is predicted too)::

    perplexity = exp( -1/n * sum_i ln P(c_i | bos, p_1..p_m, c_1..c_{i-1}) )

i.e. exp of the mean negative log-likelihood (natural log) over the caption's
tokens only: prompt tokens condition the caption but are not in the mean.  With
``add_eos`` the end-of-text token is scored as an (n+1)-th token.  Captions longer
than ``max_tokens`` tokens are truncated.

Captions are sorted by length and grouped into forward passes of at most
``lm_batch_size`` captions and ``max_batch_tokens`` padded tokens (default: what keeps
the tokens x vocabulary logits under 2**24 values on a CPU -- they dominate the cost
of small models -- and 2**28 on a GPU); padding is on the right with an attention
mask, so a caption's tokens attend to exactly the same positions whatever it is
batched with.  ``dtype: auto`` runs the model in float64 on the CPU: the stored
float32 value is then the same bit for bit whatever the batching, thread count or
runner (in float32 about one caption in five changes in its last bits with the batch
composition -- enough to flip a keep_fraction decision at the threshold, and to make
the local and Ray runners disagree).  On a GPU it runs in bf16 (fast; values then
depend on the batch composition at the 1e-3 level), log-softmax in float32.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)


class HFScorer:
    def __init__(self, model: str | None, *, prompt: str | None = None, prompt_separator: str = " ",
                 add_eos: bool = False, max_tokens: int = 128, lm_batch_size: int = 32,
                 max_batch_tokens: int | None = None, device: str = "auto", dtype: str = "auto",
                 revision: str | None = None, trust_remote_code: bool = False, seed: int = 0) -> None:
        import torch

        from curate.stages.hf_models import (TINY_LM_NAME, dtype_kwarg, pick_device, pick_dtype, random_causal_lm,
                                             random_weights_warning)

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, cpu_default="float64")
        self.warning = None
        if model:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, **dtype_kwarg(self.dtype),
                                                              trust_remote_code=trust_remote_code).eval()
            self.name = f"{model}@{revision}" if revision else model
        else:
            self.model, self.tokenizer = random_causal_lm("tiny", seed)
            self.model = self.model.to(self.dtype)
            self.name = TINY_LM_NAME
            self.warning = random_weights_warning(f"caption_perplexity model {TINY_LM_NAME}", "model")
            log.warning(self.warning)
        self.model.to(self.device)
        self.prompt, self.add_eos, self.max_tokens = prompt, add_eos, max_tokens
        self.lm_batch_size = lm_batch_size
        if max_batch_tokens is None:  # bound the (tokens x vocab) logits: cache-sized on a CPU, ~1 GB on a GPU
            budget = 2 ** 28 if self.device.startswith("cuda") else 2 ** 24
            max_batch_tokens = max(64, budget // max(1, len(self.tokenizer)))
        self.max_batch_tokens = max_batch_tokens
        tok = self.tokenizer
        self.sep = prompt_separator if prompt else ""
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.prefix_ids = [prefix] if prefix is not None else []
        if not self.prefix_ids:
            log.warning("tokenizer of %s has neither a BOS nor an EOS token: the first token of each caption "
                        "is not scored", self.name)
        if prompt:
            self.prefix_ids = self.prefix_ids + tok(prompt, add_special_tokens=False)["input_ids"]
        self.pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None))
        self._torch = torch

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer([self.sep + t for t in texts], add_special_tokens=False)["input_ids"]
        out = []
        for ids in enc:
            ids = list(ids[: self.max_tokens])
            if ids and self.add_eos and self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            out.append(ids)
        return out

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length, cut into forward passes within the row and token budgets."""
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        groups: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            width = len(self.prefix_ids) + lengths[i]  # sorted, so the newest row is the widest
            if cur and (len(cur) >= self.lm_batch_size or (len(cur) + 1) * width > self.max_batch_tokens):
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        return groups

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        """Mean NLL (nats) of the caption part of each sequence (prefix_ids + caption ids); nan if none scored."""
        torch = self._torch
        p = len(self.prefix_ids)
        first = max(p, 1) - 1  # the position whose logits predict the first scored token
        width = p + max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        # targets[r, t] = token t + 1 where that token is a caption token, else ignored: aligned with the logits,
        # so the cross-entropy runs on the contiguous (rows * width, vocab) logits without a shifted copy
        targets = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, s in enumerate(seqs):
            full = self.prefix_ids + s
            ids[r, : len(full)] = torch.tensor(full)
            mask[r, : len(full)] = 1
            targets[r, first: len(full) - 1] = torch.tensor(full[first + 1:])
        ids, mask, targets = ids.to(self.device), mask.to(self.device), targets.to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()  # log-softmax of bf16/fp16 logits in float32
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                    ignore_index=-100, reduction="none").view(targets.shape)
            keep = targets != -100
            count = keep.sum(1)
            mean = (nll.double() * keep).sum(1) / count.clamp(min=1)
        return [m if c else math.nan for m, c in zip(mean.double().cpu().tolist(), count.cpu().tolist())]

    def score(self, texts: list[str]) -> list[float | None]:
        """Perplexity per text; None where the caption has no tokens."""
        seqs = self.tokenize(texts)
        out: list[float | None] = [None] * len(texts)
        live = [i for i, s in enumerate(seqs) if s]
        for group in self._groups([len(seqs[i]) for i in live]):
            rows = [live[g] for g in group]
            for i, nll in zip(rows, self._forward([seqs[i] for i in rows])):
                if not math.isnan(nll):  # nan: a one-token caption and no BOS/EOS to predict it from
                    out[i] = math.exp(nll) if nll < 709 else math.inf
        return out

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": str(self.dtype).replace("torch.", "")}
