"""Incremental re-runs: the demo pipeline once, then re-runs on the same output after a config change.

Baseline: the first (full) run of the demo pipeline (configs/demo.yaml) on N loopback photos.  Then,
on the same output path: (1) the recaption prompt changed, (2) ``clip_score.top_fraction`` changed.
For each it prints wall time, the ratio to the first run, the image requests the loopback server got
(0 = nothing downloaded again) and which segments were reused.

    python bench/incremental.py --n 1000 [--runner local|ray]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
for k, v in dict(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                 CURATE_RAY_PROGRESS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
    os.environ.setdefault(k, v)


def _set(cfg: dict, stage: str, **params) -> None:
    for st in cfg["stages"]:
        if st["stage"] == stage:
            st.update(params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runner", choices=["local", "ray"], default="local")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import curate
    from curate.demo.corpus import build_site, write_input
    from curate.demo.server import DemoServer

    work = Path(tempfile.mkdtemp(prefix="curate-bench-incr-"))
    try:
        build_site(work / "site", n_rows=args.n, seed=0)
        with DemoServer(work / "site", slow_seconds=5.0) as server:
            cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
            cfg["input"]["path"] = str(write_input(work / "site", server.base_url, work / "in.parquet"))
            cfg["output"]["path"] = str(work / "out")
            cfg["runner"] = {"kind": args.runner, "num_cpus": os.cpu_count()}
            steps = [("first run (baseline)", {}),
                     ("recaption prompt changed", {"recaption": {"prompt": "a photograph showing"}}),
                     ("clip_score.top_fraction changed", {"clip_score": {"top_fraction": 0.8}})]
            first = None
            for name, change in steps:
                for stage, params in change.items():
                    _set(cfg, stage, **params)
                hits, t0 = server.hits, time.perf_counter()
                res = curate.run(copy.deepcopy(cfg))
                dt = time.perf_counter() - t0
                first = first or dt
                reused = sum(s["reused"] for s in res.segments)
                print(f"{name:<34} {dt:7.1f} s = {dt / first:5.2f}x the first run, {server.hits - hits:6d} requests, "
                      f"{reused} of {len(res.segments)} segments reused", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
