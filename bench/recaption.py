"""Benchmark recaption: batched generation vs one image at a time.

Same model, same JPEG bytes (real photographs from scikit-image), same stage code
(decode -> processor -> generate -> decode text); the baseline runs the stage on
one-row batches, the stage proper on ``gen_batch_size`` images per generate() call.
Greedy decoding, so both give the same captions (checked).  The random model is
saved and loaded back through AutoProcessor / AutoModelForImageTextToText.

    python bench/recaption.py                                # tiny random BLIP, CPU
    python bench/recaption.py --size base --device cuda --n 1024 --n-single 64 --batch 64   # BLIP-base, bf16
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "text", "cat", "retina", "grass", "gravel"]


def jpegs(n: int, size: int = 256) -> list[bytes]:
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        try:
            im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        except Exception:  # noqa: BLE001 - some images need the optional pooch download
            continue
        im.thumbnail((size, size))
        for q in (95, 80, 65):  # distinct bytes per copy
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=q)
            out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def main() -> None:
    from hf_bench import add_common_args, interleaved, with_saved_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "tiny: 2+2 layers, d=64, 64 px; base: BLIP-base's shapes (ViT-B/16 384 px, BERT-base)")
    ap.add_argument("--n", type=int, default=128, help="images in the batched run")
    ap.add_argument("--n-single", type=int, default=32, help="images in the one-at-a-time run (a prefix)")
    ap.add_argument("--batch", type=int, default=32, help="gen_batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    import curate
    from curate.stages.hf_models import random_blip

    if args.threads:
        torch.set_num_threads(args.threads)

    def load(d: str):
        stage = curate.create_stage("recaption", model=d, prompt="a picture of", max_new_tokens=args.max_new_tokens,
                                    gen_batch_size=args.batch, device=args.device, dtype=args.dtype)
        stage.ensure_setup()
        return stage

    stage = with_saved_model(lambda: random_blip(args.size, seed=0), load)
    table = pa.table({"uid": [f"i{i}" for i in range(args.n)], "caption": ["alt"] * args.n, "image": jpegs(args.n),
                      "reject_reason": pa.nulls(args.n, pa.string())})
    n_single = min(args.n_single, args.n)
    params = sum(p.numel() for p in stage.model.parameters())
    print(f"model: random-init BLIP {args.size} ({params / 1e6:.1f}M params), device {stage.device}, {stage.dtype}, "
          f"torch threads {torch.get_num_threads()}; {args.max_new_tokens} new tokens, greedy")

    stage.process(table.slice(0, min(8, args.n)))  # warm-up
    t, res = interleaved({
        "single": lambda: [stage.process(table.slice(i, 1))["recaption"][0].as_py() for i in range(n_single)],
        "batched": lambda: stage.process(table)["recaption"].to_pylist()}, args.repeat, stage.device)
    rate_single, rate_batch = n_single / t["single"], args.n / t["batched"]
    print(f"one image per generate() (baseline): {rate_single:9.1f} images/s  (median of {args.repeat}: "
          f"{t['single']:.2f} s for {n_single})")
    print(f"batched (gen_batch_size {args.batch}):     {rate_batch:9.1f} images/s  ({t['batched']:.2f} s for {args.n})")
    print(f"speed-up batched / one-at-a-time: {rate_batch / rate_single:.1f}x   "
          f"(identical captions: {res['batched'][:n_single] == res['single']})")


if __name__ == "__main__":
    main()
