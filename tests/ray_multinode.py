"""A real multi-node Ray cluster on this machine, driven like a user would (tests/test_ray_cluster.py).

Run as a script in its own process (never inside the pytest process, which may hold the
session's Ray instance)::

    python tests/ray_multinode.py --input IN.parquet --work DIR [--budget 110] [--set KEY=VALUE ...]

It starts a head node with ``ray start --head`` and a worker node with ``ray start
--address``, then runs ``configs/demo.yaml`` twice on that cluster:

1. ``ray job submit --working-dir REPO -- curate run configs/demo.yaml --set runner.address=auto``
2. the Python API from this process: ``curate.run(config, runner={"kind": "ray", "address": ...})``

(``--set`` overrides are passed to both) and prints one JSON object: the outputs, the job status,
and the nodes the work ran on (from Ray's state API).  Every Ray process gets a private HOME holding an empty
``ray_bootstrap_config.yaml`` (no cloud-metadata probes), usage stats off and the usage
report URL pointed at a closed loopback port; the nodes use the loopback addresses
127.0.0.2 / 127.0.0.3 (``ray start`` rewrites 127.0.0.1 into the host's interface
address).  The cluster is torn down by killing exactly the processes that carry this
run's private HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from curate.demo.nginx import free_port  # distinct ports for every call in one process

REPO = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
WORK_TASKS = ("MapBatches", "_finish", "_StageActor", "_stage_task", "_shard_task", "_read_shards", "_write_parts")


_LEAKED = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_CLIENT_MODE", "RAY_ADDRESS",
           "PYTHONBREAKPOINT")


def cluster_env(home: Path, netguard_log: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # a Ray instance started earlier in this process (the test session's) leaves its own settings in
    # os.environ (RAY_AUTH_MODE=token, client mode...): they must not leak into this separate cluster
    for key in _LEAKED:
        env.pop(key, None)
    env.update({
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
        # `ray start` clusters send a "usage disabled" ping unless the URL goes nowhere
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "CURATE_RAY_PROGRESS": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    if netguard_log is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "netguard"), env.get("PYTHONPATH")]))
        env["CURATE_NETGUARD_LOG"] = str(netguard_log)
    return env


def ray_cli(args: list[str], env: dict[str, str], timeout: float, log) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    log.write(p.stdout + f"[exit {p.returncode}]\n")
    log.flush()
    return p


def start_cluster(tmp: Path, env: dict[str, str], log, cpus: tuple[int, int] = (1, 1)) -> dict:
    gcs, dash = free_port(), free_port()
    common = ["--temp-dir", str(tmp / "ray"), "--disable-usage-stats", "--object-store-memory", str(200 * 1024**2)]

    def node_ports() -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    head = ["start", "--head", "--node-ip-address", HEAD_IP, "--port", str(gcs), "--num-cpus", str(cpus[0]),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(free_port()), *node_ports(), *common]
    if ray_cli(head, env, 90, log).returncode != 0:
        raise RuntimeError("ray start --head failed")
    worker = ["start", "--address", f"{HEAD_IP}:{gcs}", "--node-ip-address", WORKER_IP,
              "--num-cpus", str(cpus[1]), *node_ports(), *common]
    if ray_cli(worker, env, 90, log).returncode != 0:
        raise RuntimeError("ray start --address failed")
    return {"gcs": f"{HEAD_IP}:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}


def wait_for_nodes(dashboard: str, n: int, timeout: float = 30.0) -> list[str]:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    while True:
        alive = [x.node_ip for x in list_nodes(address=dashboard) if x.state == "ALIVE"]
        if len(alive) >= n or time.monotonic() > deadline:
            return sorted(alive)
        time.sleep(0.5)


def own_processes(home: Path) -> list[int]:
    """PIDs of the processes carrying this run's private HOME (every process of the cluster)."""
    marker = f"HOME={home}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def stop_cluster(home: Path, grace: float = 2.0) -> int:
    pids = own_processes(home)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not pids:
            break
    return len(pids)


def work_nodes(dashboard: str, job_id: str) -> dict[str, int]:
    """node ip -> number of curate work tasks (Ray Data operators, shard finishing) of one job."""
    from ray.util.state import list_nodes, list_tasks

    ips = {n.node_id: n.node_ip for n in list_nodes(address=dashboard)}
    tasks = list_tasks(address=dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
                       raise_on_missing_output=False)
    out: dict[str, int] = {}
    for t in tasks:
        if t.node_id and any(k in (t.name or "") for k in WORK_TASKS):
            ip = ips.get(t.node_id, t.node_id)
            out[ip] = out.get(ip, 0) + 1
    return out


def submit_job(cluster: dict, env: dict[str, str], input_path: Path, out: Path, extra: list[str], timeout: float,
               log) -> dict:
    from ray.job_submission import JobSubmissionClient

    sets = [f"input.path={input_path}", f"output.path={out}", "runner.kind=ray", "runner.address=auto", *extra]
    args = ["job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
            "curate", "run", "configs/demo.yaml", *[x for s in sets for x in ("--set", s)]]
    t0 = time.monotonic()
    p = ray_cli(args, env, timeout, log)
    client = JobSubmissionClient(cluster["dashboard"])
    job = next(j for j in client.list_jobs() if j.entrypoint.startswith("curate run"))
    return {"exit": p.returncode, "status": str(job.status.value), "job_id": job.job_id,
            "submission_id": job.submission_id, "seconds": round(time.monotonic() - t0, 1),
            "nodes": work_nodes(cluster["dashboard"], job.job_id), "tail": p.stdout[-3000:]}


def python_api(cluster: dict, input_path: Path, out: Path, extra: list[str]) -> dict:
    import curate
    from curate.config import parse_overrides
    from ray.util.state import list_jobs

    t0 = time.monotonic()
    curate.run(REPO / "configs" / "demo.yaml", **parse_overrides(extra),
               **{"input.path": str(input_path), "output.path": str(out), "runner.kind": "ray",
                  "runner.address": cluster["gcs"]})
    seconds = round(time.monotonic() - t0, 1)
    drivers = [j for j in list_jobs(address=cluster["dashboard"])
               if j.type == "DRIVER" and j.driver_info and int(j.driver_info.pid) == os.getpid()]
    job_id = drivers[-1].job_id if drivers else ""
    return {"seconds": seconds, "job_id": job_id, "nodes": work_nodes(cluster["dashboard"], job_id) if job_id else {}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=110.0, help="seconds for the whole run")
    ap.add_argument("--netguard", action="store_true", help="record/block non-loopback traffic of every Ray process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both runs")
    a = ap.parse_args()
    for key in _LEAKED:  # this script's own Python API run must not inherit them either (not done at import:
        os.environ.pop(key, None)  # tests/ray_sharenothing.py imports this module into the pytest process)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a test timing out: still tear the cluster down
    t_start = time.monotonic()
    a.work.mkdir(parents=True, exist_ok=True)
    # Ray's unix socket paths must stay short: keep the session tree directly under /tmp
    tmp = Path(tempfile.mkdtemp(prefix="curate-rc-"))
    home = tmp / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    netguard_log = a.work / "netguard.log" if a.netguard else None
    env = cluster_env(home, netguard_log)
    result: dict = {"work": str(a.work)}
    with open(a.work / "cluster.log", "w") as log:
        try:
            cluster = start_cluster(tmp, env, log)
            result["cluster"] = cluster
            result["nodes_alive"] = wait_for_nodes(cluster["dashboard"], 2)
            result["startup_seconds"] = round(time.monotonic() - t_start, 1)
            left = a.budget - (time.monotonic() - t_start)
            result["job"] = submit_job(cluster, env, a.input.resolve(), a.work / "job-out", a.set, left, log)
            os.environ.update({k: env[k] for k in ("HOME", "RAY_USAGE_STATS_ENABLED", "RAY_USAGE_STATS_REPORT_URL")})
            result["api"] = python_api(cluster, a.input.resolve(), a.work / "api-out", a.set)
        except Exception as e:  # noqa: BLE001 - reported to the test as data
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            result["left_running"] = stop_cluster(home)
            shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
