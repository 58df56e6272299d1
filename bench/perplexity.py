"""Benchmark caption_perplexity (hf backend): batched forward passes vs one caption at a time.

Same model, same captions, same scoring code; the baseline calls it with one
caption per forward pass (how a per-sample filter loop scores), the stage packs
captions sorted by length into padded batches.  The random model is saved and
loaded back through ``from_pretrained`` like a real checkpoint.

    python bench/perplexity.py                        # tiny random GPT-2, CPU
    python bench/perplexity.py --size base --n 256 --n-single 64 --batch 32    # GPT-2 small shapes, CPU
    python bench/perplexity.py --size base --device cuda --n 20000 --n-single 500 --batch 256   # GPU, bf16
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

WORDS = ("a the dog cat red blue car beach street photo of on in with at night old town flag man woman child "
         "running sitting standing large small wooden house garden mountain river sunset portrait close-up view "
         "vintage modern kitchen table white black green tree sky clouds city lights").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.3, 0.6, n).astype(int), 1, 60)  # alt-text-like: median ~10 words
    return [" ".join(rng.choice(WORDS, k)) for k in lengths]


def main() -> None:
    from hf_bench import add_common_args, interleaved, with_saved_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "tiny: 2 layers, d=64; base: GPT-2 small's shapes (124M)")
    ap.add_argument("--n", type=int, default=1024, help="captions in the batched run")
    ap.add_argument("--n-single", type=int, default=256, help="captions in the one-at-a-time run (a prefix)")
    ap.add_argument("--batch", type=int, default=64, help="lm_batch_size")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the stage's (vocabulary-based)")
    args = ap.parse_args()

    import torch

    from curate.stages.hf_models import random_causal_lm
    from curate.stages.perplexity_hf import HFScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = with_saved_model(lambda: random_causal_lm(args.size, seed=0), lambda d: HFScorer(
        d, lm_batch_size=args.batch, max_batch_tokens=args.max_batch_tokens, device=args.device, dtype=args.dtype))
    caps = captions(args.n)
    n_single = min(args.n_single, args.n)
    params = sum(p.numel() for p in scorer.model.parameters())
    tokens = sum(len(s) for s in scorer.tokenize(caps))
    print(f"model: random-init GPT-2 {args.size} ({params / 1e6:.1f}M params, vocab {len(scorer.tokenizer)}), "
          f"device {scorer.device}, {scorer.dtype}, torch threads {torch.get_num_threads()}")
    print(f"captions: {args.n} ({tokens / args.n:.1f} tokens on average); one-at-a-time on the first {n_single}")

    scorer.score(caps[:32])  # warm-up
    t, res = interleaved({"single": lambda: [scorer.score([c])[0] for c in caps[:n_single]],
                          "batched": lambda: scorer.score(caps)}, args.repeat, scorer.device)
    rate_single, rate_batch = n_single / t["single"], args.n / t["batched"]
    same = np.mean(np.float32(res["batched"][:n_single]) == np.float32(res["single"]))
    print(f"one caption per forward pass (baseline): {rate_single:10.1f} captions/s  (median of {args.repeat}: "
          f"{t['single']:.2f} s)")
    print(f"batched (lm_batch_size {args.batch}, max_batch_tokens {scorer.max_batch_tokens}): {rate_batch:10.1f} "
          f"captions/s  ({t['batched']:.2f} s)")
    print(f"speed-up batched / one-at-a-time: {rate_batch / rate_single:.1f}x   "
          f"(float32 values identical to one-at-a-time: {same:.0%})")


if __name__ == "__main__":
    main()
