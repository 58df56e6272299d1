"""Scale: the demo pipeline (configs/demo.yaml, every stage) end to end on N loopback photos, and
the light pipeline (no models) on N rows that already hold their images.

For each N (default 2,000 and 10,000) and runner (local, Ray) it runs ``curate run`` in a child
process and prints:

* rows/s (wall time of the whole command: start, imports, Ray start, report included);
* CPU seconds per row of the whole process tree (driver, Ray's daemons and workers), counted by the
  kernel in a cgroup made for the run (root; else the rusage of the descendants reaped here, this
  process being their subreaper: a lower bound);
* bytes written by the run -- ``write_bytes`` of every process of it (driver, Ray's workers),
  read from /proc/PID/task/*/io every 0.1 s while it runs -- / bytes of the final ``data/`` +
  ``rejected/`` (writes in the last 0.1 s of a process, or by threads that ended, are missed);
* peak RSS (VmHWM) of the driver and of the largest other process (a Ray worker);
* CPU seconds by process (driver, each Ray daemon, Ray workers by the task or actor they ran), polled
  every 0.1 s: where Ray's extra CPU goes;
* time-per-row at the largest N / time-per-row at the smallest N (<= 1.1: linear).

``--pipeline light`` runs dedup_exact, phash, dedup_phash, caption, image_size, aspect_ratio,
language_id and language on N rows of ~2 KB JPEGs held in the input (``input.image_col``; ~5 %
exact and ~5 % near duplicates), 1,000-row shards unless ``--shard``; it prints Ray / local for wall
time and for CPU seconds per row (the targets of the Ray-overhead issue: >= 0.9x and <= 1.2x).

``--download N`` adds the Ray download throughput against the plain img2dataset CLI (the
baseline named by the issue) on N photos, via bench/download.py.

    python bench/scale.py --n 2000 10000 --download 10000
    python bench/scale.py --pipeline light --n 200000
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import random
import resource
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


def _kind(h, driver: bool) -> str:
    """What a process of the run is, for the CPU breakdown: the driver, a Ray daemon, or a Ray worker by the
    task or actor it runs (Ray sets the title ``ray::NAME``)."""
    if driver:
        return "driver"
    try:
        cmd = h.cmdline()
    except Exception:  # noqa: BLE001 - it ended
        return "?"
    first = cmd[0] if cmd else h.name()
    if first.startswith("ray::"):
        name = first[5:]
        return "ray worker (idle)" if name == "IDLE" else f"ray worker: {name[:70]}"
    for daemon in ("gcs_server", "raylet", "dashboard_agent", "runtime_env", "log_monitor", "monitor.py",
                   "dashboard.py", "default_worker"):
        if any(daemon in c for c in cmd[:3]):
            return "ray worker (starting)" if daemon == "default_worker" else f"ray daemon: {daemon}"
    return Path(first).name


def _breakdown(r: dict) -> str:
    top = sorted(r["cpu_by_process"].items(), key=lambda kv: -kv[1][0])
    return "; ".join(f"{k} {v:.1f}" + (f" ({n} processes)" if n > 1 else "") for k, (v, n) in top if v >= 0.05)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


class CpuGroup:
    """A fresh cgroup (v1 ``cpuacct`` or v2) for the run: every process it starts, daemons and orphans
    included, is counted by the kernel (``usage``, CPU seconds).  Where none can be made (not root, no
    cgroup fs) ``usage`` is None and the rusage of the reaped descendants is used (a lower bound)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        name = f"curate-bench-{os.getpid()}-{time.monotonic_ns()}"
        for root in (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")):
            try:
                if (root / "cpuacct.usage").exists() or (root / "cgroup.controllers").exists():
                    (root / name).mkdir()
                    self.path = root / name
                    break
            except OSError:
                continue

    def enter(self) -> None:  # preexec_fn: the child joins before it execs
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> float | None:
        if self.path is None:
            return None
        if (self.path / "cpuacct.usage").exists():
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def run_pipeline(cfg: dict, work: Path, keep: set[int]) -> dict:
    """``curate run`` in a child; returns seconds, bytes written by its whole tree, peak RSS figures."""
    import psutil

    cfg_path = work / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    group = CpuGroup()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "curate.cli", "-q", "run", str(cfg_path)]
    if os.environ.get("CURATE_BENCH_PYSPY"):  # a profile of every process of the run (py-spy's raw format)
        cmd = ["py-spy", "record", "--subprocesses", "--rate", "50", "--format", "raw", "--output",
               os.environ["CURATE_BENCH_PYSPY"] + f"-{cfg['runner']['kind']}.txt", "--"] + cmd
    proc = subprocess.Popen(cmd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(work / "stderr.log", "w"), preexec_fn=group.enter)
    peaks: dict[int, int] = {}
    stop = threading.Event()

    own: dict[int, int] = {}
    cpu_of: dict[int, float] = {}
    label: dict[int, str] = {}
    handles: dict[int, psutil.Process] = {}

    def poll() -> None:
        while not stop.is_set():
            for p in [proc.pid] + _tree(proc.pid):
                peaks[p] = max(peaks.get(p, 0), _hwm(p))
                own[p] = max(own.get(p, 0), _proc_written(p))
                try:
                    h = handles.setdefault(p, psutil.Process(p))
                    c = h.cpu_times()
                    cpu_of[p] = max(cpu_of.get(p, 0.0), c.user + c.system)
                    kind = _kind(h, p == proc.pid)
                    if kind not in ("ray worker (idle)", "?") or p not in label:
                        label[p] = kind
                except psutil.Error:
                    pass
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every descendant that ended, reaped above
    cpu = group.usage()
    if cpu is None:
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    group.close()
    if rc != 0:
        raise RuntimeError(f"curate run failed ({rc}): {(work / 'stderr.log').read_text()[-2000:]}")
    out = Path(cfg["output"]["path"])
    stats = json.loads((out / "stats.json").read_text())
    others = [v for p, v in peaks.items() if p != proc.pid]
    if os.environ.get("CURATE_BENCH_DEBUG"):
        print("polled write_bytes per process (MB):", sorted((round(v / 2**20, 1) for v in own.values()), reverse=True)[:12])
        print("stage seconds:", {st["id"]: round(st.get("seconds", 0.0), 1) for st in stats["stages"]})
    kinds: dict[str, list] = {}
    for p, c in cpu_of.items():
        k = kinds.setdefault(label.get(p, "?"), [0.0, 0])
        k[0] += c
        k[1] += 1
    return {"seconds": dt, "cpu": cpu, "written": sum(own.values()), "cpu_by_process": kinds,
            "output": _dir_bytes(out / "data") + _dir_bytes(out / "rejected"), "rows": stats["run"]["rows_in"],
            "kept": stats["run"]["kept"], "driver_rss": peaks.get(proc.pid, 0), "worker_rss": max(others, default=0)}


LIGHT_STAGES = [{"stage": "dedup_exact"}, {"stage": "phash"}, {"stage": "dedup_phash"}, {"stage": "caption"},
                {"stage": "image_size", "min_side": 32}, {"stage": "aspect_ratio", "max_ratio": 3.0},
                {"stage": "language_id"}, {"stage": "language", "languages": ["en"], "min_score": 0.2}]
WORDS = ("a photo of the red old small dog cat house tree car river mountain city street beautiful view with "
         "two people on in at near under over green blue yellow bright dark morning evening garden "
         "beach road bridge window door table chair flower field sky cloud").split()


def build_light_input(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows (uid, url, caption, image): ~2 KB JPEG crops of scikit-image's sample photos, written in
    row groups of 10,000; ~5 % exact copies of an earlier image and ~5 % near copies (re-encoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage
    from PIL import Image

    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "hubble_deep_field.jpg", "camera.png", "brick.png", "grass.png", "gravel.png", "coins.png"]
    photos = [Image.open(Path(skimage.__file__).parent / "data" / f).convert("RGB") for f in names]
    rng = random.Random(seed)
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("image", pa.binary())])
    recent: list[Image.Image] = []
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 10_000):
            rows: dict[str, list] = {"uid": [], "url": [], "caption": [], "image": []}
            for i in range(start, min(n, start + 10_000)):
                roll = rng.random()
                if recent and roll < 0.05:  # exact copy
                    data = rows["image"][-1] if rows["image"] else None
                    data = data or _jpeg(recent[-1], 85)
                elif recent and roll < 0.10:  # near copy: same pixels, another quality
                    data = _jpeg(rng.choice(recent), rng.randint(60, 95))
                else:
                    img = rng.choice(photos)
                    w_, h_ = img.size
                    cw, ch = rng.randint(w_ // 4, w_), rng.randint(h_ // 4, h_)
                    x, y = rng.randint(0, w_ - cw), rng.randint(0, h_ - ch)
                    side = rng.randint(48, 72)
                    crop = img.crop((x, y, x + cw, y + ch)).resize((side, max(24, int(side * ch / cw))))
                    recent = (recent + [crop])[-64:]
                    data = _jpeg(crop, 85)
                rows["uid"].append(f"r{i:09d}")
                rows["url"].append(f"http://example.invalid/{i}.jpg")
                rows["caption"].append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))))
                rows["image"].append(data)
            w.write_table(pa.table(rows, schema))
    return path


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def light(args, work: Path) -> None:
    results = {}
    for n in args.n:
        t0 = time.perf_counter()
        cache = Path(args.input_cache) if args.input_cache else work
        inp = cache / f"light-{n}.parquet"
        if not inp.exists():
            build_light_input(inp.with_suffix(".tmp"), n).replace(inp)
        print(f"light input of {n} rows built in {time.perf_counter() - t0:.0f}s "
              f"({inp.stat().st_size / n:.0f} bytes a row)", flush=True)
        for runner in args.runners:
            cfg = {"input": {"path": str(inp), "uid_col": "uid", "url_col": "url", "caption_col": "caption",
                             "image_col": "image", "shard_size": args.shard or 1000},
                   "output": {"path": str(work / f"out-light-{runner}-{n}")},
                   "runner": {"kind": runner, "num_cpus": os.cpu_count()}, "stages": LIGHT_STAGES}
            r = run_pipeline(cfg, work, set())
            results[(runner, n)] = r
            print(f"light {runner:<6} N={n:>7}: {r['seconds']:7.1f}s = {r['rows'] / r['seconds']:8.1f} rows/s, "
                  f"{1e3 * r['cpu'] / r['rows']:.3f} CPU-ms/row ({r['cpu']:.0f} CPU-s), kept {r['kept']}, "
                  f"peak RSS driver {r['driver_rss'] / 2**30:.2f} GB, largest worker {r['worker_rss'] / 2**30:.2f} GB",
                  flush=True)
            print(f"    CPU-s by process (polled): {_breakdown(r)}", flush=True)
            shutil.rmtree(cfg["output"]["path"], ignore_errors=True)
        if ("local", n) in results and ("ray", n) in results:
            lo, ra = results[("local", n)], results[("ray", n)]
            print(f"light N={n}: Ray / local speed {lo['seconds'] / ra['seconds']:.2f}x (target >= 0.9x), "
                  f"Ray / local CPU per row {ra['cpu'] / lo['cpu']:.2f}x (target <= 1.2x)", flush=True)
        if not args.input_cache:
            inp.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--runners", nargs="+", default=["local", "ray"])
    ap.add_argument("--shard", type=int, default=None, help="input.shard_size (default: configs/demo.yaml's)")
    ap.add_argument("--download", type=int, default=0, help="also: Ray download vs img2dataset CLI on N photos")
    ap.add_argument("--work", default=None, help="work folder on a real disk (tmpfs writes are not counted)")
    ap.add_argument("--pipeline", choices=["demo", "light"], default="demo")
    ap.add_argument("--input-cache", default=None, help="light: keep (and reuse) the generated input in this folder")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned Ray processes are reaped here
    work = Path(tempfile.mkdtemp(prefix="curate-bench-scale-", dir=args.work))
    results = {}
    try:
        if args.pipeline == "light":
            light(args, work)
            return
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
                          f"{1e3 * r['cpu'] / r['rows']:.1f} CPU-ms/row, "
                          f"written {r['written'] / 2**20:8.1f} MB / output {r['output'] / 2**20:7.1f} MB = "
                          f"{r['written'] / max(1, r['output']):.2f}x, peak RSS driver "
                          f"{r['driver_rss'] / 2**30:.2f} GB, largest worker {r['worker_rss'] / 2**30:.2f} GB",
                          flush=True)
                    print(f"    CPU-s by process (polled): {_breakdown(r)}", flush=True)
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
        for n in args.n:
            if ("local", n) in results and ("ray", n) in results:
                lo_, ra = results[("local", n)], results[("ray", n)]
                print(f"demo N={n}: Ray / local speed {lo_['seconds'] / ra['seconds']:.2f}x, "
                      f"Ray / local CPU per row {ra['cpu'] / lo_['cpu']:.2f}x (target <= 1.2x)")
        if args.download:
            subprocess.run([sys.executable, str(REPO / "bench" / "download.py"), "--n", str(args.download),
                            "--shard", str(args.shard or 500), "--threads", "16", "--processes", "2"], env=ENV, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
