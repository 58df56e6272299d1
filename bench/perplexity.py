"""Benchmark caption_perplexity (hf backend): batched forward passes vs one caption at a time.

Same model, same captions, same scoring code; the baseline calls it with one
caption per forward pass (how a per-sample filter loop scores), the stage packs
captions sorted by length into padded batches.

    python bench/perplexity.py                       # tiny random GPT-2, CPU
    python bench/perplexity.py --size base --device cuda --n 20000 --batch 256   # GPT-2 small shapes, bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORDS = ("a the dog cat red blue car beach street photo of on in with at night old town flag man woman child "
         "running sitting standing large small wooden house garden mountain river sunset portrait close-up view "
         "vintage modern kitchen table white black green tree sky clouds city lights").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.3, 0.6, n).astype(int), 1, 60)  # alt-text-like: median ~10 words
    return [" ".join(rng.choice(WORDS, k)) for k in lengths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "base"], default="tiny", help="tiny: 2-layer d=64; base: GPT-2 small")
    ap.add_argument("--n", type=int, default=1024, help="captions in the batched run")
    ap.add_argument("--n-single", type=int, default=256, help="captions in the one-at-a-time run (a prefix)")
    ap.add_argument("--batch", type=int, default=64, help="lm_batch_size")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    import torch

    from curate.stages.hf_models import random_causal_lm
    from curate.stages.perplexity_hf import HFScorer

    with tempfile.TemporaryDirectory() as d:
        model, tok = random_causal_lm(args.size, seed=0)  # saved and loaded back: the stage's real loading path
        model.save_pretrained(d)
        tok.save_pretrained(d)
        del model
        scorer = HFScorer(d, lm_batch_size=args.batch, max_batch_tokens=args.max_batch_tokens,
                          device=args.device, dtype=args.dtype)
    caps = captions(args.n)
    n_single = min(args.n_single, args.n)
    params = sum(p.numel() for p in scorer.model.parameters())
    tokens = sum(len(s) for s in scorer.tokenize(caps))
    print(f"model: random-init GPT-2 {args.size} ({params / 1e6:.1f}M params, vocab {len(scorer.tokenizer)}), "
          f"device {scorer.device}, {scorer.dtype}, torch threads {torch.get_num_threads()}")
    print(f"captions: {args.n} ({tokens / args.n:.1f} tokens on average); one-at-a-time on the first {n_single}")

    def sync() -> None:
        if scorer.device.startswith("cuda"):
            torch.cuda.synchronize()

    scorer.score(caps[:32])  # warm-up
    sync()
    t0 = time.perf_counter()
    single = [scorer.score([c])[0] for c in caps[:n_single]]
    sync()
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = scorer.score(caps)
    sync()
    t_batch = time.perf_counter() - t0

    rate_single, rate_batch = n_single / t_single, args.n / t_batch
    diff = np.max(np.abs(np.array(batched[:n_single]) / np.array(single) - 1))
    print(f"one caption per forward pass (baseline): {rate_single:10.1f} captions/s  ({t_single:.2f} s)")
    print(f"batched (lm_batch_size {args.batch}):        {rate_batch:10.1f} captions/s  ({t_batch:.2f} s)")
    print(f"speed-up batched / one-at-a-time: {rate_batch / rate_single:.1f}x   "
          f"(max relative difference of the perplexities: {diff:.1e})")


if __name__ == "__main__":
    main()
