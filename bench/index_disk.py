"""Benchmark: an IVF index served from disk (lists memory-mapped) against the same index loaded whole.

    python bench/index_disk.py [--rows 1000000] [--dim 512] [--queries 1000] [--single 300] [--e2e 200]
                               [--repeat 3] [--with-default] [--workdir DIR] [--reuse DIR]

Writes a synthetic curate output (bench/search.py's clustered CLIP-like vectors, float16, Parquet
shards of 100k rows in row groups of 1000 as the pipeline writes them), then builds, each in a child
process (its wall time and peak RSS its own):

* **on disk**: ``curate index --on-disk-from 0``: IVF-SQ8 whose inverted lists go to a
  memory-mapped ``.ivfdata`` file (streamed: one shard of codes in RAM at a time);
* **whole** (the baseline): the same factory built in RAM (``--kind ivfsq8 --on-disk-from never --on-disk-bytes never``,
  same seed: the same quantizer and codes), which a search loads whole;
* with ``--with-default``: also what ``curate index`` chose before at this size
  (``IVF4096,PQ128x4fsr,Refine(SQfp16)`` in RAM at 1M x 512).

Each index is then searched in a fresh child process through ``curate.search.Searcher`` (what
``curate search`` and ``curate serve`` use), its files first evicted from the page cache
(``posix_fadvise DONTNEED``): time to open, the first queries cold, then warm queries/s one at a
time (as the web app asks) and batched, end-to-end searches (index + row lookup + the rows read from
Parquet), recall@10 against exact search (brute force over every vector) on held-out queries,
and the process's memory from /proc/self/status: VmHWM (peak RSS), and at the end RssAnon (memory
the process owns) and RssFile (file pages mapped in: for the on-disk index the list pages queries
touched, clean page cache that the kernel reclaims under pressure; the bench then asks it to, with
``madvise(MADV_PAGEOUT)``, and searches again).  Each index is searched ``--repeat`` times, the
variants interleaved, and medians are printed.  Ratios are against "whole".  Timings are only
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from search import distribution  # noqa: E402  bench/search.py: the same synthetic output
from search import write_output as search_output  # noqa: E402

ROW_GROUP = 1000


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def write_output(out: Path, rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """bench/search.py's synthetic output, with captions and 1,000-row row groups."""
    return search_output(out, rows, dim, seed, captions=True, row_group_size=ROW_GROUP)


def exact_top10(out: Path, q: np.ndarray) -> np.ndarray:
    """Exact top-10 (inner product over normalised vectors) of ``q``, streamed over the shards."""
    import faiss
    import pyarrow.parquet as pq

    from curate.dedup.vectors import matrix

    heap = faiss.ResultHeap(len(q), 10, keep_max=True)
    seen = 0
    for f in sorted((out / "data").glob("*.parquet")):
        x = np.ascontiguousarray(matrix(pq.read_table(f, columns=["image_embedding"]).column(0)), np.float32)
        faiss.normalize_L2(x)
        d, i = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, i + seen)
        seen += len(x)
    heap.finalize()
    return heap.I


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (written pages are flushed first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- children -------------------------------------------------------------------------------------
def child_build(out: str, args: list[str]) -> None:
    """``curate index OUT ARGS``; peak RSS overall and after training (the adding phase: sampled every 50 ms)."""
    import logging
    import threading

    from curate.cli import main

    marks: dict[str, float] = {}

    class Marks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "trained in" in record.getMessage():
                marks["trained"] = time.perf_counter()

    logging.getLogger("curate.index").addHandler(Marks(logging.INFO))
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), status()["VmRSS"]))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    assert main(["index", out, *args]) == 0
    stop.set()
    sampler.join()
    e = json.loads((Path(out) / "index" / "index.json").read_text())["indices"]["kept.image"]
    e.pop("files")
    e["wall"] = time.perf_counter() - t0
    e["peak_rss"] = status()["VmHWM"]
    e["peak_rss_adding"] = max((r for t, r in samples if t >= marks.get("trained", t0)), default=0)
    e["train_s"] = marks.get("trained", t0) - t0
    print("RESULT " + json.dumps(e))


def pageout(index) -> bool:
    """Ask the kernel to reclaim the pages of an on-disk index's lists now (``madvise(MADV_PAGEOUT)``, Linux
    5.4+), as it does by itself under memory pressure; False when the index has no such lists or the call fails."""
    import ctypes

    import faiss

    from curate.index_disk import is_on_disk

    if not is_on_disk(index):
        return False
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(int(lists.ptr), int(lists.totsize), 21) == 0  # MADV_PAGEOUT


def child_query(out: str, work: str, single: int, e2e: int) -> None:
    import faiss

    from curate.search import Searcher

    q = np.load(Path(work) / "queries.npy")
    truth = np.load(Path(work) / "truth.npy")
    first = status()
    r = {"rss_imports": first["VmRSS"], "anon_imports": first["RssAnon"]}
    s = Searcher(out)
    t0 = time.perf_counter()
    idx = s.index("kept", "image")
    r["open_s"] = time.perf_counter() - t0
    r["after_open"] = status()["VmRSS"]
    cold = []
    for i in range(50):  # cold: the lists come from disk (for the whole index, they came at the open)
        t0 = time.perf_counter()
        idx.search(q[i], 10)
        cold.append(time.perf_counter() - t0)
    r["first_query_ms"] = cold[0] * 1000
    r["cold_ms_median"] = float(np.median(cold)) * 1000
    r["cold_qps"] = len(cold) / sum(cold)
    idx.index.search(q, 10)  # warm-up: every list the queries visit is in memory now
    n = min(single, len(q))  # warm, one at a time (the web app's and `curate search`'s pattern)
    t0 = time.perf_counter()
    found_single = np.stack([idx.search(q[i], 10)[1][0] for i in range(n)])
    r["single_qps"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, found = idx.index.search(q, 10)
    r["batch_qps"] = len(q) / (time.perf_counter() - t0)
    assert np.array_equal(found[:n], found_single)
    r["recall_at_10"] = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    # end to end: nearest rows with their columns read from the output (positions + Parquet row groups)
    t0 = time.perf_counter()
    s.search(q[0], k=10)  # the first one opens the output's Parquet files (footers, row readers)
    r["e2e_first_ms"] = (time.perf_counter() - t0) * 1000
    for i in range(1, 20):
        s.search(q[i], k=10)
    m = min(e2e, len(q) - 20)
    t0 = time.perf_counter()
    for i in range(20, 20 + m):
        table = s.search(q[i], k=10)
    r["e2e_qps"] = m / (time.perf_counter() - t0)
    assert table.num_rows == 10 and "caption" in table.column_names
    r["nprobe"] = int(faiss.extract_index_ivf(idx.index).nprobe) if faiss.try_extract_index_ivf(idx.index) else 0
    r.update({k: v for k, v in status().items() if k != "VmRSS"})
    if pageout(idx.index):  # the mapped list pages are page cache: the kernel can take them back
        r["after_pageout"] = status()
        t0 = time.perf_counter()
        _, again = idx.index.search(q[:20], 10)
        r["after_pageout_20_ms"] = (time.perf_counter() - t0) * 1000
        assert np.array_equal(again, found[:20])
    np.save(Path(work) / f"found-{Path(out).name}.npy", found)
    print("RESULT " + json.dumps(r))


def median_of(runs: list[dict]) -> dict:
    """Per key, the median over runs (numbers; nested dicts key by key)."""
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = median_of([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            out[k] = type(v)(np.median([r[k] for r in runs]))
        else:
            out[k] = v
    return out


def run_child(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if p.returncode:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child {args[:2]} failed ({p.returncode})")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=300, help="warm queries asked one at a time")
    p.add_argument("--e2e", type=int, default=200, help="end-to-end Searcher.search calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="searches of each index (interleaved; medians reported)")
    p.add_argument("--with-default", action="store_true", help="also build and search curate's in-RAM default")
    p.add_argument("--workdir", default=None, help="keep the outputs here (default: a temporary directory)")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="search the outputs an earlier --workdir run left in DIR again (no writing, no builds)")
    p.add_argument("--child-build", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-query", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_build:
        return child_build(a.child_build[0], json.loads(a.child_build[1]))
    if a.child_query:
        return child_query(a.child_query[0], a.child_query[1], a.single, a.e2e)
    from search import vectors

    from curate.index_plan import human_bytes

    tmp = a.reuse or tempfile.mkdtemp(prefix="curate-bench-index-disk-", dir=a.workdir)
    try:
        work = Path(tmp)
        disk = work / "disk"
        never = ["--on-disk-from", "never", "--on-disk-bytes", "never"]
        variants = {"disk": ["--on-disk-from", "0"], "whole": ["--kind", "ivfsq8", *never]}
        if a.with_default or (work / "default").is_dir():
            variants["default"] = never
        if a.reuse:
            builds = json.loads((work / "builds.json").read_text())
            a.rows, a.dim, a.seed = builds.pop("_args")
            variants = {k: v for k, v in variants.items() if k in builds}
            centres, proj = distribution(np.random.default_rng(a.seed), a.dim)
            print(f"reusing {work}: {a.rows} x {a.dim}")
        else:
            t0 = time.perf_counter()
            centres, proj = write_output(disk, a.rows, a.dim, a.seed)
            data_bytes = sum(f.stat().st_size for f in (disk / "data").glob("*.parquet"))
            print(f"synthetic output: {a.rows} x {a.dim} float16 embeddings, {human_bytes(data_bytes)} of Parquet, "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
            for name in variants:
                if name != "disk":
                    (work / name).mkdir()
                    (work / name / "data").symlink_to(disk / "data")
            builds = {name: run_child("--child-build", str(work / name), json.dumps(args))
                      for name, args in variants.items()}
            (work / "builds.json").write_text(json.dumps({**builds, "_args": [a.rows, a.dim, a.seed]}))
        for name, b in builds.items():
            files = b["index_bytes"] + b.get("ivfdata_bytes", 0)
            adding = (f", after training (sampled) {human_bytes(b['peak_rss_adding'])}; {b['train_s']:.0f}s to "
                      "train" if b.get("peak_rss_adding") else "")
            print(f"build {name}: {b['factory']}{' (lists on disk)' if b['on_disk'] else ''}, {b['wall']:.1f}s, "
                  f"peak RSS {human_bytes(b['peak_rss'])}{adding}; params {b['params']}; build-time recall@10 "
                  f"{b['recall_at_10']:.3f}; files {human_bytes(files)}"
                  + (f" ({human_bytes(b['index_bytes'])} index file + {human_bytes(b['ivfdata_bytes'])} .ivfdata)"
                     if b["on_disk"] else ""), flush=True)
        q = vectors(np.random.default_rng(a.seed + 99), a.queries, centres, proj).astype(np.float16).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        if not (a.reuse and (work / "truth.npy").exists() and np.array_equal(np.load(work / "queries.npy"), q)):
            np.save(work / "queries.npy", q)
            t0 = time.perf_counter()
            np.save(work / "truth.npy", exact_top10(disk, q))
            print(f"exact top-10 of {a.queries} held-out queries (brute force): {time.perf_counter() - t0:.1f}s",
                  flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(a.repeat):  # interleaved: a load change on the machine touches every variant alike
            for name in variants:
                evict([f for f in (work / name / "index").iterdir() if f.is_file()])
                runs[name].append(run_child("--child-query", str(work / name), str(work), "--single", str(a.single),
                                            "--e2e", str(a.e2e)))
        res = {}
        for name in variants:
            res[name] = r = median_of(runs[name])
            spread = [x["single_qps"] for x in runs[name]]
            print(f"search {name}: open {r['open_s'] * 1000:.0f} ms, first query {r['first_query_ms']:.1f} ms "
                  f"(cold: 50 queries {r['cold_qps']:.0f} q/s, median {r['cold_ms_median']:.1f} ms); warm "
                  f"{r['single_qps']:.0f} q/s one at a time, {r['batch_qps']:.0f} q/s batched, end to end "
                  f"{r['e2e_qps']:.0f} q/s (the first {r['e2e_first_ms']:.0f} ms); nprobe {r['nprobe']}; recall@10 {r['recall_at_10']:.3f}; peak RSS "
                  f"{human_bytes(r['VmHWM'])} (after imports {human_bytes(r['rss_imports'])}, after opening "
                  f"{human_bytes(r['after_open'])}); at the end RssAnon {human_bytes(r['RssAnon'])}, RssFile "
                  f"{human_bytes(r['RssFile'])} (medians of {a.repeat} runs; one at a time {min(spread):.0f} to "
                  f"{max(spread):.0f} q/s)", flush=True)
            if "after_pageout" in r:
                print(f"  {name}: list pages reclaimed (madvise MADV_PAGEOUT): RSS "
                      f"{human_bytes(r['after_pageout']['VmRSS'])} (RssFile "
                      f"{human_bytes(r['after_pageout']['RssFile'])}); the next 20 queries answer the same in "
                      f"{r['after_pageout_20_ms']:.0f} ms, reading their lists from disk again", flush=True)
        same = np.array_equal(np.load(work / "found-disk.npy"), np.load(work / "found-whole.npy"))
        d, w = res["disk"], res["whole"]
        owned = lambda r: r["RssAnon"]  # memory the process holds (the mapped lists are page cache)
        print(f"\non disk vs whole (baseline: the same IVF-SQ8 index loaded whole), {a.rows} x {a.dim}:")
        print(f"  identical top-10 for all {a.queries} queries: {same}")
        print(f"  memory the process owns (RssAnon) {human_bytes(owned(d))} vs {human_bytes(owned(w))} = "
              f"{owned(d) / owned(w):.2f}x ({human_bytes(owned(d) - d['anon_imports'])} vs "
              f"{human_bytes(owned(w) - w['anon_imports'])} above the {human_bytes(d['anon_imports'])} of imports); "
              f"peak RSS {human_bytes(d['VmHWM'])} vs {human_bytes(w['VmHWM'])} = {d['VmHWM'] / w['VmHWM']:.2f}x "
              "(counts the list pages the queries mapped in)"
              + (f"; RSS once those are reclaimed {human_bytes(d['after_pageout']['VmRSS'])} = "
                 f"{d['after_pageout']['VmRSS'] / w['VmHWM']:.2f}x" if "after_pageout" in d else ""))
        print(f"  open {d['open_s'] * 1000:.0f} ms vs {w['open_s'] * 1000:.0f} ms; first query (cold) "
              f"{d['first_query_ms']:.1f} ms vs {w['first_query_ms']:.1f} ms; first 50 queries {d['cold_qps']:.0f} "
              f"vs {w['cold_qps']:.0f} q/s")
        print(f"  warm q/s one at a time {d['single_qps']:.0f} vs {w['single_qps']:.0f} = "
              f"{d['single_qps'] / w['single_qps']:.2f}x; batched {d['batch_qps']:.0f} vs {w['batch_qps']:.0f} = "
              f"{d['batch_qps'] / w['batch_qps']:.2f}x; end to end {d['e2e_qps']:.0f} vs {w['e2e_qps']:.0f} = "
              f"{d['e2e_qps'] / w['e2e_qps']:.2f}x")
        bd, bw = builds["disk"], builds["whole"]
        print(f"  recall@10 vs exact {d['recall_at_10']:.3f} vs {w['recall_at_10']:.3f}; build {bd['wall']:.0f}s vs "
              f"{bw['wall']:.0f}s, build peak RSS {human_bytes(bd['peak_rss'])} vs {human_bytes(bw['peak_rss'])}"
              + (f" (after training: {human_bytes(bd['peak_rss_adding'])} vs {human_bytes(bw['peak_rss_adding'])})"
                 if bd.get("peak_rss_adding") and bw.get("peak_rss_adding") else ""))
        if "default" in res:
            f = res["default"]
            print(f"  against curate's in-RAM default ({builds['default']['factory']}): RssAnon "
                  f"{owned(d) / owned(f):.2f}x, peak RSS {d['VmHWM'] / f['VmHWM']:.2f}x, one at a time {d['single_qps'] / f['single_qps']:.2f}x, "
                  f"batched {d['batch_qps'] / f['batch_qps']:.2f}x, recall@10 {d['recall_at_10']:.3f} vs "
                  f"{f['recall_at_10']:.3f}")
    finally:
        if a.workdir is None and a.reuse is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
