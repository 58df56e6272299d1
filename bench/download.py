"""Download throughput: plain img2dataset CLI vs curate's download stage (local and Ray runners).

One loopback corpus of real photographs (crops of scikit-image's sample photos, JPEG) is served by
nginx (Debian's package, a private instance on 127.0.0.1: real server software, and not the
bottleneck a Python test server would be) and downloaded, from the same nginx, by:
  (a) `img2dataset` CLI, processes_count=1   vs  (b) `curate run`, local runner (one process)
  (c) `img2dataset` CLI, processes_count=P   vs  (d) `curate run`, Ray runner (P download workers: shard tasks, `concurrency: P`)
for each P of --processes, with the same thread count, image size, resize mode and encoding.  Times
are end to end (process start, imports and writing included).  Prints samples/s and the ratios
curate / img2dataset with the same number of processes (medians of --repeat rounds: a shared 2-core
machine varies by +-25 % from run to run, so each round runs every configuration back to back).

    python bench/download.py --n 10000 --threads 16 --processes 2 4 --repeat 3
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
           CURATE_RAY_PROGRESS="0")


def build_corpus(root: Path, n: int, seed: int = 0) -> Path:
    import skimage
    from PIL import Image

    photos_dir = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "hubble_deep_field.jpg", "camera.png", "brick.png", "grass.png", "gravel.png", "coins.png"]
    photos = [Image.open(photos_dir / f).convert("RGB") for f in names]
    rng = random.Random(seed)
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.choice(photos)
        w, h = img.size
        cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = rng.uniform(0.6, 1.6)
        crop = img.crop((x, y, x + cw, y + ch)).resize((max(64, int(cw * scale)), max(64, int(ch * scale))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=rng.randint(80, 95))
        (files / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    (root / "routes.json").write_text("{}")
    return root


def serve(site: Path, port: int):
    """nginx serving ``site/files`` on 127.0.0.1:``port`` (no access log: it would only cost the server time)."""
    from curate.demo.nginx import Nginx

    servers = f"server {{ listen 127.0.0.1:{port} backlog=4096; root {site / 'files'}; location / {{ }} }}"
    return Nginx(site.parent / "nginx", servers, [port], workers=1, access_log=False)


def write_input(path: Path, base_url: str, n: int) -> None:
    pq.write_table(pa.table({"url": [f"{base_url}/{i:06d}.jpg" for i in range(n)],
                             "caption": [f"a photo number {i}" for i in range(n)]}), path)


def run_img2dataset(inp: Path, out: Path, processes: int, threads: int, args) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "img2dataset.main", f"--url_list={inp}", "--input_format=parquet",
           "--url_col=url", "--caption_col=caption", "--output_format=parquet", f"--output_folder={out}",
           f"--processes_count={processes}", f"--thread_count={threads}", f"--image_size={args.image_size}",
           "--resize_mode=keep_ratio", "--resize_only_if_bigger=True", "--encode_format=jpg",
           "--encode_quality=90", "--timeout=10", f"--number_sample_per_shard={args.shard}",
           "--enable_wandb=False", "--distributor=multiprocessing", "--compute_hash=sha256"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    ok = sum(pq.read_table(f, columns=["status"])["status"].to_pylist().count("success")
             for f in out.glob("*.parquet"))
    return ok / dt, ok, dt


def run_curate(inp: Path, out: Path, runner: str, processes: int, threads: int, args) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"input": {"path": str(inp), "shard_size": args.shard}, "output": {"path": str(out)},
           "runner": {"kind": runner, "num_cpus": processes},
           "stages": [{"stage": "download", "image_size": args.image_size, "resize_mode": "keep_ratio",
                       "resize_only_if_bigger": True, "encode_format": "jpg", "encode_quality": 90,
                       "timeout": 10, "thread_count": threads, "batch_size": args.shard,
                       # the guard and the caps stay on (defaults: deadline 30 s, max_bytes 32 MiB,
                       # max_image_pixels 89,478,485, max_per_host 16); only loopback is opened
                       "allow_networks": ["127.0.0.0/8"], "max_per_host": threads,
                       **({"concurrency": processes, "num_cpus": 0.5} if runner == "ray" else {})}]}
    cfg_path = out.parent / f"{out.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "curate.cli", "-q", "run", str(cfg_path)], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    ok = sum(pq.read_metadata(f).num_rows for f in (out / "data").glob("*.parquet"))
    return ok / dt, ok, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--processes", type=int, nargs="+", default=[2])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--shard", type=int, default=250)
    ap.add_argument("--port", type=int, default=0, help="nginx's port (0: a free one)")
    ap.add_argument("--repeat", type=int, default=1, help="run every configuration this many times; medians")
    args = ap.parse_args()
    from curate.demo.nginx import free_port

    work = Path(tempfile.mkdtemp(prefix="curate-bench-dl-"))
    try:
        t0 = time.perf_counter()
        site = build_corpus(work / "site", args.n)
        print(f"corpus: {args.n} JPEG photos built in {time.perf_counter() - t0:.1f}s; served by nginx", flush=True)
        port = args.port or free_port()
        inp = work / "input.parquet"
        write_input(inp, f"http://127.0.0.1:{port}", args.n)
        runs = [("img2dataset", 1, lambda: run_img2dataset(inp, work / "i1", 1, args.threads, args)),
                ("curate local", 1, lambda: run_curate(inp, work / "c1", "local", 1, args.threads, args))]
        for p in args.processes:
            runs += [("img2dataset", p, lambda p=p: run_img2dataset(inp, work / f"i{p}", p, args.threads, args)),
                     ("curate Ray", p, lambda p=p: run_curate(inp, work / f"c{p}", "ray", p, args.threads, args))]
        rates: dict[tuple[str, int], list[float]] = {}
        with serve(site, port):
            for r in range(args.repeat):  # each pair back to back, the pairs again: a noisy machine hits both
                for label, p, fn in runs:
                    rate, ok, dt = fn()
                    rates.setdefault((label, p), []).append(rate)
                    what = f"{label}, {p} {'workers' if label == 'curate Ray' else 'process' if p == 1 else 'processes'}"
                    print(f"[{r + 1}/{args.repeat}] {what:<34} {ok:>6} images in {dt:7.1f}s = {rate:7.1f} samples/s",
                          flush=True)
        med = {key: statistics.median(v) for key, v in rates.items()}
        print(f"medians of {args.repeat} run(s): " + ", ".join(f"{k[0]} x{k[1]} {v:.1f}" for k, v in med.items()))
        print(f"ratio curate local / img2dataset 1 process  : {med[('curate local', 1)] / med[('img2dataset', 1)]:.2f}x"
              " (target >= 1.5x)")
        for p in args.processes:
            print(f"ratio curate Ray {p} workers / img2dataset {p} processes: "
                  f"{med[('curate Ray', p)] / med[('img2dataset', p)]:.2f}x (target >= 1.0x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
