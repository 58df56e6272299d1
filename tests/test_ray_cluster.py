"""A real multi-node Ray cluster on this machine: `ray start --head` + `ray start --address`, a `ray job submit`
of `curate run configs/demo.yaml --set runner.address=auto`, and the Python API with `runner.address`.

The cluster lives in its own process (tests/ray_multinode.py), never in this one (which may hold the session's
Ray instance).  The demo pipeline's CPU stages (download, exact dedup, the image/caption filters) run on it, so the
whole test stays under 2 minutes on 2 cores; the model stages go through the same runner code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import curate
from conftest import REPO, demo_config

BUDGET_S = 300  # the whole cluster process: start, job, Python API run, teardown (~60-110 s seen)
#: demo stages run on the cluster: an actor-pool map stage, a global stage (fit + a second segment), filters
CPU_STAGES = ("download", "dedup_exact", "caption", "image_size", "aspect_ratio")


def cluster_stages() -> list[dict]:
    """The demo pipeline's CPU-only stages, with the demo's parameters (download timeout as in conftest)."""
    stages = [s for s in yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["stages"]
              if s["stage"] in CPU_STAGES]
    for s in stages:
        if s["stage"] == "download":
            s["timeout"] = 2
    assert stages and stages[0]["stage"] == "download"
    return stages


def _table(path: Path):
    t = pq.read_table(path)
    return t.sort_by([("uid", "ascending"), ("source_row", "ascending")])


def assert_same_output(a: Path, b: Path) -> None:
    for sub in ("data", "rejected"):
        fa, fb = (sorted(p.name for p in (x / sub).glob("*.parquet")) for x in (a, b))
        assert fa == fb and fa, (sub, fa, fb)
        for name in fa:
            ta, tb = _table(a / sub / name), _table(b / sub / name)
            assert ta.schema == tb.schema, name
            for col in ta.column_names:
                assert ta[col].equals(tb[col]), f"{sub}/{name}: column {col} differs"
    sa, sb = (json.loads((x / "stats.json").read_text()) for x in (a, b))
    keys = ("id", "rows_in", "rows_out", "rejected", "errors")
    assert [{k: st[k] for k in keys} for st in sa["stages"]] == [{k: st[k] for k in keys} for st in sb["stages"]]
    assert sb["run"]["runner"] == "ray"


@pytest.mark.ray
@pytest.mark.slow
def test_multinode_cluster_job_and_python_api(demo_input, tmp_path):
    stages = cluster_stages()
    sets = ["input.shard_size=60", "stages=" + json.dumps(stages)]
    work = tmp_path / "cluster"
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests" / "netguard"), CURATE_NETGUARD_LOG=str(tmp_path / "net.log"))
    cmd = [sys.executable, str(REPO / "tests" / "ray_multinode.py"), "--input", str(demo_input), "--work", str(work),
           "--budget", str(BUDGET_S - 12), "--netguard", *[x for s in sets for x in ("--set", s)]]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        # meanwhile (the cluster takes a while to start): the same pipeline on the local runner
        local = curate.run(demo_config(demo_input, tmp_path / "local", stages=stages))
        out, err = proc.communicate(timeout=max(1.0, BUDGET_S - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script tears its cluster down on SIGTERM
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the cluster run took more than {BUDGET_S}s: {err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.strip(), f"exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    res = json.loads(out.strip().splitlines()[-1])
    print("cluster timings:", {k: res.get(k) for k in ("startup_seconds", "seconds")},
          "job", res.get("job", {}).get("seconds"), res.get("job", {}).get("nodes"),
          "api", res.get("api", {}).get("seconds"), res.get("api", {}).get("nodes"))
    log_tail = (work / "cluster.log").read_text()[-4000:] if (work / "cluster.log").exists() else ""
    assert "error" not in res, f"{res}\n{log_tail}"
    assert res["left_running"] == 0
    assert res["nodes_alive"] == ["127.0.0.2", "127.0.0.3"], res  # head + worker node
    job, api = res["job"], res["api"]
    assert job["status"] == "SUCCEEDED" and job["exit"] == 0, job["tail"]
    # the work ran on both nodes, for the job and for the Python API driver
    assert len(job["nodes"]) >= 2 and all(n > 0 for n in job["nodes"].values()), job["nodes"]
    assert len(api["nodes"]) >= 2 and all(n > 0 for n in api["nodes"].values()), api["nodes"]
    # ... and both produced exactly what the local runner produced
    assert_same_output(local.output, work / "job-out")
    assert_same_output(local.output, work / "api-out")
    # no Ray process (CLI, GCS-side Python, dashboard, workers, job driver) tried to leave 127.0.0.0/8
    net = [(work / "netguard.log"), (tmp_path / "net.log")]
    lines = [ln for p in net if p.exists() for ln in p.read_text().splitlines()]
    assert any("dashboard.py" in ln for ln in lines), "the netguard did not see the Ray processes"
    blocked = [ln for ln in lines if ln.startswith("BLOCKED")]
    assert not blocked, blocked[:10]
