"""Benchmark: the driver's peak memory in the dedup stages' fit, at N and 10 N rows, on Ray.

    python bench/dedup_scale.py                    # N = 20,000 and 200,000 rows
    python bench/dedup_scale.py --n 10000 --dim 256

Under the Ray runner a global stage's ``fit`` runs in the driver, and every piece of work goes to
Ray tasks (``FitContext.map``, which runs even a lone item as a task): the driver only coordinates.  Each fit here runs in a
fresh process that starts a private local Ray instance (2 CPUs, as the test suite does) and
builds ``FitContext(paths, work_dir, runner="ray", parallelism=2)``.  Printed per stage and size:
fit seconds, the driver's peak RSS (VmHWM, this process only: Ray's own processes and the task
workers are not counted) and its RSS right after Ray started, then the ratio of the peaks at 10 N
and N.  Data: bench/dedup.py's planted pHashes and planted float16 embeddings (--dim).

Stages: dedup_phash (defaults) and dedup_semantic (``method: kmeans``, default clusters =
rows / 2000, so the k-means sample and the number of clusters grow 10x too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dedup as B  # noqa: E402  (bench/dedup.py: data generators, peak RSS)

STAGES = {"dedup_phash": {"stage": "dedup_phash"},
          "dedup_semantic": {"stage": "dedup_semantic", "method": "kmeans"}}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(data: Path, params: dict, out: Path) -> None:
    """One fit with a Ray FitContext, in this (fresh) process."""
    import pyarrow.parquet as pq

    from curate import registry
    from curate.context import FitContext
    from curate.raycluster import start_local_ray

    temp_dir, home = start_local_ray(num_cpus=2, object_store_memory=300 * 1024**2)
    try:
        after_ray = rss_mb()
        paths = sorted(str(p) for p in data.glob("*.parquet"))
        work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=data.parent))
        stage = registry.create(params)
        ctx = FitContext(paths, work, "ray", 2, sum(pq.read_metadata(p).num_rows for p in paths))
        t0 = time.perf_counter()
        info = stage.fit(ctx)
        fit_s = time.perf_counter() - t0
        shutil.rmtree(work, ignore_errors=True)
        res = {"fit_s": fit_s, "rss_after_ray_mb": after_ray, "peak_rss_mb": B.peak_rss_mb(),
               "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "info": {k: v for k, v in info.items() if k != "decisions"}}
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out.write_text(json.dumps(res))


def make(root: Path, kind: str, n: int, dim: int, seed: int) -> Path:
    """The data set, written by a child process (so this parent stays small: a child's ru_maxrss
    starts from its parent's image at fork)."""
    out = root / f"{kind}-{n}"
    subprocess.run([sys.executable, __file__, "--make", kind, "--n", str(n), "--dim", str(dim), "--seed", str(seed),
                    "--out", str(out)], check=True)
    return out


def run(data: Path, params: dict, root: Path) -> dict:
    out = root / f"scale-{data.name}-{params['stage']}.json"
    subprocess.run([sys.executable, __file__, "--worker", "--data", str(data), "--arg", json.dumps(params),
                    "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="N: the small corpus (the large one is 10 N)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="dedup_phash,dedup_semantic")
    ap.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir, removed)")
    ap.add_argument("--worker", action="store_true"), ap.add_argument("--data"), ap.add_argument("--arg")
    ap.add_argument("--out"), ap.add_argument("--make", choices=["phash", "emb"])
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.data), json.loads(a.arg), Path(a.out))
        return
    if a.make:
        out = Path(a.out)
        args = (B.make_phashes, a.seed) if a.make == "phash" else (B.make_embeddings, a.dim, a.seed)
        B._data(out.parent, out.name, a.n, *args)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(a.workdir or tempfile.mkdtemp(prefix="curate-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"driver peak RSS of dedup fits on Ray (2 CPUs); {os.cpu_count()} cores; data in {root}", flush=True)
    for name in a.stages.split(","):
        peaks = []
        for n in (a.n, 10 * a.n):
            data = make(root, "phash" if name == "dedup_phash" else "emb", n, a.dim, a.seed)
            r = run(data, STAGES[name], root)
            peaks.append(r["peak_rss_mb"])
            extra = {k: r["info"][k] for k in ("pairs", "graph_partitions", "component_buckets", "n_clusters",
                                               "cluster_buckets", "removed") if k in r["info"]}
            print(f"  {name:<15} n={n:>9,}  fit {r['fit_s']:6.1f} s  driver peak RSS {r['peak_rss_mb']:6.0f} MB "
                  f"(after Ray start {r['rss_after_ray_mb']:.0f} MB; ru_maxrss {r['ru_maxrss_mb']:.0f} MB)  {extra}",
                  flush=True)
        print(f"  {name}: driver peak RSS at 10 N / at N = {peaks[1] / peaks[0]:.2f}", flush=True)
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
