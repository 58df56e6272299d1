"""`curate serve` on a large output, through HTTP: latency of every kind of page and the server's peak memory.

    python bench/serve.py [--rows 2000000] [--work /tmp/curate-bench-serve] [--base DIR] [--repeat 20]
    python bench/serve.py --rows 20000000 --no-embeddings      # 20M rows in about 8 GB (no text search)

1. Builds (once; reused) a synthetic output of ``--rows`` rows with the real schema (bench/serve_data.py:
   41% kept, 15 reasons, planted duplicate groups, 256-px JPEGs, 256-d embeddings, 1,000-row row groups),
   its FAISS index (``curate index``, for the text search) and its duplicate-groups table.
2. Starts ``curate serve OUT --port 0`` on 127.0.0.1 in its own process -- once with the code of this
   checkout and, with ``--base DIR``, once with the code in DIR (e.g. ``git worktree add /tmp/serve_base
   <commit>``: "today's code"; its ``curate`` is put first on PYTHONPATH) -- and asks, over HTTP, for:
   page 1, page 1,000 and the last page of ``kept``, of ``rejected`` filtered by a reason, of ``kept``
   with an SQL condition and of ``kept`` sorted by clip_score; a thumbnail; the duplicate-groups pages;
   one duplicate group; a text search with ``where``.  The first answer of each kind is timed apart
   ("first": cold caches, counts not made yet); then each kind is asked ``--repeat`` times (a deep page
   at a different page each time, a thumbnail of a different row each time) for p50 and p95.
3. Prints p50 / p95 per kind for each code beside the targets of issue #28 (p95 <= 300 ms per page at
   any depth, <= 50 ms per thumbnail, peak resident memory <= 1.5 GB), and writes them to
   WORK/serve-bench-ROWS.json.

Where a page of this checkout answers "counting" or "writing the table" (work it does in the
background), the bench waits until the answer is the page itself and reports that wait as ``ready``.
The numbers are wall-clock times on a shared machine: compare the two codes of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TARGET_PAGE_MS = 300
TARGET_THUMB_MS = 50
TARGET_RSS_GB = 1.5
PER = 48
SEARCH_TEXT = "a red bicycle in the park"
WHERE = "clip_score > 0.3"
REASON = "clip_score_too_low"


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def get(url: str, timeout: float = 600, retry_s: float = 0.0) -> tuple[float, int, bytes]:
    end = time.perf_counter() + retry_s
    while True:
        t0 = time.perf_counter()
        req = urllib.request.Request(url, headers={"Accept": "text/html"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        except urllib.error.URLError:
            if time.perf_counter() < end:  # not listening yet
                time.sleep(0.05)
                continue
            raise
        return (time.perf_counter() - t0) * 1000, status, body


def pending(body: bytes) -> bool:
    return b'id="pending"' in body or b"writing the duplicate-groups table" in body


class Server:
    def __init__(self, code: Path, out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(code) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "-q", "serve", str(out), "--port", "0",
                                      "--subsets-dir", str(out.parent / "bench-subsets")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(code))
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise RuntimeError(f"no URL from curate serve: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.base = f"http://127.0.0.1:{m.group(1)}"
        self.listening_s = time.perf_counter() - self.t0

    def peak_rss_gb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024 / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def facts(out: Path) -> dict:
    """What the URLs need: totals, the last pages, a big duplicate group, thumbnail positions."""
    import duckdb
    import pyarrow.parquet as pq

    stats = json.loads((out / "stats.json").read_text())["run"]
    con = duckdb.connect()
    n_where = con.execute(f"SELECT count(*) FROM read_parquet('{out}/data/*.parquet') WHERE {WHERE}").fetchone()[0]
    big = con.execute(f"SELECT duplicate_of, count(*) FROM read_parquet('{out}/rejected/*.parquet') WHERE duplicate_of "
                      "IS NOT NULL GROUP BY 1 ORDER BY 2 DESC LIMIT 1 OFFSET 5").fetchone()[0]
    con.close()
    files = sorted((out / "data").glob("*.parquet"))
    rng = random.Random(0)
    thumbs = []
    for f in rng.sample(files, min(400, len(files))):
        thumbs.append((f.name, rng.randrange(pq.read_metadata(f).num_rows)))
    return {"kept": stats["kept"], "reason": stats["rejected_by_reason"][REASON], "where": n_where, "big_group": big,
            "thumbs": thumbs}


def kinds(f: dict, new: bool, search: bool = True) -> list[tuple[str, callable]]:
    """(name, j -> URL path of the j-th request) of every measured kind."""
    def last(n: int) -> int:
        return max(0, (n - 1) // PER)

    q = urllib.parse.quote
    w = "where=" + q(WHERE)
    out = [
        ("kept page 1", lambda j: "/rows/kept"),
        ("kept page 1000", lambda j: f"/rows/kept?page={999 + j}"),
        ("kept last page", lambda j: f"/rows/kept?page={last(f['kept'])}"),
        ("reason page 1", lambda j: f"/rows/rejected?reason={REASON}"),
        ("reason page 1000", lambda j: f"/rows/rejected?reason={REASON}&page={999 + j}"),
        ("reason last page", lambda j: f"/rows/rejected?reason={REASON}&page={last(f['reason'])}"),
        ("where page 1", lambda j: f"/rows/kept?{w}"),
        ("where page 1000", lambda j: f"/rows/kept?{w}&page={999 + j}"),
        ("where last page", lambda j: f"/rows/kept?{w}&page={last(f['where'])}"),
        ("sorted page 1", lambda j: "/rows/kept?order=clip_score:desc"),
        ("sorted page 1000", lambda j: f"/rows/kept?order=clip_score:desc&page={999 + j}"),
        ("sorted last page", lambda j: f"/rows/kept?order=clip_score:desc&page={last(f['kept'])}"),
        ("thumbnail", lambda j: "/thumb/kept/{}/{}".format(*f["thumbs"][j % len(f["thumbs"])])),
        ("duplicates page 1", lambda j: "/duplicates"),
        ("duplicates page 200", lambda j: f"/duplicates?page={200 + j}"),
        ("duplicate group", lambda j: f"/duplicates/{f['big_group']}"),
    ]
    if new:
        out += [("group gallery page 1", lambda j: "/duplicate-groups"),
                ("group gallery page 1000", lambda j: f"/duplicate-groups?page={999 + j}")]
    if search:
        out += [("text search + where", lambda j: f"/search?text={q(SEARCH_TEXT)}&where={q(WHERE)}&k=48")]
    return out


def measure(code: Path, out: Path, f: dict, repeat: int, new: bool, cap_s: float, search: bool) -> dict:
    srv = Server(code, out)
    res: dict = {"code": str(code), "listening_s": round(srv.listening_s, 2), "kinds": {}}
    try:
        t0 = time.perf_counter()
        ms, status, _ = get(srv.base + "/rows/kept", retry_s=60)
        res["first_page_after_start_s"] = round(time.perf_counter() - srv.t0, 2)
        log(f"  {code}: listening after {srv.listening_s:.1f} s, first page {ms:.0f} ms ({status})")
        for name, url in kinds(f, new, search):
            if name.startswith("text search"):  # the index's memory is the search's: browsing's peak first
                res["peak_rss_gb_browsing"] = round(srv.peak_rss_gb(), 3)
            first_ms, status, body = get(srv.base + url(0))
            entry = {"first_ms": round(first_ms, 1), "status": status}
            t_ready = time.perf_counter()
            waited = 0.0
            while status == 200 and pending(body) and waited < 300:
                time.sleep(0.5)
                _, status, body = get(srv.base + url(0))
                waited = time.perf_counter() - t_ready
            if waited:
                entry["ready_after_s"] = round(waited, 1)
            times = []
            t_kind = time.perf_counter()
            for j in range(1, repeat + 1):
                ms, status_j, body = get(srv.base + url(j))
                if status_j != 200 or pending(body):
                    entry.setdefault("not_ok", []).append(status_j if status_j != 200 else "pending")
                times.append(ms)
                if time.perf_counter() - t_kind > cap_s and len(times) >= 3:
                    break
            entry["n"] = len(times)
            entry["p50_ms"] = round(statistics.median(times), 1)
            entry["p95_ms"] = round(sorted(times)[max(0, int(round(0.95 * len(times))) - 1)], 1)
            entry["status_last"] = status_j
            res["kinds"][name] = entry
            log(f"    {name:24s} first {first_ms:7.0f} ms  p50 {entry['p50_ms']:7.1f}  p95 {entry['p95_ms']:7.1f}"
                f"  ({len(times)} requests, HTTP {status_j}){'  ready after %.1f s' % waited if waited else ''}")
        res["peak_rss_gb"] = round(srv.peak_rss_gb(), 3)
        res["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        srv.stop()
    return res


def prepare(out: Path, rows: int, index: bool, embeddings: bool = True) -> None:
    import serve_data

    log(f"synthetic output: {out} ({rows} rows)")
    serve_data.build(out, rows, embeddings=embeddings, log=log)
    if index and not (out / "index" / "index.json").exists():
        log("curate index (for the text search) ...")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "curate.cli", "-q", "index", str(out)], check=True, cwd=str(REPO),
                       stdout=subprocess.DEVNULL)
        log(f"  {time.time() - t0:.0f} s")
    from curate.dup_groups import write_duplicate_groups

    t0 = time.time()
    m = write_duplicate_groups(out)
    log(f"duplicate groups: {m['groups']} groups, {m['members']} copies ({time.time() - t0:.1f} s; "
        f"built in {m.get('built_seconds')} s)")


def table(results: dict) -> str:
    codes = list(results["runs"])
    names = list(dict.fromkeys(n for c in codes for n in results["runs"][c]["kinds"]))
    head = f"{'request':26s}" + "".join(f"{c + ' p50/p95 (first) ms':>36s}" for c in codes) + "   target"
    lines = [head, "-" * len(head)]
    for n in names:
        row = f"{n:26s}"
        for c in codes:
            e = results["runs"][c]["kinds"].get(n)
            row += f"{'-':>36s}" if e is None else \
                f"{'%.0f / %.0f (%.0f)%s' % (e['p50_ms'], e['p95_ms'], e['first_ms'], ' !' if e.get('not_ok') else ''):>36s}"
        row += f"   <= {TARGET_THUMB_MS if n == 'thumbnail' else TARGET_PAGE_MS} ms p95" \
            if not n.startswith("text search") else "   (search: index)"
        lines.append(row)
    lines.append(f"{'peak resident memory':26s}" + "".join(f"{'%.2f GB' % results['runs'][c]['peak_rss_gb']:>36s}"
                                                          for c in codes) + f"   <= {TARGET_RSS_GB} GB")
    if any("peak_rss_gb_browsing" in results["runs"][c] for c in codes):
        lines.append(f"{'  of which before search':26s}" + "".join(
            f"{'%.2f GB' % results['runs'][c].get('peak_rss_gb_browsing', float('nan')):>36s}" for c in codes))
    lines.append(f"{'first page after start':26s}" + "".join(
        f"{'%.1f s' % results['runs'][c]['first_page_after_start_s']:>36s}" for c in codes))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/curate-bench-serve"))
    p.add_argument("--base", type=Path, default=None, help="a checkout of the code to compare with (today's code)")
    p.add_argument("--repeat", type=int, default=20, help="requests per kind after the first (default 20)")
    p.add_argument("--cap", type=float, default=15.0, help="seconds per kind at most (at least 3 requests)")
    p.add_argument("--no-search", action="store_true", help="no FAISS index, no text search")
    p.add_argument("--no-embeddings", action="store_true",
                   help="an output without embeddings (a quarter of the disk; implies --no-search)")
    p.add_argument("--only", choices=["new", "base"], default=None)
    a = p.parse_args()
    a.no_search = a.no_search or a.no_embeddings
    out = a.work / f"out{a.rows}"
    prepare(out, a.rows, not a.no_search, not a.no_embeddings)
    f = facts(out)
    results = {"rows": a.rows, "output": str(out), "repeat": a.repeat, "runs": {}}
    runs = [("this checkout", REPO, True)] + ([("base", a.base.resolve(), False)] if a.base else [])
    for label, code, new in runs:
        if a.only and (a.only == "new") != new:
            continue
        log(f"curate serve with the code in {code} ({label})")
        results["runs"][label] = measure(code, out, f, a.repeat, new, a.cap, not a.no_search)
    (a.work / f"serve-bench-{a.rows}.json").write_text(json.dumps(results, indent=2))
    sys.stdout.write(table(results) + "\n")


if __name__ == "__main__":
    main()
