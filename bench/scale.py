"""Scale: the demo pipeline (configs/demo.yaml, every stage) end to end on N loopback photos.

For each N (default 2,000 and 10,000) and runner (local, Ray) it runs ``curate run`` in a child
process and prints:

* rows/s (wall time of the whole command: start, imports, Ray start, report included);
* bytes written by the run -- ``write_bytes`` of every process of it (driver, Ray's workers),
  read from /proc/PID/task/*/io every 0.1 s while it runs -- / bytes of the final ``data/`` +
  ``rejected/`` (writes in the last 0.1 s of a process, or by threads that ended, are missed);
* peak RSS (VmHWM) of the driver and of the largest other process (a Ray worker);
* time-per-row at the largest N / time-per-row at the smallest N (<= 1.1: linear).

``--download N`` adds the Ray download throughput against the plain img2dataset CLI (the
baseline named by the issue) on N photos, via bench/download.py.

    python bench/scale.py --n 2000 10000 --download 10000
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
           CURATE_RAY_PROGRESS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
SERVER = """
import sys, time
from pathlib import Path
from curate.demo.server import DemoServer
with DemoServer(Path(sys.argv[1]), slow_seconds=5.0) as s:
    print(s.base_url, flush=True)
    while True:
        time.sleep(3600)
"""


def _proc_written(pid: int) -> int:
    """``write_bytes`` of a process's own live threads (/proc/PID/io would add its reaped children too)."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/io"):
        try:
            for line in f.read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def run_pipeline(cfg: dict, work: Path, keep: set[int]) -> dict:
    """``curate run`` in a child; returns seconds, bytes written by its whole tree, peak RSS figures."""
    import psutil

    cfg_path = work / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "-q", "run", str(cfg_path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(work / "stderr.log", "w"))
    peaks: dict[int, int] = {}
    stop = threading.Event()

    own: dict[int, int] = {}

    def poll() -> None:
        while not stop.is_set():
            for p in [proc.pid] + _tree(proc.pid):
                peaks[p] = max(peaks.get(p, 0), _hwm(p))
                own[p] = max(own.get(p, 0), _proc_written(p))
            stop.wait(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    rc = proc.wait()
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    # reap what the run left behind (we are its subreaper): no Ray process outlives the measurement
    end = time.time() + 60
    while time.time() < end:
        left = [c for c in psutil.Process().children() if c.pid not in keep]
        if not left:
            break
        for c in left:
            try:
                os.waitpid(c.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.2)
    if rc != 0:
        raise RuntimeError(f"curate run failed ({rc}): {(work / 'stderr.log').read_text()[-2000:]}")
    out = Path(cfg["output"]["path"])
    stats = json.loads((out / "stats.json").read_text())
    others = [v for p, v in peaks.items() if p != proc.pid]
    if os.environ.get("CURATE_BENCH_DEBUG"):
        print("polled write_bytes per process (MB):", sorted((round(v / 2**20, 1) for v in own.values()), reverse=True)[:12])
    return {"seconds": dt, "written": sum(own.values()),
            "output": _dir_bytes(out / "data") + _dir_bytes(out / "rejected"), "rows": stats["run"]["rows_in"],
            "kept": stats["run"]["kept"], "driver_rss": peaks.get(proc.pid, 0), "worker_rss": max(others, default=0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--runners", nargs="+", default=["local", "ray"])
    ap.add_argument("--shard", type=int, default=None, help="input.shard_size (default: configs/demo.yaml's)")
    ap.add_argument("--download", type=int, default=0, help="also: Ray download vs img2dataset CLI on N photos")
    ap.add_argument("--work", default=None, help="work folder on a real disk (tmpfs writes are not counted)")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned Ray processes are reaped here
    work = Path(tempfile.mkdtemp(prefix="curate-bench-scale-", dir=args.work))
    results = {}
    try:
        from curate.demo.corpus import build_site, write_input

        for n in args.n:
            site = work / f"site-{n}"
            t0 = time.perf_counter()
            build_site(site, n_rows=n, seed=0)
            print(f"corpus of {n} rows built in {time.perf_counter() - t0:.0f}s", flush=True)
            server = subprocess.Popen([sys.executable, "-c", SERVER, str(site)], stdout=subprocess.PIPE, text=True,
                                      env=ENV)
            base = server.stdout.readline().strip()
            inp = write_input(site, base, work / f"input-{n}.parquet")
            try:
                for runner in args.runners:
                    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
                    cfg["input"]["path"] = str(inp)
                    cfg["input"]["shard_size"] = args.shard or cfg["input"]["shard_size"]
                    cfg["output"]["path"] = str(work / f"out-{runner}-{n}")
                    cfg["runner"] = {"kind": runner, "num_cpus": os.cpu_count()}
                    r = run_pipeline(cfg, work, {server.pid})
                    results[(runner, n)] = r
                    print(f"{runner:<6} N={n:>6}: {r['rows'] / r['seconds']:7.1f} rows/s ({r['seconds']:.0f}s), "
                          f"written {r['written'] / 2**20:8.1f} MB / output {r['output'] / 2**20:7.1f} MB = "
                          f"{r['written'] / max(1, r['output']):.2f}x, peak RSS driver "
                          f"{r['driver_rss'] / 2**30:.2f} GB, largest worker {r['worker_rss'] / 2**30:.2f} GB",
                          flush=True)
                    shutil.rmtree(cfg["output"]["path"], ignore_errors=True)
            finally:
                server.terminate()
                server.wait()
        lo, hi = min(args.n), max(args.n)
        for runner in args.runners:
            if (runner, lo) in results and (runner, hi) in results and lo != hi:
                a, b = results[(runner, lo)], results[(runner, hi)]
                ratio = (b["seconds"] / b["rows"]) / (a["seconds"] / a["rows"])
                print(f"{runner}: time per row at N={hi} / at N={lo} = {ratio:.2f} (<= 1.1: linear)")
        if args.download:
            subprocess.run([sys.executable, str(REPO / "bench" / "download.py"), "--n", str(args.download),
                            "--shard", str(args.shard or 500), "--threads", "16", "--processes", "2"], env=ENV, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
