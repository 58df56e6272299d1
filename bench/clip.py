"""Benchmark clip_embed: curate's batched stage vs one forward pass per sample.

Same model (same weights), same encoded images and captions, one run:

  (a) per-sample loop -- what Data-Juicer's image_text_similarity_filter does: for each sample,
      decode the image, run the model's full preprocessing, tokenize the caption (no padding),
      one image forward + one text forward, cosine;
  (b) the clip_embed stage on the local runner;
  (c) the clip_embed stage on the Ray runner (actor pool).

Images/s of (b) and (c) are rows / the stage's own busy seconds (decode + preprocess + forward,
model loading excluded, like (a)).  CPU ms/img (all threads of the process, where measurable) show
the work per image independently of how busy the machine is.  The scores of (a) and (b) are
compared as a check.

    python bench/clip.py                                  # demo corpus over loopback HTTP, CPU
    python bench/clip.py --baseline-threads 0             # per-sample loop with torch's default threads
    python bench/clip.py --source synthetic --model ViT-B-32 --device cuda --n 50000 --batch-size 256
    python bench/clip.py --source synthetic --model ViT-L-14 --device cuda --n 20000 --batch-size 256

``--source corpus`` runs real pipelines (download + clip_embed) on the offline demo corpus;
``--source synthetic`` builds N JPEGs in memory (random crops of real photos, shorter side 256
like img2dataset's output) and drives the stage directly: (b) with the local runner's batching
function, (c) through a Ray Data actor pool (num_gpus=1 per actor on CUDA) -- end to end from
encoded JPEG bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def synthetic(n: int, seed: int = 0, unique: int = 4096) -> pa.Table:
    """n rows of JPEG bytes + captions; at most ``unique`` distinct images, repeated (same decode work)."""
    from PIL import Image

    from curate import schema as S
    from curate.demo.corpus import PHOTOS, _load_photos

    rng = np.random.default_rng(seed)
    photos = {k: v.convert("RGB") for k, v in _load_photos().items()}  # the photographs scikit-image ships
    stems = sorted(photos)
    images, captions = [], []
    for i in range(min(n, unique)):
        stem = stems[i % len(stems)]
        src = photos[stem]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = src.crop((x, y, x + cw, y + ch))
        s = 256 / min(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        caps = PHOTOS[stem][1]
        captions.append(caps[int(rng.integers(len(caps)))])
    images = [images[i % len(images)] for i in range(n)]
    captions = [captions[i % len(captions)] for i in range(n)]
    return pa.table({S.UID: [f"s{i:08d}" for i in range(n)], S.URL: [""] * n, S.CAPTION: captions,
                     S.IMAGE: pa.array(images, pa.binary())})


class PerSample:
    """(a): one decode + preprocess + image forward + text forward per sample."""

    def __init__(self, params: dict, threads: int | None) -> None:
        import torch

        from curate.clip_model import autocast_for, load_clip, resolve_device

        self.device = resolve_device(params["device"])
        self.threads = threads if self.device.type == "cpu" else None
        self.clip = load_clip(params["model"], params.get("pretrained"), self.device, params.get("seed", 0))
        self.autocast, _ = autocast_for(self.device, params.get("precision", "auto"))
        self.torch = torch

    def run(self, images: list[bytes], captions: list[str]) -> tuple[float, np.ndarray]:
        import torch.nn.functional as F
        from PIL import Image

        from curate.clip_model import encode_text

        torch, clip = self.torch, self.clip
        if self.threads:
            torch.set_num_threads(self.threads)
        scores = np.zeros(len(images), np.float32)
        self.cpu0 = time.process_time()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, (data, cap) in enumerate(zip(images, captions)):
                x = clip.preprocess(Image.open(io.BytesIO(data)))[None].to(self.device)
                tokens = clip.tokenizer([cap]).to(self.device)  # trimmed to its own length: no padding
                with self.autocast():
                    img = F.normalize(clip.model.encode_image(x).float(), dim=-1)
                    txt = F.normalize(encode_text(clip, tokens).float(), dim=-1)
                scores[i] = float((img * txt).sum())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.cpu = time.process_time() - self.cpu0  # CPU seconds of all threads of this process
        return time.perf_counter() - t0, scores


def _pipeline(inp: Path, out: Path, runner: str, params: dict, shard_size: int) -> dict:
    import curate

    cfg = {"input": {"path": str(inp), "uid_col": "uid", "shard_size": shard_size},
           "output": {"path": str(out)}, "runner": {"kind": runner},
           "stages": [{"stage": "download", "image_size": 256, "timeout": 2,
                       "allow_networks": ["127.0.0.0/8"]}, {"stage": "clip_embed", **params}]}
    t0 = time.perf_counter()
    res = curate.run(cfg)
    st = next(s for s in res.stats["stages"] if s["id"] == "clip_embed")
    return {"rows": st["rows_in"], "seconds": st["seconds"], "wall": time.perf_counter() - t0}


def corpus_runs(args, params: dict, single: PerSample, results: dict) -> None:
    """(b) and (c) as real pipelines (download + clip_embed) over the demo corpus served on 127.0.0.1."""
    import pyarrow.parquet as pq

    from curate.demo.corpus import write_input
    from curate.demo.run import prepare_corpus
    from curate.demo.server import DemoServer

    root = Path(tempfile.mkdtemp(prefix="bench-clip-"))
    site = prepare_corpus(root / "corpus", args.rows, 0)
    with DemoServer(site, slow_seconds=3.0) as server:
        inp = write_input(site, server.base_url, root / "input.parquet")
        for rep in range(args.repeat):
            results["b"].append(_pipeline(inp, root / f"local{rep}", "local", params, args.shard_size))
            if rep == 0:  # the images and captions clip_embed saw, and its scores
                t = pa.concat_tables([pq.read_table(f) for f in sorted((root / "local0").glob("*/*.parquet"))],
                                     promote_options="permissive")
                t = t.filter(pa.compute.is_valid(t["clip_score"])).slice(0, args.n_single)
                images, captions, ref = t["image"].to_pylist(), t["caption"].to_pylist(), t["clip_score"].to_numpy()
            sec, scores = single.run(images, captions)
            results["a"].append({"rows": len(images), "seconds": sec, "cpu": single.cpu})
            results["diff"] = float(np.abs(scores - ref).max())
            results["c"].append(_pipeline(inp, root / f"ray{rep}", "ray", params, args.shard_size))


class _Actor:
    def __init__(self, params: dict) -> None:
        from curate import registry

        self.stage = registry.create(params)
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        out = self.stage.run_batch(batch).select(["uid", "clip_score"])
        per_row = (time.perf_counter() - t0) / max(1, out.num_rows)  # summed later: the actor's busy time
        return out.append_column("busy", pa.array([per_row] * out.num_rows, pa.float64()))


def synthetic_runs(args, params: dict, single: PerSample, results: dict) -> None:
    """(b) with the local runner's batching function, (c) through a Ray Data actor pool, from JPEG bytes."""
    import ray

    import curate
    from curate.runners.common import run_stage_local
    from curate.table_ops import prepare_for_stages

    table = prepare_for_stages(synthetic(args.n))
    stage = curate.create_stage("clip_embed", **params)
    stage.ensure_setup()
    run_stage_local(stage, table.slice(0, min(256, args.n)), {})  # warm-up (CUDA context, kernels)
    gpus = 1 if single.device.type == "cuda" else 0
    k = min(args.n_single, args.n)
    images, captions = table["image"].to_pylist()[:k], table["caption"].to_pylist()[:k]
    for _ in range(args.repeat):
        sec, scores = single.run(images, captions)
        results["a"].append({"rows": k, "seconds": sec, "cpu": single.cpu})
        timing: dict[str, float] = {}
        cpu0 = time.process_time()
        scored = run_stage_local(stage, table, timing)
        results["b"].append({"rows": args.n, "seconds": timing[stage.id], "cpu": time.process_time() - cpu0})
        results["diff"] = float(np.abs(scores - scored["clip_score"].to_numpy()[:k]).max())
        t0 = time.perf_counter()
        res = ray.data.from_arrow(table).map_batches(
            _Actor, fn_constructor_args=(params,), batch_size=stage.resources.batch_size, batch_format="pyarrow",
            num_gpus=gpus, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
        results["c"].append({"rows": res.count(), "seconds": float(res.sum("busy")),
                             "wall": time.perf_counter() - t0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["corpus", "synthetic"], default="corpus")
    ap.add_argument("--model", default=None, help="open_clip model (default: the stage's, curate-ViT-T-32)")
    ap.add_argument("--pretrained", default=None, help="tag or checkpoint path (default: random weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward (default 256 cuda / 64 cpu)")
    ap.add_argument("--decode-threads", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="the stage's CPU forward workers (default: all cores; under Ray: the actor's CPUs)")
    ap.add_argument("--baseline-threads", type=int, default=1,
                    help="torch intra-op threads of the per-sample loop (default 1: its fastest setting on a "
                         "busy 2-core machine; 0: torch's default)")
    ap.add_argument("--rows", type=int, default=600, help="corpus rows (--source corpus)")
    ap.add_argument("--shard-size", type=int, default=300, help="rows per shard (--source corpus)")
    ap.add_argument("--n", type=int, default=2048, help="images (--source synthetic)")
    ap.add_argument("--n-single", type=int, default=512, help="images in the per-sample loop (a prefix)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (medians are reported)")
    args = ap.parse_args()
    os.environ.setdefault("CURATE_RAY_PROGRESS", "0")

    import ray

    from curate.clip_model import DEFAULT_MODEL
    from curate.raycluster import start_local_ray

    params = {"stage": "clip_embed", "model": args.model or DEFAULT_MODEL, "device": args.device,
              "precision": args.precision}
    for key, val in (("pretrained", args.pretrained), ("batch_size", args.batch_size),
                     ("decode_threads", args.decode_threads), ("threads", args.threads)):
        if val is not None:
            params[key] = val
    single = PerSample(params, args.baseline_threads or None)
    results: dict = {"a": [], "b": [], "c": []}
    start_local_ray(num_cpus=os.cpu_count(), num_gpus=1 if single.device.type == "cuda" else 0)
    try:
        (corpus_runs if args.source == "corpus" else synthetic_runs)(args, params, single, results)
    finally:
        ray.shutdown()
    print(f"model {params['model']} ({args.pretrained or 'random weights'}) on {single.device}, precision "
          f"{args.precision}, per-sample torch threads {single.threads or 'default'}, stage forward workers "
          f"{args.threads or 'default'}, source {args.source}, {args.repeat} interleaved runs (median [min-max])")
    rates = {k: sorted(r["rows"] / r["seconds"] for r in v) for k, v in results.items() if k != "diff"}
    base = float(np.median(rates["a"]))
    names = {"a": "per-sample loop", "b": "clip_embed, local runner", "c": "clip_embed, Ray runner"}
    for key in ("a", "b", "c"):
        med = float(np.median(rates[key]))
        walls = [r["wall"] for r in results[key] if "wall" in r]
        cpus = [1e3 * r["cpu"] / r["rows"] for r in results[key] if "cpu" in r]
        extra = f"   (run wall {np.median(walls):.1f} s)" if walls else ""
        extra += f"   CPU {np.median(cpus):.1f} ms/img" if cpus else ""
        print(f"({key}) {names[key]:<26}{results[key][0]['rows']:6d} images  {med:8.1f} img/s "
              f"[{rates[key][0]:.1f}-{rates[key][-1]:.1f}]  {med / base:5.2f}x{extra}")
    print(f"max |score(a) - score(b)|: {results['diff']:.2e}")
    print(json.dumps({k: float(np.median(v)) for k, v in rates.items()}))


if __name__ == "__main__":
    main()
