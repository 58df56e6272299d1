"""The scale-out engine: live rows only, shard-level resume on Ray, bounded workers, models released."""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import curate
from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from helpers import read_dir, rows_by_uid, stage_counts

ALLOW = ["127.0.0.1/32"]


def _photos(path: Path, base: str, n: int, delay: float = 0.0) -> Path:
    tag = path.parent.name  # the test's own URLs: the server counts requests per path
    urls = [f"{base}/photo/{tag}-{i}.jpg" + (f"?delay={delay}" if delay else "") for i in range(n)]
    urls[3] = urls[2]  # one exact duplicate (same url, other caption): dedup_exact rejects one of them
    pq.write_table(pa.table({"url": urls, "caption": [f"a photo with a square, number {i}" for i in range(n)]}), path)
    return path


def _cfg(inp: Path, out: Path, runner: str = "local", shard_size: int = 4, extra: list | None = None) -> dict:
    return {"input": {"path": str(inp), "shard_size": shard_size}, "output": {"path": str(out)},
            "runner": {"kind": runner, "num_cpus": 2},
            "stages": [{"stage": "download", "image_size": 64, "allow_networks": ALLOW, "thread_count": 4},
                       {"stage": "dedup_exact"}, {"stage": "phash"}] + (extra or [])}


def _hits_by_path(base: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as r:
        return json.loads(r.read())["hits"]


# -- live rows only ------------------------------------------------------------------------------------
def test_rejected_rows_leave_the_flow_and_images_are_written_once(hostile_server, tmp_path, monkeypatch):
    import curate.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_cleanup", lambda layout, n: None)  # keep the work folder to look at it
    inp = _photos(tmp_path / "in.parquet", hostile_server, 12)
    urls = pq.read_table(inp)["url"].to_pylist()
    urls[5] = f"{hostile_server}/missing.jpg"  # rejected by download (404)
    pq.write_table(pa.table({"url": urls, "caption": pq.read_table(inp)["caption"]}), inp)
    out = tmp_path / "out"
    from curate.runners.flow import read_view, view_schema

    curate.run(_cfg(inp, out, extra=[{"stage": "dedup_phash"}]))  # three segments
    work = out / "_work"
    g0 = pa.concat_tables([pq.read_table(f) for f in sorted((work / "seg-0").rglob("*.parquet"))])
    g1 = pa.concat_tables([pq.read_table(f) for f in sorted((work / "seg-1").rglob("*.parquet"))])
    assert S.IMAGE in g0.column_names and S.IMAGE not in g1.column_names  # image bytes written once
    assert set(g1.column_names) <= {"__pos", S.PHASH, S.DUPLICATE_OF, S.DUPLICATE_KIND, *S.REJECT_COLUMNS}
    assert g0.num_rows == 12 and g1.num_rows == 11  # the 404 row left the flow after segment 0
    views = sorted((work / "view-1").glob("*.parquet"))
    for view in views:
        assert pq.read_schema(view).names == ["__pos"]  # a view copies no column: it points at where they are
        assert S.IMAGE not in view_schema(view).names and S.IMAGE_SHA256 in view_schema(view).names
    seen = pa.concat_tables([read_view(v, [S.UID, S.IMAGE_SHA256]) for v in views])
    assert seen.num_rows == 11 and seen[S.IMAGE_SHA256].null_count == 0  # the live rows, their values joined
    rows = read_dir(out / "data").to_pylist() + read_dir(out / "rejected").to_pylist()
    assert len(rows) == 12 and len({r["uid"] for r in rows}) == 12
    gone = [r for r in rows if r["reject_reason"]]
    miss = next(r for r in gone if r["url"] == urls[5])
    assert miss["reject_stage"] == "download" and miss[S.IMAGE] is None and miss[S.PHASH] is None
    dup = next(r for r in gone if r["reject_stage"] == "dedup_exact")
    assert dup["image"] and dup[S.PHASH] is None  # rejected in segment 1: the columns it had by then


def test_fit_views_reference_embeddings_instead_of_copying_them(hostile_server, tmp_path, monkeypatch):
    import numpy as np

    import curate.pipeline as pipeline
    from curate.runners.flow import view_refs, view_schema
    from curate.stages.dedup_semantic import _read_active

    monkeypatch.setattr(pipeline, "_cleanup", lambda layout, n: None)
    inp = _photos(tmp_path / "in.parquet", hostile_server, 10)
    out = tmp_path / "out"
    curate.run(_cfg(inp, out, extra=[{"stage": "clip_embed"}, {"stage": "dedup_semantic", "threshold": 0.9999}]))
    views = sorted((out / "_work" / "view-2").glob("*.parquet"))
    assert views
    final = {r["uid"]: r[S.IMAGE_EMBEDDING] for r in read_dir(out / "data").to_pylist()}
    seen = 0
    for v in views:
        assert S.IMAGE_EMBEDDING not in pq.read_schema(v).names  # not copied into the view ...
        assert S.IMAGE_EMBEDDING in view_schema(v).names  # ... but there for the fit
        refs = view_refs(v)[S.IMAGE_EMBEDDING]
        assert refs and all("/seg-1/" in f and Path(f).exists() for f in refs)
        t, x = _read_active(str(v), [S.UID, S.IMAGE_EMBEDDING], S.IMAGE_EMBEDDING)
        for uid, e in zip(t[S.UID].to_pylist(), x):
            if uid in final:
                assert np.array_equal(np.asarray(final[uid], e.dtype), e)
                seen += 1
    assert seen >= 6


# -- models released between segments ----------------------------------------------------------------
_SEEN: list[int] = []


class _ProbeParams(StageParams):
    stage: str = "probe_models"


@register
class _ProbeModels(MapStage):
    """Test stage: counts the CLIP models alive in this process when it runs."""

    name = "probe_models"
    Params = _ProbeParams
    default_resources = Resources(num_cpus=0.25, batch_size=1024)

    def process(self, table: pa.Table) -> pa.Table:
        import open_clip

        gc.collect()
        models = (open_clip.CLIP, open_clip.CustomTextCLIP)
        _SEEN.append(sum(type(o) in models for o in gc.get_objects()))
        return table


def test_models_of_a_segment_are_freed_when_it_ends(hostile_server, tmp_path):
    inp = _photos(tmp_path / "in.parquet", hostile_server, 8)
    _SEEN.clear()
    cfg = _cfg(inp, tmp_path / "out", extra=[{"stage": "clip_embed"}, {"stage": "probe_models", "id": "same_segment"},
                                             {"stage": "clip_score", "top_fraction": 0.5},
                                             {"stage": "probe_models", "id": "next_segment"}])
    curate.run(cfg)
    assert _SEEN[0] >= 1, "the probe should see the CLIP model of its own segment"
    assert _SEEN[-1] == 0, f"CLIP still loaded in the next segment: {_SEEN}"


# -- bounded workers ----------------------------------------------------------------------------------
@pytest.mark.ray
def test_a_task_worker_keeps_one_stage_object_over_hundreds_of_batches(ray_cluster, monkeypatch):
    """The body of a Ray task, called as a worker calls it: state deserialised anew for every batch."""
    from curate.runners import ray_runner as rr

    builds = []
    real = rr._build_stage
    monkeypatch.setattr(rr, "_build_stage", lambda p, s: builds.append(1) or real(p, s))
    rr._STAGES.clear()
    state = {"files": [], "count": 0}
    ref = [ray_cluster.put(state)]
    params = {"stage": "unique_uid", "id": "unique_uid"}
    batch = pa.table({S.UID: ["a", "b"], S.SHARD: ["00000-00000"] * 2, S.SOURCE_ROW: [0, 1],
                      **{c: pa.nulls(2, pa.string()) for c in S.REJECT_COLUMNS}})
    for _ in range(300):
        args = pickle.loads(pickle.dumps((params, ref, "segment-run-1", 0)))  # what Ray hands every task
        out = rr._stage_task(batch, *args)
        assert out.num_rows == 2
    assert len(builds) == 1 and len([k for k in rr._STAGES if k != "key"]) == 1
    first = rr._STAGES[0]
    rr._stage_task(batch, params, ref, "segment-run-2", 0)  # the next segment: the old stage is torn down
    assert len(builds) == 2 and rr._STAGES[0] is not first and not first._ready
    rr._STAGES.clear()


# -- shard-level resume on Ray, a killed worker, a killed driver --------------------------------------
def _owner_of(pid: int) -> Path | None:
    import tempfile

    for f in Path(tempfile.gettempdir()).glob("curate-ray-*/curate-owner.json"):
        try:
            if json.loads(f.read_text())["driver"]["pid"] == pid:
                return f.parent
        except (OSError, ValueError, KeyError):
            continue
    return None


@pytest.mark.ray
@pytest.mark.slow
def test_ray_driver_killed_redoes_only_unfinished_shards(hostile_server, tmp_path):
    n, shard = 64, 4  # 16 shards; 0.6 s per image keeps segment 0 busy long enough to kill it half-way
    inp = _photos(tmp_path / "in.parquet", hostile_server, n, delay=0.6)
    out = tmp_path / "out"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(inp, out, "ray", shard)))
    cmd = [sys.executable, "-m", "curate.cli", "run", str(cfg_path)]
    done_dir = out / "_work" / "done" / "seg-0"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ,
                            CURATE_RAY_PROGRESS="0"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = len(list(done_dir.glob("*.json"))) if done_dir.exists() else 0
        if done >= n // shard // 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before half of segment 0 was done"
    instance = _owner_of(proc.pid)
    t_kill = time.monotonic()
    proc.send_signal(signal.SIGKILL)  # the driver only: its Ray processes are left behind, as after a crash
    proc.wait()
    # shard tasks already running may still finish (each writes its done marker after its data) until Ray
    # notices the dead driver and ends its workers: count once the markers stop changing
    finished, quiet = sorted(f.stem for f in done_dir.glob("*.json")), time.monotonic()
    while time.monotonic() - quiet < 5 and time.monotonic() - t_kill < 60:
        time.sleep(0.2)
        now = sorted(f.stem for f in done_dir.glob("*.json"))
        if now != finished:
            finished, quiet = now, time.monotonic()
    killed_at = len(finished)
    assert n // shard // 2 <= killed_at < n // shard, killed_at
    leftover = json.loads((instance / "curate-owner.json").read_text())["procs"] if instance else []
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, CURATE_RAY_PROGRESS="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    todo = re.findall(r"segment 0 \(.*\): (\d+) of (\d+) shards to do", res.stderr)
    assert todo and int(todo[0][0]) == n // shard - killed_at and int(todo[0][1]) == n // shard, res.stderr[-2000:]
    # images of the shards finished before the kill were downloaded once, never again
    urls = pq.read_table(inp)["url"].to_pylist()
    done_rows = [i for sh in finished for i in range(int(sh.split("-")[1]) * shard, (int(sh.split("-")[1]) + 1) * shard)]
    hits = _hits_by_path(hostile_server)
    for i in done_rows:
        path = urls[i].split("//", 1)[1].split("/", 1)[1].split("?")[0]
        assert hits["/" + path] == urls.count(urls[i]), (i, hits["/" + path])
    # (c) the dead driver's local Ray instance was cleaned up by the next start
    assert instance is None or not instance.exists()
    for r in leftover:
        try:
            assert abs(psutil.Process(r["pid"]).create_time() - r["created"]) > 1e-3, f"pid {r['pid']} survived"
        except psutil.NoSuchProcess:
            pass
    # the output equals an uninterrupted run's
    ref = tmp_path / "ref"
    curate.run(_cfg(inp, ref, "local", shard))
    for sub in ("data", "rejected"):
        assert rows_by_uid(read_dir(out / sub)) == rows_by_uid(read_dir(ref / sub)), sub
    assert stage_counts(out) == stage_counts(ref)


@pytest.mark.ray
@pytest.mark.parametrize("pools", ["always", "auto"])
def test_ray_model_actor_killed_mid_stage(hostile_server, tmp_path, ray_cluster, pools):
    """A worker process dies in clip_embed's segment: the clip_embed actor (``actor_pools: always``; Ray Data
    restarts it and retries its batches) or, by default on CPUs, a worker running the segment's shard tasks
    with the model loaded (Ray retries the task).  The output equals the local runner's."""
    inp = _photos(tmp_path / "in.parquet", hostile_server, 48, delay=0.2)
    extra = [{"stage": "clip_embed", "batch_size": 4}]
    killed: list[int] = []
    segment = tmp_path / "ray" / "_work" / "done" / "seg-1"  # download | dedup_exact, phash, clip_embed

    def victim(p: psutil.Process) -> bool:
        if pools == "always":
            return any("Stage_clip_embed" in a for a in p.cmdline())
        return any("_shard_task" in a for a in p.cmdline()) and segment.is_dir() and any(segment.iterdir())

    def killer() -> None:
        end = time.time() + 240
        while time.time() < end and not killed:
            for p in psutil.Process().children(recursive=True):
                try:
                    if victim(p):
                        time.sleep(1.0 if pools == "always" else 0.0)  # let it take batches first
                        p.kill()
                        killed.append(p.pid)
                        return
                except psutil.Error:
                    continue
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = _cfg(inp, tmp_path / "ray", "ray", 4, extra)
    cfg["runner"]["actor_pools"] = pools
    curate.run(cfg)
    t.join(timeout=5)
    assert killed, "no clip_embed actor was found to kill"
    ref = tmp_path / "local"
    curate.run(_cfg(inp, ref, "local", 4, extra))
    for sub in ("data", "rejected"):
        a, b = read_dir(tmp_path / "ray" / sub), read_dir(ref / sub)
        assert a.num_rows == b.num_rows and rows_by_uid(a) == rows_by_uid(b), sub
    assert read_dir(ref / "data").num_rows + read_dir(ref / "rejected").num_rows == 48


@pytest.mark.ray
def test_a_shard_without_live_rows_on_both_runners(hostile_server, tmp_path, ray_cluster):
    """Every row of the first shard fails to download: later segments have nothing of it to run."""
    inp = _photos(tmp_path / "in.parquet", hostile_server, 8)
    t = pq.read_table(inp)
    urls = [f"{hostile_server}/missing-{i}.jpg" for i in range(4)] + t["url"].to_pylist()[4:]
    pq.write_table(pa.table({"url": urls, "caption": t["caption"]}), inp)
    outs = {}
    for runner in ("local", "ray"):
        outs[runner] = tmp_path / runner
        curate.run(_cfg(inp, outs[runner], runner, 4, [{"stage": "dedup_phash"}]))
    for sub in ("data", "rejected"):
        assert rows_by_uid(read_dir(outs["local"] / sub)) == rows_by_uid(read_dir(outs["ray"] / sub)), sub
    assert stage_counts(outs["local"]) == stage_counts(outs["ray"])
    rej = read_dir(outs["ray"] / "rejected").to_pylist()
    assert sum(r["reject_stage"] == "download" for r in rej) == 4
    assert read_dir(outs["ray"] / "data").num_rows + len(rej) == 8


@pytest.mark.ray
def test_ray_reads_one_task_per_shard_not_fused_into_the_first_stage(tmp_path, ray_cluster, caplog):
    """Fused into the first stage, the read's one-row-per-shard input was bundled by that stage's batch
    size (in rows): a single task read -- and ran -- a whole segment while the other workers waited.
    (A segment streams through Ray Data only with an actor-pool stage: caption_perplexity's model, with
    ``runner.actor_pools: always`` on CPUs.)  Any other segment -- task stages alone, or a model stage on CPUs by
    default -- runs as one task per shard, without Ray Data, and gives the same output."""
    import logging

    n, shard = 24, 4
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": [f"a caption with enough words {i}" for i in range(n)]}), inp)
    model = [{"stage": "caption", "min_words": 3}, {"stage": "caption_perplexity"}]
    for name, stages, pools in (("pools", model, "always"), ("model", model, "auto"),
                                ("tasks", [{"stage": "caption", "min_words": 3}], "auto")):
        caplog.clear()
        cfg = {"input": {"path": str(inp), "shard_size": shard}, "output": {"path": str(tmp_path / name)},
               "runner": {"kind": "ray", "num_cpus": 2, "actor_pools": pools}, "stages": stages}
        with caplog.at_level(logging.DEBUG, logger="curate.runners.ray_runner"):
            curate.run(cfg)
        messages = [r.getMessage() for r in caplog.records]
        stats = "\n".join(m for m in messages if "Ray Data stats" in m)
        got = re.findall(r"Operator \d+ (\S+): (\d+) tasks executed", stats)
        if name == "pools":
            reads = [int(t) for op, t in got if op.startswith("MapBatches(_read_entering)")]
            assert reads == [n // shard], got  # its own operator, one task per shard
        else:
            assert not got, stats[:2000]
            assert f"segment 0: {n // shard} shards, one task each" in "\n".join(messages), messages
        assert read_dir(tmp_path / name / "data").num_rows == n
    assert rows_by_uid(read_dir(tmp_path / "pools" / "data")) == rows_by_uid(read_dir(tmp_path / "model" / "data"))


def test_a_view_reads_each_row_once_when_a_retried_batch_wrote_overlapping_parts(tmp_path):
    """Ray may retry a batch with other boundaries: two parts then hold a position; the view keeps one."""
    from curate.layout import Layout
    from curate.runners.flow import read_view, view_sources, write_group, write_view

    layout = Layout(tmp_path / "out")
    base = tmp_path / "base.parquet"
    pq.write_table(pa.table({S.UID: [f"u{i}" for i in range(6)], S.REJECT_REASON: pa.nulls(6, pa.string())}), base)

    def part(lo: int, hi: int) -> pa.Table:
        pos = list(range(lo, hi + 1))
        return pa.table({"__pos": pos, S.PHASH: pa.array([p * 10 for p in pos], pa.uint64()),
                         S.REJECT_REASON: pa.nulls(len(pos), pa.string())})

    for lo, hi in ((0, 3), (2, 5)):  # positions 2 and 3 are in both parts
        write_group(layout, 0, "s", part(lo, hi), [S.PHASH], "zstd")
    cols = [S.UID, S.PHASH]
    write_view(layout, 1, "s", pa.array(range(6)), base, cols, pa.schema([]), "zstd",
               view_sources(layout, 1, "s", base, cols))
    t = read_view(layout.work / "view-1" / "s.parquet", cols)
    assert t["__pos"].to_pylist() == list(range(6))
    assert t[S.PHASH].to_pylist() == [0, 10, 20, 30, 40, 50] and t[S.UID].to_pylist() == [f"u{i}" for i in range(6)]
