"""Request budget on object storage (#26): the requests a run makes, counted by the S3 server itself.

The light demo pipeline (no model stages) runs with its input, output and work folder on a moto S3 server on
127.0.0.1 whose every answered request is recorded (bench/s3_requests.py: the server's WSGI application is
wrapped, its werkzeug access log counts the same requests).  Per segment, the requests about one shard's files
must stay within what the design needs for a shard, the requests about no shard's file within a constant per
segment plus the segment's decision-file read per shard, and no LIST may cover the work folder's root or a
whole folder once per shard.  bench/s3_requests.py prints the same counts for the full demo at two sizes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import storage_restored

REPO = Path(__file__).resolve().parents[1]
ROWS, SHARD = 240, 40  # 6 shards; 3 segments: [unique_uid, download] [dedup_exact, phash] [dedup_phash, ...]


def _bench():
    name = "curate_bench_s3_requests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "s3_requests.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


# What one shard needs in segment K, request by request, with s3fs's costs: a PUT per object written; a read
# of a small object is a HEAD and a GET, of a Parquet file a HEAD, the footer's GET and, when the file is larger
# than that first read, one more GET for the columns; the part files of a column group are found by one LIST of
# the shard's prefix (``seg-K/SHARD~``).
WRITES = 4  # the column group and the fit view (final segment: data/ and rejected/), the done marker, its certificate
FINAL_WRITES = 5  # the final segment also writes its (small) column group: the row cache of a later re-run
# the final segment notes what data/ and rejected/ were made from, for a later run that may keep them
# (runners/carry.py): the done markers of the segments before it (a read each) and the two files' ETags (a HEAD each)
FINAL_NOTES = 2
SMALL_READ, PARQUET_READ, FOOTER_READ = 2, 3, 2


def shard_bound(k: int, view: bool) -> int:
    """Requests about one shard's files in segment ``k`` (``view``: it writes the next fit's view)."""
    need = WRITES
    need += SMALL_READ if k else 0  # the previous segment's done marker: the rows entering (pipeline.py)
    need += PARQUET_READ * (k + 1) + k  # the rows: the base and the k column groups before it (one LIST each)
    # Not needed by the design, made today, to fold: the base's footer read again (segment 0: live_count), and
    # the view's sources -- a LIST and a footer per column group, the base's footer -- all of them files this
    # process has just read or written (runners/flow.py view_sources).
    need += FOOTER_READ if k == 0 else 0
    if view:
        need += FOOTER_READ * (k + 2) + (k + 1)
    return need


# Requests about no shard's file, per segment: the driver lists the done markers (``done/`` for the segment
# folders and ``done/seg-K/``, an existence probe of it: HEAD + LIST max-keys=1) ...
SHARED_FIXED = 4
# ... and each shard reads its segment's global-stage decision file (HEAD + GET; one file at this size).
SHARED_PER_SHARD = SMALL_READ


@pytest.fixture(scope="module")
def s3_log():
    """bench/s3_requests.py and its recording S3 server; the storage settings a run sets are restored after."""


    bench = _bench()
    with storage_restored(), bench.S3Server() as server:
        server.bucket()
        yield bench, server


def test_requests_per_shard_and_segment_are_bounded(s3_log, demo_input, monkeypatch):
    bench, server = s3_log
    # the report reads data/ and rejected/ through DuckDB's fsspec bridge (~2,000 requests here): measured and
    # reported by the bench, left out of this test's run to keep it short
    monkeypatch.setattr("curate.pipeline._write_report", lambda layout: None)
    rc = bench.measure(server, pq.read_table(demo_input), ROWS, SHARD, "local", "light", timeout=1.0)
    assert rc.access_lines == len(rc.requests), "the WSGI recorder missed requests the access log has"
    b = bench.budget(rc)
    S = rc.shards
    assert S == ROWS // SHARD
    segments = sorted({p.split(".")[0] for p in b if p.startswith("seg-")}, key=bench.phase_order)
    assert segments == ["seg-0", "seg-1", "seg-2"], segments
    report = "\n" + bench.fmt_table(rc) + "\n" + bench.fmt_lists(rc)
    for ph, pb in b.items():  # nothing lists the work folder's root or the output's (existence probes aside)
        assert pb.lists["root"] == 0, f"{ph}: LIST of the work root or the output root" + report
    for seg in segments:
        k = int(seg[4:])
        pb, view = b[seg], k < len(segments) - 1  # every later segment opens with a global stage: a view each
        bound = shard_bound(k, view) + (0 if view else FINAL_WRITES - WRITES + SMALL_READ * k + FINAL_NOTES)
        worst = max(pb.by_shard.items(), key=lambda x: x[1])
        assert len(pb.by_shard) == S and pb.max_per_shard <= bound, \
            f"{seg}: {worst[1]} requests about shard {worst[0]}'s files, more than the {bound} it needs" + report
        # LISTs: one per column group a shard's rows or view read, by the shard's prefix; a segment's folders
        # (done/) once per segment, never once per shard
        assert pb.lists["shard"] <= S * (k + (k + 1 if view else 0)), f"{seg}: {pb.lists['shard']} LISTs" + report
        assert pb.lists["folder"] <= 2 and pb.lists["exists"] <= 1, f"{seg}: {dict(pb.lists)}" + report
        writes = WRITES if view else FINAL_WRITES
        assert pb.kinds["PUT"] <= writes * S and pb.kinds["MPU"] == 0, f"{seg}: {dict(pb.kinds)}" + report
        assert pb.shared <= SHARED_FIXED + SHARED_PER_SHARD * S, \
            f"{seg}: {pb.shared} requests about no shard's file ({S} shards)" + report
    # a global stage's fit reads, per shard, its view and the files the view names (DuckDB through fsspec:
    # ~15 HEADs per file per query today) -- bounded per file, and its own state folder once per fit
    for seg in segments:
        fit = b.get(f"{seg}.fit")
        if fit is None:
            continue
        k = int(seg[4:])
        files = 1 if k == 0 else k + 2  # segment 0's fit reads the bases; later ones the view, base and groups
        assert fit.max_per_shard <= 25 * files, f"{seg}.fit: {fit.max_per_shard} requests about one shard" + report
        assert fit.lists["root"] == 0 and fit.lists["shard"] == 0, f"{seg}.fit: {dict(fit.lists)}" + report
        assert fit.lists["folder"] + fit.lists["exists"] < 60, f"{seg}.fit: {dict(fit.lists)}" + report
    # the whole run: not one request per row (6 shards x 40 rows; the fits' HEADs are per file)
    per_shard = sum(pb.requests for ph, pb in b.items() if ph != "setup") / S
    assert per_shard < 250, f"{per_shard:.0f} requests per shard in all" + report
