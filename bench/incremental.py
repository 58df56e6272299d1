"""Iterating on a corpus: the demo pipeline once, then updates of the same output, each against the first run.

Baseline: the first (full) run of the demo pipeline (configs/demo.yaml) on N loopback photos, while the
loopback server answers 503 to ``--fail`` of their URLs.  Then, on the same output path:

1. ``--append``: a new input file with ``--append-rows`` more photos (10 % by default);
2. ``--retry-failed``: the server healed, the rows that failed are fetched again;
3. the recaption prompt changed; 4. ``clip_score.top_fraction`` changed.

Each step is a ``curate run`` command of its own (a fresh process, as a user runs it: its start-up, imports and
model loading included).  For each it prints wall time, the ratio to the first run, the image requests the server
got and the rows that ``download``, ``clip_embed``, ``caption_perplexity`` and ``recaption`` ran on (stats.json
``rows_computed``; the others' results came from the row cache) and, per segment, the shards whose column group
(and in the last segment ``data/`` and ``rejected/``) was carried forward unchanged instead of rewritten.

    python bench/incremental.py --n 5000 --append-rows 500 --fail 0.05 [--runner local|ray]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parents[1]
for k, v in dict(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                 CURATE_RAY_PROGRESS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
    os.environ.setdefault(k, v)

MODEL_STAGES = ("download", "clip_embed", "caption_perplexity", "recaption")


def _set(cfg: dict, stage: str, **params) -> None:
    for st in cfg["stages"]:
        if st["stage"] == stage:
            st.update(params)


def carried(out: Path, since: float) -> list[int | str]:
    """Per segment, the shards whose column group the run (started at ``since``) carried forward unchanged, from
    its done markers; "-": the run did not redo the segment (its markers are older)."""
    done = sorted((out / "_work" / "done").glob("seg-*"), key=lambda d: int(d.name[4:]))
    out_: list[int | str] = []
    for d in done:
        mine = [p for p in d.glob("*.json") if p.stat().st_mtime >= since]
        out_.append(sum(bool(json.loads(p.read_text()).get("carried")) for p in mine) if mine else "-")
    return out_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000, help="rows of the first run")
    ap.add_argument("--append-rows", type=int, default=500, help="rows of the appended file")
    ap.add_argument("--fail", type=float, default=0.05, help="share of the first run's URLs answered 503")
    ap.add_argument("--runner", choices=["local", "ray"], default="local")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import pyarrow.parquet as pq

    from curate.demo.corpus import build_site, write_input
    from curate.demo.server import DemoServer

    work = Path(tempfile.mkdtemp(prefix="curate-bench-incr-"))
    try:
        build_site(work / "site", n_rows=args.n + args.append_rows, seed=0)
        with DemoServer(work / "site", slow_seconds=5.0) as server:
            table = pq.read_table(write_input(work / "site", server.base_url, work / "all.parquet"))
            (work / "in").mkdir()
            pq.write_table(table.slice(0, args.n), work / "in" / "b.parquet")
            cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
            cfg["input"]["path"] = str(work / "in")
            cfg["output"]["path"] = str(work / "out")
            cfg["runner"] = {"kind": args.runner, "num_cpus": os.cpu_count()}
            urls = [u for u in table.slice(0, args.n)["url"].to_pylist() if u]
            step = max(1, round(1 / args.fail)) if args.fail > 0 else 0
            failing = sorted({urlsplit(u).path for u in urls[::step]}) if step else []
            print(f"demo pipeline, {args.runner} runner, {os.cpu_count()} CPUs: {args.n} rows, then "
                  f"{args.append_rows} appended; {len(failing)} URLs answered 503 in the first run", flush=True)
            print(f"{'step':<34} {'wall':>8} {'vs first':>9} {'requests':>9}  rows computed: "
                  + " ".join(f"{s:>18}" for s in MODEL_STAGES) + "   shards carried per segment", flush=True)

            def add_file() -> None:
                pq.write_table(table.slice(args.n), work / "in" / "a.parquet")

            steps = [("first run (baseline)", [], None, {}),
                     (f"--append {args.append_rows} rows", ["--append"], add_file, {}),
                     ("--retry-failed (server healed)", ["--retry-failed"], server.heal, {}),
                     ("recaption prompt changed", [], None, {"recaption": {"prompt": "a photograph showing"}}),
                     ("clip_score.top_fraction changed", [], None, {"clip_score": {"top_fraction": 0.8}})]
            server.fail(failing)
            first = None
            for name, flags, before, change in steps:
                if before is not None:
                    before()
                for stage, params in change.items():
                    _set(cfg, stage, **params)
                (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
                hits, t0, since = server.hits, time.perf_counter(), time.time()
                done = subprocess.run([sys.executable, "-m", "curate.cli", "-q", "run", str(work / "cfg.yaml"), *flags],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                dt = time.perf_counter() - t0
                if done.returncode != 0:
                    raise SystemExit(f"{name}: curate run failed ({done.returncode}): {done.stderr[-2000:]}")
                first = first or dt
                stats = json.loads((work / "out" / "stats.json").read_text())
                ran = {s["id"]: s.get("rows_computed", 0) for s in stats["stages"]}
                print(f"{name:<34} {dt:7.1f}s {dt / first:8.2f}x {server.hits - hits:9d}  {'':>14}"
                      + " ".join(f"{ran.get(s, 0):>18}" for s in MODEL_STAGES)
                      + f"   {'/'.join(str(n) for n in carried(work / 'out', since))}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
