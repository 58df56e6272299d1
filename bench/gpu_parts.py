"""The sections of bench/gpu.py: clip_embed through both runners, perplexity, recaption, FAISS.

Each section returns a dict of figures; every throughput comes with the baseline it is compared with in
the same run (``ratio`` fields), so a figure never stands alone.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent


def missing(*modules: str) -> list[str]:
    """Which of these importable names this Python lacks (a section needing one is skipped, saying so)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def bench_module(name: str) -> Any:
    """Another bench script as a module (by path: ``bench/clip.py`` must not shadow an installed ``clip``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class GpuSampler:
    """GPU utilisation (%) and memory used (MiB) of device 0 sampled every ``period`` s in a thread: NVML
    (``nvidia-ml-py``), else ``nvidia-smi``; nothing on a machine without either (figures are then null)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.samples, self.memory, self._stop = period, [], [], threading.Event()
        self._read = self._reader()

    @staticmethod
    def _reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                            pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
        except Exception:  # noqa: BLE001 - no NVML library, no GPU
            pass
        if shutil.which("nvidia-smi"):
            def smi() -> tuple[float, float]:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                util, mem = out.strip().splitlines()[0].split(",")
                return float(util), float(mem)
            try:
                smi()
                return smi
            except Exception:  # noqa: BLE001
                return None
        return None

    def __enter__(self) -> "GpuSampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                util, mem = self._read()
            except Exception:  # noqa: BLE001
                return
            self.samples.append(util)
            self.memory.append(mem)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join()

    def summary(self) -> dict[str, float | None]:
        s = self.samples
        return {"gpu_util_mean": float(np.mean(s)) if s else None, "gpu_util_p90": float(np.percentile(s, 90))
                if s else None, "gpu_util_samples": len(s),
                "gpu_mem_max_mib": float(max(self.memory)) if self.memory else None}


def _clip_run(inp: Path, out: Path, runner: str, params: dict, shard_size: int) -> dict[str, Any]:
    import curate

    cfg = {"input": {"path": str(inp), "uid_col": "uid", "image_col": "image", "shard_size": shard_size},
           "output": {"path": str(out)}, "runner": {"kind": runner}, "stages": [params]}
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        res = curate.run(cfg)
        wall = time.perf_counter() - t0
    st = next(s for s in res.stats["stages"] if s["id"] == "clip_embed")
    rows = st["rows_out"]
    return {"rows": rows, "stage_s": st["seconds"], "img_s": rows / max(st["seconds"], 1e-9), "wall_s": wall,
            "wall_img_s": rows / wall, **gpu.summary()}


def _embeddings(out: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.dedup.vectors import matrix

    t = pa.concat_tables([pq.read_table(f, columns=["uid", "image_embedding"]) for f in sorted((out / "data").glob("*.parquet"))])
    t = t.sort_by("uid")
    return np.asarray(t["uid"].to_pylist()), matrix(t["image_embedding"]).astype(np.float32)


def clip_section(models: dict[str, int], device: str, batch: int | None, shard: int, unique: int,
                 tmp: Path) -> dict[str, Any]:
    """clip_embed from encoded JPEG bytes (shorter side 256) to embeddings: local runner with CPU and GPU
    decoding, Ray runner with GPU decoding; img/s = rows / the stage's own seconds (stats.json: model
    loading excluded), and the run's wall time.  The embeddings of both decodings are compared."""
    import pyarrow.parquet as pq

    table = bench_module("clip").synthetic(max(models.values()), unique=unique)
    cuda = device == "cuda"
    out: dict[str, Any] = {}
    for model, n in models.items():
        inp = tmp / f"clip-{n}.parquet"
        if not inp.exists():
            pq.write_table(table.slice(0, n), inp)
        params = {"stage": "clip_embed", "model": model, "device": device, "precision": "bf16" if cuda else "fp32"}
        if batch:
            params["batch_size"] = batch
        runs: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name, runner, decode in (("local_cpu_decode", "local", "cpu"), ("local_gpu_decode", "local", "gpu"),
                                     ("ray_gpu_decode", "ray", "gpu")):
            if runner == "ray" and missing("ray"):
                skipped[name] = "ray is not installed: the Ray runner is not measured"
                print(f"  clip_embed {model} {name}: skipped ({skipped[name]})", flush=True)
                continue
            p = dict(params, decode=decode, **({"num_gpus": 1} if cuda and runner == "ray" else {}))
            runs[name] = _clip_run(inp, tmp / f"out-{model}-{name}", runner, p, shard)
            print(f"  clip_embed {model} {name}: {runs[name]['img_s']:.1f} img/s", flush=True)
        (ua, a), (ub, b) = (_embeddings(tmp / f"out-{model}-{k}") for k in ("local_cpu_decode", "local_gpu_decode"))
        same = np.intersect1d(ua, ub)
        a, b = a[np.isin(ua, same)], b[np.isin(ub, same)]
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        for name in runs:
            shutil.rmtree(tmp / f"out-{model}-{name}", ignore_errors=True)
        ray = runs.get("ray_gpu_decode")
        out[model] = {"images": n, "runs": runs, "skipped": skipped, "ratio": {
            "gpu_decode_vs_cpu_decode": runs["local_gpu_decode"]["img_s"] / runs["local_cpu_decode"]["img_s"],
            "ray_vs_local": ray["img_s"] / runs["local_gpu_decode"]["img_s"] if ray else None},
            "decode_agreement": {"rows": int(len(same)), "min_cosine": float(cos.min()) if len(cos) else None,
                                 "mean_cosine": float(cos.mean()) if len(cos) else None}}
    return out


def perplexity_section(size: str, device: str, n: int, n_single: int, batch: int) -> dict[str, Any]:
    """caption_perplexity's HF scorer (GPT-2 shapes, random init, saved and loaded like a checkpoint):
    batched captions/s vs one caption per forward pass."""
    hf = bench_module("hf_bench")
    from curate.stages.hf_models import random_causal_lm
    from curate.stages.perplexity_hf import HFScorer

    scorer = hf.with_saved_model(lambda: random_causal_lm(size, seed=0),
                                 lambda d: HFScorer(d, lm_batch_size=batch, device=device, dtype="auto"))
    caps = bench_module("perplexity").captions(n)
    scorer.score(caps[:32])
    t, _ = hf.interleaved({"single": lambda: [scorer.score([c]) for c in caps[:n_single]],
                           "batched": lambda: scorer.score(caps)}, 1, scorer.device)
    rate, base = n / t["batched"], n_single / t["single"]
    return {"model": f"random-init GPT-2 {size}", "dtype": str(scorer.dtype), "captions": n, "captions_s": rate,
            "baseline_one_at_a_time_captions_s": base, "ratio": {"batched_vs_one_at_a_time": rate / base}}


def recaption_section(size: str, device: str, n: int, n_single: int, batch: int, new_tokens: int) -> dict[str, Any]:
    """recaption (BLIP shapes, random init, greedy): batched img/s vs one image per generate()."""
    import pyarrow as pa

    import curate

    hf = bench_module("hf_bench")
    from curate.stages.hf_models import random_blip

    def load(d: str) -> Any:
        st = curate.create_stage("recaption", model=d, prompt="a picture of", max_new_tokens=new_tokens,
                                 gen_batch_size=batch, device=device)
        st.ensure_setup()
        return st

    stage = hf.with_saved_model(lambda: random_blip(size, seed=0), load)
    table = pa.table({"uid": [f"i{i}" for i in range(n)], "caption": ["alt"] * n,
                      "image": bench_module("clip").synthetic(n, unique=64)["image"],
                      "reject_reason": pa.nulls(n, pa.string())})
    stage.process(table.slice(0, min(4, n)))
    t, _ = hf.interleaved({"single": lambda: [stage.process(table.slice(i, 1)) for i in range(n_single)],
                           "batched": lambda: stage.process(table)}, 1, stage.device)
    rate, base = n / t["batched"], n_single / t["single"]
    return {"model": f"random-init BLIP {size}", "dtype": str(stage.dtype), "images": n, "img_s": rate,
            "baseline_one_at_a_time_img_s": base, "ratio": {"batched_vs_one_at_a_time": rate / base}}


def faiss_section(n: int, d: int, k: int, iters: int, cpu_iters: int, sem_clusters: int, device: str,
                  tmp: Path) -> dict[str, Any]:
    """FAISS spherical k-means (curate.dedup.vectors.spherical_kmeans, every row trained on) on ``device``
    vs the CPU (per iteration: the CPU baseline runs ``cpu_iters``), and dedup_semantic (mode semdedup,
    k-means method) fit + apply on ``device`` vs the CPU, both on n x d topic-structured embeddings."""
    from curate.dedup import vectors

    backend = "faiss" if vectors.faiss_installed() else "torch"
    gpu = vectors.gpu_available() if backend == "faiss" else vectors.torch_cuda()
    path = (f"{backend} on the GPU" if gpu and device == "cuda" else
            f"{backend} on the CPU" + (" (the GPU code path; no GPU here)" if device == "cuda" else ""))
    print(f"  k-means and SemDeDup run on: {path}" + ("" if backend == "faiss" else
          " (FAISS is not installed: torch k-means, kmeans_backend: torch, and torch pair search)"), flush=True)
    dd = bench_module("dedup")
    data = tmp / "emb"
    t0 = time.perf_counter()
    dd.make_embeddings(data, n, d, 0)
    x = dd._load_emb(data)
    made = time.perf_counter() - t0
    timed: dict[str, float] = {}
    for name, dev, it in (("kmeans", device, iters), ("kmeans_cpu", "cpu", cpu_iters)):
        t0 = time.perf_counter()
        vectors.spherical_kmeans(x, k, it, 0, dev, backend)
        timed[name] = time.perf_counter() - t0
    del x
    params = {"stage": "dedup_semantic", "mode": "semdedup", "eps": 0.05, "method": "kmeans",
              "n_clusters": sem_clusters, "kmeans_backend": backend}
    sem = {}
    for name, dev in (("semdedup", device), ("semdedup_cpu", "cpu")):
        r = dd.worker_curate(data, dict(params, device=dev, kmeans_device=dev), tmp / f"{name}-decisions")
        sem[name] = r["total_s"]
    shutil.rmtree(data, ignore_errors=True)
    per_it, per_it_cpu = timed["kmeans"] / iters, timed["kmeans_cpu"] / cpu_iters
    return {"rows": n, "dim": d, "data_s": made, "faiss_gpu": vectors.gpu_available(), "backend": backend,
            "path": path,
            "kmeans": {"k": k, "iterations": iters, "s": timed["kmeans"], "s_per_iteration": per_it,
                       "cpu_iterations": cpu_iters, "cpu_s": timed["kmeans_cpu"], "cpu_s_per_iteration": per_it_cpu,
                       "ratio": {"speedup_vs_cpu_per_iteration": per_it_cpu / per_it}},
            "semdedup": {"n_clusters": sem_clusters, "s": sem["semdedup"], "cpu_s": sem["semdedup_cpu"],
                         "rows_s": n / sem["semdedup"], "ratio": {"speedup_vs_cpu": sem["semdedup_cpu"] / sem["semdedup"]}}}


def threads_note() -> str:
    return f"{os.cpu_count()} CPUs"
