"""A local Ray start must not open any connection outside 127.0.0.0/8.

Every Python process of the Ray instance (driver, dashboard, workers) loads
tests/netguard/sitecustomize.py, an audit hook that logs every connect/lookup
and raises before any non-loopback one is made (so nothing leaves even if the
protection regressed).  The test fails on any blocked attempt, and checks the
hook really ran inside Ray's own processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

SCRIPT = r"""
import time, ray
from curate.raycluster import ray_session

with ray_session(num_cpus=1, object_store_memory=100 * 1024**2):
    @ray.remote(num_cpus=0.5)
    def f(x):
        return x + 1
    assert ray.get(f.remote(1)) == 2
    time.sleep(6)  # the dashboard reports the cluster config a few seconds after start
"""


@pytest.mark.ray
def test_local_ray_start_stays_on_loopback(tmp_path):
    log = tmp_path / "net.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), env.get("PYTHONPATH", "")])
    env["CURATE_NETGUARD_LOG"] = str(log)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log.read_text().splitlines() if log.exists() else []
    blocked = [line for line in lines if line.startswith("BLOCKED")]
    assert not blocked, "non-loopback network attempts:\n" + "\n".join(blocked)
    # the hook was active inside Ray's dashboard (the process that would probe metadata services)
    procs = {line.rsplit(" ", 1)[-1] for line in lines}
    assert "dashboard.py" in procs, f"netguard did not run in Ray's dashboard: {lines[:5]}"
