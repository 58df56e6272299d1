"""The GPU path in one short run: clip_embed (GPU JPEG decoding, both runners), perplexity, recaption, FAISS.

    python bench/gpu.py                                    # a CUDA machine: full sizes, < 8 min on one H100/H200
    python bench/gpu.py --device cpu --small --out r.json  # the same code at tiny sizes, < 2 min on 2 cores

Sections (each figure printed with a ratio against a named baseline measured in the same run):

* ``clip``: ``clip_embed`` end to end from encoded JPEG bytes (shorter side 256, like img2dataset's
  output) to embeddings, for ViT-B-32 and ViT-L-14 (random weights, bf16 autocast on CUDA) through
  ``curate.run``: local runner with CPU decoding (PIL threads), local runner with GPU decoding
  (batched nvJPEG + tensor resize/crop, :mod:`curate.gpu_decode`), Ray runner with GPU decoding (one
  actor per GPU).  img/s = rows / the stage's own seconds in stats.json (decode + forward; model loading
  excluded); the run's wall time is given too.  GPU utilisation is sampled with NVML (``pip install
  nvidia-ml-py``) or ``nvidia-smi`` during each run.  Baselines: CPU decoding, the local runner, and the
  LAION-5B figures (1,800 img/s ViT-B-32 and 312 img/s ViT-L-14 per A100).  The embeddings of CPU and GPU
  decoding are compared (min cosine: the decoders differ by a few grey levels).
* ``perplexity``: caption_perplexity's scorer with GPT-2-base shapes (small: tiny), captions/s, vs one
  caption per forward pass.
* ``recaption``: the recaption stage with BLIP-base shapes (small: tiny), img/s, vs one image per generate().
* ``faiss``: FAISS spherical k-means on 1M x 768 (every row trained on) through the GPU code path
  (``device="cuda"``: on CPU FAISS indexes, with a warning, when FAISS has no GPU -- so ``--small`` runs
  it too) vs the CPU path per iteration; dedup_semantic (SemDeDup mode, k-means) on the same rows with
  ``device: cuda`` vs ``device: cpu``.

Random weights: throughput is that of the real architectures; no output is meaningful.

Runs where a package is missing (the lent GPU machine has torch but no ray, duckdb or faiss: see
``bench/gpu_device.sh``): a part that needs one is skipped with one line saying what is missing (the
Ray runner without ray), and k-means / SemDeDup run through torch without FAISS; the JSON's ``skipped``
and ``faiss.path`` say what ran.  ``--budget S`` skips the sections not started within S seconds.
References printed beside the figures: LAION-5B's per-A100 CLIP figures and NeMo Curator's per-GPU
nightly floor (>= 112 img/s for read -> CLIP ViT-L/14 -> aesthetic -> write; ours is clip_embed alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: samples/s per A100 the LAION-5B paper reports for CLIP inference (ViT-B-32, ViT-L-14)
LAION_A100 = {"ViT-B-32": 1800.0, "ViT-L-14": 312.0}
TARGETS = {"ViT-B-32": 8000.0, "ViT-L-14": 2300.0}
#: NeMo Curator's nightly floor per GPU: read -> CLIP ViT-L/14 -> aesthetic -> write, img/s
NEMO_FLOOR_L14 = 112.0
#: the packages each section needs beyond torch (a section whose package is missing is skipped)
NEEDS = {"clip": ("open_clip", "pydantic"), "perplexity": ("transformers", "pydantic"),
         "recaption": ("transformers", "pydantic"), "faiss": ("pydantic",)}

FULL = dict(clip_models={"ViT-B-32": 60_000, "ViT-L-14": 20_000}, clip_batch=512, clip_shard=20_000,
            clip_unique=1024, lm_size="base", lm_n=20_000, lm_single=300, lm_batch=256, cap_size="base",
            cap_n=512, cap_single=16, cap_batch=128, cap_tokens=20, faiss_n=1_000_000, faiss_d=768,
            faiss_k=4096, faiss_iters=20, faiss_cpu_iters=2, sem_clusters=500)
SMALL = dict(clip_models={"curate-ViT-T-32": 192}, clip_batch=32, clip_shard=96, clip_unique=32, lm_size="tiny",
             lm_n=256, lm_single=32, lm_batch=64, cap_size="tiny", cap_n=16, cap_single=4, cap_batch=8,
             cap_tokens=8, faiss_n=20_000, faiss_d=64, faiss_k=80, faiss_iters=10, faiss_cpu_iters=2,
             sem_clusters=10)
SECTIONS = ("clip", "perplexity", "recaption", "faiss")


def run(args: argparse.Namespace) -> dict:
    import torch

    from gpu_parts import clip_section, faiss_section, missing, perplexity_section, recaption_section

    c = SMALL if args.small else FULL
    device = args.device
    result: dict = {"meta": {"device": device, "small": args.small, "torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                             "cpus": os.cpu_count(), "host": platform.node(), "argv": sys.argv[1:],
                             "weights": "random init (throughput only)", "budget_s": args.budget},
              "seconds": {}, "skipped": {}, "gpu_mem_peak_mib": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=args.tmp))
    jobs = {
        "clip": lambda: clip_section(c["clip_models"], device, c["clip_batch"], c["clip_shard"], c["clip_unique"], tmp),
        "perplexity": lambda: perplexity_section(c["lm_size"], device, c["lm_n"], c["lm_single"], c["lm_batch"]),
        "recaption": lambda: recaption_section(c["cap_size"], device, c["cap_n"], c["cap_single"], c["cap_batch"],
                                               c["cap_tokens"]),
        "faiss": lambda: faiss_section(c["faiss_n"], c["faiss_d"], c["faiss_k"], c["faiss_iters"],
                                       c["faiss_cpu_iters"], c["sem_clusters"], "cuda", tmp)}
    start = time.perf_counter()
    try:
        for name in args.only or SECTIONS:
            lacks = missing(*NEEDS[name])
            if lacks:
                result["skipped"][name] = f"{', '.join(lacks)} not installed"
            elif args.budget and time.perf_counter() - start > args.budget:
                result["skipped"][name] = f"time budget of {args.budget:g} s spent"
            if name in result["skipped"]:
                print(f"[{name}] skipped: {result['skipped'][name]}", flush=True)
                continue
            t0 = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result[name] = jobs[name]()
            result["seconds"][name] = time.perf_counter() - t0
            if device == "cuda":
                result["gpu_mem_peak_mib"][name] = torch.cuda.max_memory_allocated() / 2**20
            print(f"[{name}] {result['seconds'][name]:.1f} s", flush=True)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    for model, r in (result.get("clip") or {}).items():
        best = r["runs"]["local_gpu_decode"]["img_s"]
        if model in LAION_A100:
            r["ratio"]["vs_laion5b_a100"] = best / LAION_A100[model]
            r["target_img_s"] = TARGETS[model]
        if model == "ViT-L-14":
            r["ratio"]["vs_nemo_curator_floor"] = best / NEMO_FLOOR_L14
    return result


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(r: dict) -> str:
    rows = [("section", "figure", "value", "baseline", "ratio")]
    for model, m in (r.get("clip") or {}).items():
        runs, ratio = m["runs"], m["ratio"]
        for name, base, key in (("local_cpu_decode", None, None),
                                ("local_gpu_decode", "local_cpu_decode", "gpu_decode_vs_cpu_decode"),
                                ("ray_gpu_decode", "local_gpu_decode", "ray_vs_local")):
            if name not in runs:
                rows.append((f"clip {model}", f"{name} img/s", "skipped", m["skipped"].get(name, "-"), "-"))
                continue
            util, mem = runs[name]["gpu_util_mean"], runs[name].get("gpu_mem_max_mib")
            gpu = ", ".join(x for x in (f"GPU {util:.0f}%" if util is not None else "",
                                        f"{mem:,.0f} MiB" if mem is not None else "") if x)
            rows.append((f"clip {model}", f"{name} img/s" + (f" ({gpu})" if gpu else ""),
                         _f(runs[name]["img_s"]), base or "-", _f(ratio[key], 2) if key else "-"))
        if "vs_laion5b_a100" in ratio:
            rows.append((f"clip {model}", "local_gpu_decode img/s", _f(runs["local_gpu_decode"]["img_s"]),
                         f"LAION-5B A100 {LAION_A100[model]:.0f}", _f(ratio["vs_laion5b_a100"], 2)))
        if "vs_nemo_curator_floor" in ratio:
            rows.append((f"clip {model}", "local_gpu_decode img/s", _f(runs["local_gpu_decode"]["img_s"]),
                         f"NeMo Curator floor {NEMO_FLOOR_L14:.0f} (whole pipeline)",
                         _f(ratio["vs_nemo_curator_floor"], 2)))
        rows.append((f"clip {model}", "GPU vs CPU decode min cosine", _f(m["decode_agreement"]["min_cosine"], 6),
                     "-", "-"))
    if "perplexity" in r:
        p = r["perplexity"]
        rows.append(("perplexity", f"{p['model']} captions/s", _f(p["captions_s"]),
                     f"one at a time {_f(p['baseline_one_at_a_time_captions_s'])}", _f(p["ratio"]["batched_vs_one_at_a_time"], 2)))
    if "recaption" in r:
        p = r["recaption"]
        rows.append(("recaption", f"{p['model']} img/s", _f(p["img_s"], 2),
                     f"one at a time {_f(p['baseline_one_at_a_time_img_s'], 2)}", _f(p["ratio"]["batched_vs_one_at_a_time"], 2)))
    if "faiss" in r:
        f = r["faiss"]
        km, sd = f["kmeans"], f["semdedup"]
        shape = f"{f['rows']:,} x {f['dim']}"
        rows.append(("faiss", f"path: {f.get('path', '-')}", "-", "-", "-"))
        rows.append(("faiss", f"k-means {shape} k={km['k']} s ({km['iterations']} it)", _f(km["s"], 2),
                     f"CPU {_f(km['cpu_s_per_iteration'], 3)} s/it", _f(km["ratio"]["speedup_vs_cpu_per_iteration"], 2)))
        rows.append(("faiss", f"SemDeDup {shape} s", _f(sd["s"], 2), f"device cpu {_f(sd['cpu_s'], 2)} s",
                     _f(sd["ratio"]["speedup_vs_cpu"], 2)))
    for name, why in (r.get("skipped") or {}).items():
        rows.append((name, "skipped", why, "-", "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes and sizes (CPU check of the same code)")
    ap.add_argument("--out", default="bench-gpu.json", help="result JSON (default bench-gpu.json)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: the system's temp folder)")
    ap.add_argument("--budget", type=float, default=0, help="seconds: sections not started by then are skipped")
    args = ap.parse_args()
    os.environ.setdefault("CURATE_RAY_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device visible; on a CPU machine run --device cpu --small")
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"]["total"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"total {result['seconds']['total']:.1f} s; written {args.out}")


if __name__ == "__main__":
    main()
