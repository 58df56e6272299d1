"""Request budget on object storage (#26): every S3 request the demo pipeline makes, from the server's side.

A moto S3 server runs in this process on 127.0.0.1; its WSGI application is wrapped, so every request it
answers is recorded as the server saw it (method, path, query string, Range, status, bytes sent) -- a
request made by the driver, a Ray worker or DuckDB's fsspec reads alike.  A ``logging.Handler`` on the
``werkzeug`` logger (the server's own access log) counts the same requests as a cross-check.

The demo corpus (``curate.demo``) is served on loopback, its input Parquet uploaded to the bucket, and the
demo pipeline (configs/demo.yaml; ``--pipeline light``: without its model stages) runs with its input and its
output on S3 (work folder ``OUTPUT/_work`` in the bucket).  Each request is classified

* by operation: PUT (objects written: PutObject, CompleteMultipartUpload, CopyObject; and raw requests, the
  multipart ones apart), GET (whole / ranged), HEAD, LIST (ListObjects[V2], ListMultipartUploads), DELETE;
* by area of its key (for a LIST: of its prefix): ``input``, ``_work/ingest``, ``_work/seg-K``,
  ``_work/view-K``, ``_work/done/seg-K``, ``_work/state/STAGE``, ``_work/timing``, ``_work/run.json``...,
  ``data/``, ``rejected/``, ``stats.json``, ``report.html``...;
* by phase of the run: prepare (input listing, manifest, run.json), ingest, ``seg-K.fit`` (the global stage's
  fit that opens segment K), ``seg-K`` (the rest of segment K: its done-marker listing, the previous segment's
  markers, the shard work), stats (stats.json), report (report.html).  Phases are marked by driver-side hooks;
  a Ray worker's request falls in the phase during which the server answered it.

It prints, per segment, requests per shard (area by area), flags any count that grows with the rows (a per-row
request) and any LIST of the whole work folder or of a segment's folder issued once per shard, and, at two
sizes with the same shard size, the per-shard counts side by side (flat: bounded).

    python bench/s3_requests.py                      # 1000 and 2000 rows, 200-row shards, local runner
    python bench/s3_requests.py --runner ray --n 2000 --shard 200
    python bench/s3_requests.py --pipeline light --n 240 480 --shard 40 --requests /tmp/requests.txt

Nothing leaves 127.0.0.0/8: the suite's loopback-only audit hook (tests/netguard) is loaded here and in every
process the run starts, and any attempt it blocked is reported (and fails the bench).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote

REPO = Path(__file__).resolve().parents[1]
BUCKET = "curate-bench"
SHARD_RE = re.compile(r"(?<![0-9a-f])([0-9a-f]{16}-\d{5})(?![0-9])")  # shard ids: HHHHHHHHHHHHHHHH-CCCCC

ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "CURATE_RAY_PROGRESS": "0",
       "TOKENIZERS_PARALLELISM": "false",
       # explicit dummy credentials, and no SDK may probe a cloud metadata address (tests/conftest.py)
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "curate-bench",
       "AWS_SECRET_ACCESS_KEY": "curate-bench", "AWS_DEFAULT_REGION": "us-east-1"}

#: the demo pipeline without its model stages (tests/test_s3.py's ``_light``)
LIGHT = ("download", "dedup_exact", "phash", "dedup_phash", "caption", "image_size", "aspect_ratio")


def setup_env(netguard: bool = True) -> Path | None:
    """The environment of a loopback-only run; with ``netguard`` the suite's audit hook in this process and
    (PYTHONPATH) in every Python process the run starts.  Returns its log file (None: not loaded here)."""
    for k, v in ENV.items():
        os.environ[k] = v if k.startswith("AWS_") else os.environ.get(k, v)
    if not netguard:
        return None
    if os.environ.get("CURATE_NETGUARD_LOG"):  # the test suite loaded it already
        return Path(os.environ["CURATE_NETGUARD_LOG"])
    guard = REPO / "tests" / "netguard"
    log = Path(tempfile.mkdtemp(prefix="curate-netguard-")) / "net.log"
    os.environ["CURATE_NETGUARD_LOG"] = str(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH")) if p)
    spec = importlib.util.spec_from_file_location("curate_netguard_hook", guard / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return log


# ----------------------------------------------------------------------------------------------- recording


@dataclass
class Request:
    seq: int
    t: float
    phase: str
    method: str
    path: str  # unquoted, without the query string
    query: dict[str, str]
    range: str | None
    copy: bool  # x-amz-copy-source
    status: int = 0
    sent: int = 0  # response body bytes

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def op(self) -> str:
        """The S3 operation."""
        q, m, key = self.query, self.method, self.key
        if not self.bucket:
            return "ListBuckets"
        if not key:
            if m == "GET":
                if "uploads" in q:
                    return "ListMultipartUploads"
                if "location" in q:
                    return "GetBucketLocation"
                return "ListObjectsV2" if q.get("list-type") == "2" else "ListObjects"
            if m == "POST" and "delete" in q:
                return "DeleteObjects"
            return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(m, f"{m}Bucket")
        if m == "PUT":
            if "uploadId" in q:
                return "UploadPart"
            return "CopyObject" if self.copy else "PutObject"
        if m == "POST":
            if "uploads" in q:
                return "CreateMultipartUpload"
            if "uploadId" in q:
                return "CompleteMultipartUpload"
            return "PostObject"
        if m == "GET":
            return "GetObject(range)" if self.range else "GetObject"
        if m == "HEAD":
            return "HeadObject"
        if m == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
        return f"{m}Object"

    @property
    def kind(self) -> str:
        """PUT / MPU (the multipart requests but their completion) / GET / GETR (ranged) / HEAD / LIST / DELETE."""
        return OP_KIND.get(self.op, "OTHER")

    @property
    def target(self) -> str:
        """The key a request is about; for a LIST its prefix."""
        return self.query.get("prefix", "") if self.kind == "LIST" else self.key

    @property
    def shard(self) -> str | None:
        m = SHARD_RE.search(self.target.rsplit("/", 1)[-1])
        return m.group(1) if m else None


OP_KIND = {"PutObject": "PUT", "CompleteMultipartUpload": "PUT", "CopyObject": "PUT",
           "CreateMultipartUpload": "MPU", "UploadPart": "MPU", "AbortMultipartUpload": "MPU",
           "GetObject": "GET", "GetObject(range)": "GETR", "HeadObject": "HEAD", "HeadBucket": "HEAD",
           "ListObjectsV2": "LIST", "ListObjects": "LIST", "ListMultipartUploads": "LIST", "ListBuckets": "LIST",
           "DeleteObject": "DELETE", "DeleteObjects": "DELETE"}
KINDS = ("PUT", "MPU", "GET", "GETR", "HEAD", "LIST", "DELETE", "OTHER")


class RequestLog:
    """Requests answered by the server (WSGI wrapper) and the lines of its access log (werkzeug logger)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.phase = "setup"
        self.phases: list[tuple[str, float]] = [("setup", time.time())]
        self.access_lines = 0

    def mark(self, phase: str) -> None:
        with self.lock:
            self.phase = phase
            self.phases.append((phase, time.time()))

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.access_lines = 0

    def since(self, seq: int) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.seq >= seq]

    @property
    def seq(self) -> int:
        with self.lock:
            return len(self.requests) and self.requests[-1].seq + 1

    def wrap(self, app):
        log = self

        def wsgi(environ, start_response):
            q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
            with log.lock:
                req = Request(log.requests[-1].seq + 1 if log.requests else 0, time.time(), log.phase,
                              environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")), q,
                              environ.get("HTTP_RANGE"), "HTTP_X_AMZ_COPY_SOURCE" in environ)
                log.requests.append(req)

            def start(status, headers, exc_info=None):
                req.status = int(status.split()[0])
                return start_response(status, headers, exc_info)

            body = app(environ, start)
            try:
                for chunk in body:
                    req.sent += len(chunk)
                    yield chunk
            finally:
                if hasattr(body, "close"):
                    body.close()

        return wsgi

    def access_handler(self) -> logging.Handler:
        log = self

        class _Access(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours non-200 lines
                if re.search(r'"(GET|PUT|POST|HEAD|DELETE) ', msg):
                    with log.lock:
                        log.access_lines += 1

        return _Access()


class S3Server:
    """moto's S3 API server on 127.0.0.1 (a free port) in a thread, every request recorded in ``log``."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        self.log = RequestLog()
        outer = self

        class _Recording(ThreadedMotoServer):
            def _server_entry(self) -> None:  # moto's, with the application wrapped
                from moto.moto_server.werkzeug_app import (
                    DomainDispatcherApplication,
                    MotoRequestHandler,
                    create_backend_app,
                )
                from werkzeug.serving import make_server

                app = outer.log.wrap(DomainDispatcherApplication(create_backend_app))
                self._server = make_server(self._ip_address, self._port, app, True,
                                           request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._handler = self.log.access_handler()
        self.server = _Recording(ip_address="127.0.0.1", port=0, verbose=False)

    def __enter__(self) -> Self:
        wz = logging.getLogger("werkzeug")  # the access log: counted here, not printed
        self._wz = (wz.level, wz.propagate)
        wz.setLevel(logging.INFO)
        wz.propagate = False
        wz.addHandler(self._handler)
        self.server.start()
        host, port = self.server.get_host_and_port()
        assert host == "127.0.0.1", host
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        wz = logging.getLogger("werkzeug")
        wz.removeHandler(self._handler)
        wz.level, wz.propagate = self._wz

    def bucket(self, name: str = BUCKET) -> str:
        """Create ``name`` (moto keeps its buckets in the process: it may exist already)."""
        try:
            self.client().create_bucket(Bucket=name)
        except self.client().exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, use_listings_cache=False, skip_instance_cache=True)


# ------------------------------------------------------------------------------------- phases of a run


class PhaseHooks:
    """Marks the phases of ``curate.pipeline.execute`` in ``log`` (driver-side hooks; requests of Ray workers
    fall in the phase during which the server answered them): prepare, ingest, seg-K (from the start of the
    driver's loop iteration for segment K), stats (stats.json and the report)."""

    def __init__(self, log: RequestLog) -> None:
        self.log = log
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, obj: Any, name: str, wrapper) -> None:
        old = getattr(obj, name)
        self._undo.append((obj, name, old))
        setattr(obj, name, wrapper(old))

    def __enter__(self) -> Self:
        import curate.incremental as inc
        import curate.pipeline as pl
        from curate.runners.base import Runner

        log = self.log

        def before(phase: str, after: str | None = None):
            def wrap(fn):
                def inner(*a, **kw):
                    log.mark(phase)
                    try:
                        return fn(*a, **kw)
                    finally:
                        if after:
                            log.mark(after)
                return inner
            return wrap

        def segment_start(fn):
            def inner(segments, schema, k):
                if sys._getframe(1).f_code.co_name == "_run_segments":  # the loop's first call per segment
                    log.mark(f"seg-{k}")
                return fn(segments, schema, k)
            return inner

        def fit(fn):
            def inner(*a, **kw):
                seg = log.phase
                log.mark(f"{seg}.fit")
                try:
                    return fn(*a, **kw)
                finally:
                    log.mark(seg)
            return inner

        self._patch(pl, "prepare_output", before("prepare", "ingest"))
        self._patch(pl, "build_stats", before("stats"))
        self._patch(pl, "_write_report", before("report"))
        self._patch(inc, "view_columns", segment_start)
        self._patch(Runner, "fit", fit)
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, name, old in reversed(self._undo):
            setattr(obj, name, old)


# ------------------------------------------------------------------------------------------- analysis


OUT_FILES = ("stats.json", "report.html", "config.resolved.yaml")
WORK_FILES = ("run.json", "input_manifest.json", "output_schema.arrow")


def area(target: str, out_prefix: str, in_prefix: str) -> str:
    """Where a key (a LIST's prefix; a probe of a folder) is: input, _work/seg-K, _work/done/seg-K, ...,
    data/, stats.json...  ``(bucket)``: a request on the bucket itself (DeleteObjects: a recursive delete)."""
    t = target.rstrip("/")
    if not t:
        return "(bucket)"
    if (t + "/").startswith(in_prefix):
        return "input"
    if not (t + "/").startswith(out_prefix):
        return "other"
    parts = [x for x in t[len(out_prefix):].split("/") if x]
    if not parts:
        return "OUT/"
    if parts[0] != "_work":
        return parts[0] if parts[0] in OUT_FILES else parts[0] + "/"
    if len(parts) == 1:
        return "_work/"  # the work folder's root
    if parts[1] in WORK_FILES:
        return f"_work/{parts[1]}"
    if parts[1] in ("done", "state"):
        return f"_work/{parts[1]}/{parts[2]}" if len(parts) > 2 else f"_work/{parts[1]}/"
    return f"_work/{parts[1]}"


def list_scope(r: Request, out_prefix: str) -> str:
    """A LIST's scope: ``exists`` (``max-keys=1``: s3fs's existence probe after a HEAD found no object),
    ``shard`` (its prefix names a shard: one shard's files), ``root`` (the work folder's or the output's root),
    ``folder`` (one folder: a segment's done markers, a fit's state folder...)."""
    if r.query.get("max-keys") == "1":
        return "exists"
    if r.shard:
        return "shard"
    pre = r.target.rstrip("/")
    if pre in (out_prefix.rstrip("/"), out_prefix.rstrip("/") + "/_work"):
        return "root"
    return "folder"


@dataclass
class RunCounts:
    """The requests of one pipeline run, classified."""

    label: str
    rows: int
    shards: int
    requests: list[Request]
    out_prefix: str
    in_prefix: str
    seconds: float = 0.0
    access_lines: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    cells: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (phase, area, kind) -> count

    def __post_init__(self) -> None:
        c: Counter = Counter()
        for r in self.requests:
            c[(r.phase, self.area(r), r.kind)] += 1
        self.cells = dict(c)

    def area(self, r: Request) -> str:
        return area(r.target, self.out_prefix, self.in_prefix)

    @property
    def phases(self) -> list[str]:
        seen = list(dict.fromkeys(r.phase for r in self.requests))
        return sorted(seen, key=phase_order)

    def by_phase(self, phase: str) -> dict[str, Counter]:
        """area -> kind -> count, within a phase."""
        out: dict[str, Counter] = defaultdict(Counter)
        for (ph, ar, kind), n in self.cells.items():
            if ph == phase:
                out[ar][kind] += n
        return out

    def objects_written(self, phase: str | None = None) -> int:
        return sum(1 for r in self.requests if r.kind == "PUT" and (phase is None or r.phase == phase))

    def lists(self) -> list[Request]:
        return [r for r in self.requests if r.kind == "LIST"]


def phase_order(p: str) -> tuple[int, int, int]:
    fixed = {"setup": 0, "prepare": 1, "ingest": 2, "stats": 1000, "report": 1001}
    if p.startswith("seg-"):
        k, _, sub = p[4:].partition(".")
        return (3, int(k), 0 if sub else 1)  # seg-K.fit before the rest of seg-K
    return (fixed.get(p, 999), 0, 0)


def run_counts(label: str, rows: int, shards: int, requests: list[Request], out_prefix: str, in_prefix: str,
               **kw: Any) -> RunCounts:
    return RunCounts(label, rows, shards, requests, out_prefix.strip("/") + "/", in_prefix.strip("/") + "/", **kw)


def per_shard_table(rc: RunCounts) -> list[dict[str, Any]]:
    """One line per (phase, area): requests by kind, their total and total per shard."""
    lines = []
    for ph in rc.phases:
        for ar, kinds in sorted(rc.by_phase(ph).items()):
            total = sum(kinds.values())
            lines.append({"phase": ph, "area": ar, **{k: kinds.get(k, 0) for k in KINDS}, "total": total,
                          "per_shard": total / rc.shards})
    return lines


def phase_totals(rc: RunCounts) -> dict[str, dict[str, float]]:
    """phase -> kind -> requests per shard (and 'total', 'objects' written per shard)."""
    out: dict[str, dict[str, float]] = {}
    for ph in rc.phases:
        kinds: Counter = Counter()
        for k in rc.by_phase(ph).values():
            kinds.update(k)
        d = {k: kinds.get(k, 0) / rc.shards for k in KINDS}
        d["total"] = sum(kinds.values()) / rc.shards
        out[ph] = d
    return out


@dataclass
class Flag:
    what: str
    detail: str


def flags(rc: RunCounts, rows_per_shard: int) -> list[Flag]:
    """What breaks the budget: a (phase, area, kind) that costs about a request per row (>= half of the
    rows of a shard, per shard); a LIST of the work root; a LIST of a whole folder issued once per shard or more
    (in one phase)."""
    out: list[Flag] = []
    for (ph, ar, kind), n in sorted(rc.cells.items()):
        if ph != "setup" and n / rc.shards >= max(20, rows_per_shard / 2):
            out.append(Flag("per-row?", f"{ph} {ar} {kind}: {n} requests, {n / rc.shards:.1f} per shard "
                                        f"({rows_per_shard} rows per shard)"))
    by: Counter = Counter()
    roots: Counter = Counter()
    for r in rc.lists():
        if r.phase == "setup":
            continue
        scope = list_scope(r, rc.out_prefix)
        if scope == "root":
            roots[(r.phase, r.target, r.query.get("delimiter"))] += 1
        elif scope == "folder":
            by[(r.phase, r.target, r.query.get("delimiter"))] += 1
    for (ph, pre, delim), n in sorted(roots.items()):
        out.append(Flag("LIST root", f"{ph}: {n} LIST(s) of prefix={pre!r} (delimiter={delim!r})"))
    for (ph, pre, delim), n in sorted(by.items()):
        if n >= rc.shards:
            out.append(Flag("LIST folder >= once per shard", f"{ph}: {n} LISTs of prefix={pre!r} "
                                                             f"(delimiter={delim!r}) for {rc.shards} shards"))
    return out


@dataclass
class PhaseBudget:
    """What a phase of a run cost: every request, and its LISTs by scope."""

    requests: int = 0
    kinds: Counter = field(default_factory=Counter)
    lists: Counter = field(default_factory=Counter)  # scope -> LISTs (shard / folder / root / exists)
    by_shard: Counter = field(default_factory=Counter)  # shard -> requests whose key (prefix) names it
    shared: int = 0  # requests whose key names no shard (a fit's state, a done folder's listing...)

    @property
    def max_per_shard(self) -> int:
        return max(self.by_shard.values(), default=0)


def budget(rc: RunCounts) -> dict[str, PhaseBudget]:
    """phase -> its :class:`PhaseBudget`."""
    out: dict[str, PhaseBudget] = defaultdict(PhaseBudget)
    for r in rc.requests:
        b = out[r.phase]
        b.requests += 1
        b.kinds[r.kind] += 1
        if r.kind == "LIST":
            b.lists[list_scope(r, rc.out_prefix)] += 1
        if r.shard:
            b.by_shard[r.shard] += 1
        else:
            b.shared += 1
    return dict(out)


def repeated_reads(rc: RunCounts, top: int = 12) -> list[tuple[str, int, int, list[str]]]:
    """Keys read (GET/ranged GET/HEAD) more than once: (area, reads, distinct keys, phases), summed per area."""
    per_key: dict[str, list[Request]] = defaultdict(list)
    for r in rc.requests:
        if r.kind in ("GET", "GETR", "HEAD") and r.phase != "setup":
            per_key[r.key].append(r)
    agg: dict[str, list] = {}
    for rs in per_key.values():
        if len(rs) < 2:
            continue
        ar = rc.area(rs[0])
        a = agg.setdefault(ar, [0, 0, set()])
        a[0] += len(rs)
        a[1] += 1
        a[2].update(r.phase for r in rs)
    lines = [(ar, n, k, sorted(ph, key=phase_order)) for ar, (n, k, ph) in agg.items()]
    return sorted(lines, key=lambda x: -x[1])[:top]


# ------------------------------------------------------------------------------------------ the runs


def demo_config(input_uri: str, output_uri: str, endpoint: str, shard: int, runner: str, pipeline: str,
                timeout: float) -> dict:
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["input"]["path"], cfg["output"]["path"] = input_uri, output_uri
    cfg["input"]["shard_size"] = shard
    cfg["runner"]["kind"] = runner
    cfg["storage"] = {"endpoint_url": endpoint}
    if pipeline == "light":
        cfg["stages"] = [st for st in cfg["stages"] if st["stage"] in LIGHT]
    for st in cfg["stages"]:
        if st["stage"] == "download":
            st["timeout"] = timeout
    return cfg


def measure(server: S3Server, input_table, rows: int, shard: int, runner: str = "local", pipeline: str = "demo",
            timeout: float = 3.0, tag: str = "", over: dict | None = None) -> RunCounts:
    """Upload the first ``rows`` rows of ``input_table`` and run the pipeline on S3; the run's requests."""
    import uuid

    import pyarrow.parquet as pq

    import curate

    name = f"{pipeline}-{runner}-n{rows}-s{shard}{tag}-{uuid.uuid4().hex[:6]}"  # moto's buckets outlive a server
    in_prefix, out_prefix = f"{name}/in", f"{name}/out"  # keys in BUCKET
    fs = server.s3fs()
    with fs.open(f"{BUCKET}/{in_prefix}/demo.parquet", "wb") as f:
        pq.write_table(input_table.slice(0, rows), f)
    cfg = demo_config(f"s3://{BUCKET}/{in_prefix}/", f"s3://{BUCKET}/{out_prefix}", server.endpoint, shard, runner,
                      pipeline, timeout)
    from curate.config import apply_override

    for k, v in (over or {}).items():
        apply_override(cfg, k, v)
    first = server.log.seq
    lines0 = server.log.access_lines
    marks0 = len(server.log.phases)
    t0 = time.perf_counter()
    with PhaseHooks(server.log):
        server.log.mark("prepare")
        res = curate.run(cfg)
    seconds = time.perf_counter() - t0
    server.log.mark("setup")
    time.sleep(0.2)  # the last responses' bodies
    reqs = server.log.since(first)
    marks = server.log.phases[marks0:]
    spent: dict[str, float] = defaultdict(float)
    for (ph, t), (_, t_next) in itertools.pairwise(marks):
        spent[ph] += t_next - t
    n_shards = res.stats["run"]["shards"]
    return run_counts(name, rows, n_shards, reqs, out_prefix, in_prefix, seconds=seconds,
                      access_lines=server.log.access_lines - lines0, phase_seconds=dict(spent))


# ------------------------------------------------------------------------------------------- printing


def fmt_table(rc: RunCounts) -> str:
    """Per phase and area: requests by kind, their total, and total per shard; a subtotal line per phase."""
    cols = [k for k in KINDS if k != "OTHER"]
    head = f"{'phase':<10}{'area':<28}" + "".join(f"{k:>6}" for k in cols) + f"{'total':>7}{'/shard':>8}"
    out = [(f"== {rc.label}: {rc.rows} rows, {rc.shards} shards, {len(rc.requests)} requests "
            f"({rc.objects_written()} objects written), {rc.seconds:.1f} s"), head]
    lines = per_shard_table(rc)
    for ph in rc.phases:
        mine = [ln for ln in lines if ln["phase"] == ph]
        for ln in mine:
            out.append(f"{ln['phase']:<10}{ln['area']:<28}" + "".join(f"{ln[k]:>6}" for k in cols)
                       + f"{ln['total']:>7}{ln['per_shard']:>8.2f}")
        tot = {k: sum(ln[k] for ln in mine) for k in cols + ["total"]}
        secs = rc.phase_seconds.get(ph)
        out.append(f"{'':<10}{'= ' + ph + (f' ({secs:.1f} s)' if secs is not None else ''):<28}"
                   + "".join(f"{tot[k]:>6}" for k in cols) + f"{tot['total']:>7}{tot['total'] / rc.shards:>8.2f}")
    return "\n".join(out)


def fmt_compare(runs: list[RunCounts]) -> str:
    """Requests per shard, per phase and kind, one line per run (same shard size: flat lines are bounded)."""
    tots = [phase_totals(r) for r in runs]
    phases = sorted({p for t in tots for p in t if p != "setup"}, key=phase_order)
    cols = ("PUT", "MPU", "GET", "GETR", "HEAD", "LIST", "DELETE", "total")
    out = ["requests per shard, by phase: " + "  vs  ".join(f"{r.rows} rows / {r.shards} shards" for r in runs),
           f"{'phase':<10}{'rows':>6}" + "".join(f"{c:>8}" for c in cols)]
    for ph in phases:
        for i, (r, t) in enumerate(zip(runs, tots)):
            d = t.get(ph, {})
            out.append(f"{ph if i == 0 else '':<10}{r.rows:>6}" + "".join(f"{d.get(c, 0.0):>8.2f}" for c in cols))
    out.append(f"{'all':<10}" + "".join(f"{r.rows:>6}: {sum(d['total'] for p, d in t.items() if p != 'setup'):.1f}"
                                        for r, t in zip(runs, tots)) + "  requests per shard in all")
    return "\n".join(out)


def growth_flags(runs: list[RunCounts], slack: float = 1.0) -> list[Flag]:
    """(phase, area, kind) whose requests per shard grow from the smaller run to the larger one by more than
    ``slack`` request per shard (and by more than 10 %)."""
    if len(runs) < 2:
        return []
    a, b = min(runs, key=lambda r: r.rows), max(runs, key=lambda r: r.rows)
    out = []
    for key in sorted(set(a.cells) | set(b.cells)):
        if key[0] == "setup":
            continue
        pa_, pb = a.cells.get(key, 0) / a.shards, b.cells.get(key, 0) / b.shards
        if pb - pa_ > slack and pb > 1.1 * pa_:
            out.append(Flag("grows", f"{' '.join(key)}: {pa_:.2f} -> {pb:.2f} per shard ({a.rows} -> {b.rows} rows)"))
    return out


def fmt_lists(rc: RunCounts) -> str:
    c: Counter = Counter()
    for r in rc.lists():
        pre = SHARD_RE.sub("SHARD", r.target)
        c[(r.phase, list_scope(r, rc.out_prefix), pre, r.query.get("delimiter", ""))] += 1
    out = [f"LISTs of {rc.label} (prefix with the shard id as SHARD):"]
    for (ph, scope, pre, d), n in sorted(c.items(), key=lambda x: (phase_order(x[0][0]), x[0][1:])):
        out.append(f"  {ph:<11}{scope:<7}{n:>5} x  prefix={pre!r} delimiter={d!r}")
    return "\n".join(out)


def fmt_ops(rc: RunCounts) -> str:
    c = Counter(r.op for r in rc.requests)
    return "raw requests by S3 operation: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000], help="rows (each size a run)")
    ap.add_argument("--shard", type=int, default=200, help="input.shard_size")
    ap.add_argument("--runner", choices=("local", "ray"), default="local")
    ap.add_argument("--pipeline", choices=("demo", "light"), default="demo")
    ap.add_argument("--timeout", type=float, default=3.0, help="the download stage's timeout (s)")
    ap.add_argument("--requests", type=Path, help="write every request of every run to this file")
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args(argv)

    netlog = setup_env()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import pyarrow.parquet as pq

    from curate.demo.corpus import build_site, write_input
    from curate.demo.server import DemoServer

    tmp = Path(tempfile.mkdtemp(prefix="curate-s3req-"))
    runs: list[RunCounts] = []
    try:
        site = tmp / "site"
        build_site(site, n_rows=max(args.n), seed=0)
        with S3Server() as server, DemoServer(site, slow_seconds=args.timeout + 2.0) as demo:
            server.bucket()
            table = pq.read_table(write_input(site, demo.base_url, tmp / "input.parquet"))
            ray_started = False
            if args.runner == "ray":
                from curate.raycluster import start_local_ray

                ray_tmp, ray_home = start_local_ray(num_cpus=2, object_store_memory=300 * 1024**2)
                ray_started = True
            try:
                for n in sorted(args.n):
                    rc = measure(server, table, n, args.shard, args.runner, args.pipeline, args.timeout)
                    runs.append(rc)
                    print(fmt_table(rc), flush=True)
                    print(fmt_ops(rc))
                    print(f"  (werkzeug access log: {rc.access_lines} lines; recorded: {len(rc.requests)})")
                    print(fmt_lists(rc))
                    print("keys read more than once (area: reads, keys, phases):")
                    for ar, reads, keys, phs in repeated_reads(rc):
                        print(f"  {ar:<28}{reads:>6} reads of {keys:>4} keys  in {', '.join(phs)}")
                    for fl in flags(rc, args.shard):
                        print(f"FLAG {fl.what}: {fl.detail}")
                    print(flush=True)
            finally:
                if ray_started:
                    import ray

                    ray.shutdown()
                    shutil.rmtree(ray_home, ignore_errors=True)
                    shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.requests and runs:
            with open(args.requests, "w") as f:
                for rc in runs:
                    for r in rc.requests:
                        q = "&".join(f"{k}={v}" for k, v in sorted(r.query.items()))
                        f.write(f"{rc.label} {r.phase:<10}{r.op:<24}{r.status:>4} {r.path}{'?' + q if q else ''}"
                                f"{' range=' + r.range if r.range else ''} ({r.sent} B)\n")
        print(fmt_compare(runs))
        for fl in growth_flags(runs):
            print(f"FLAG {fl.what}: {fl.detail}")
        if args.json:
            args.json.write_text(json.dumps([{"label": r.label, "rows": r.rows, "shards": r.shards,
                                              "seconds": r.seconds, "table": per_shard_table(r)} for r in runs],
                                            indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if netlog is not None and netlog.exists():
        blocked = [x for x in netlog.read_text(errors="replace").splitlines() if x.startswith("BLOCKED")]
        if blocked:
            print("NON-LOOPBACK NETWORK ATTEMPTS (blocked):\n" + "\n".join(blocked[:20]))
            return 1
    return 0


if __name__ == "__main__":  # img2dataset-style workers need the guard
    sys.exit(main())
