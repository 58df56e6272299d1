"""A Ray cluster whose nodes share nothing but object storage, on one machine (tests/test_ray_sharenothing.py).

Each node -- the head and the worker -- is started by ``ray start`` inside its own mount namespace
(``unshare -m --propagation private``) with a private tmpfs over ``/tmp``: the node's HOME, Ray's temp and
session folder, its working directory and anything a process of that node writes under ``/tmp`` live there,
invisible to the other node and to the test (which still reads them through ``/proc/PID/root``).  Every
local folder of the test (the pytest tmp_path, the input fixture, a reference output) is under the host's
``/tmp`` and so hidden from both nodes: input, output and work folder must be on the S3 server (moto, on
127.0.0.1 -- the network is shared, only the mounts are private).  The nodes use the loopback addresses
127.0.0.2 / 127.0.0.3 and distinct ports (see tests/ray_multinode.py for why).

A node's mount namespace is held by a *keeper* process (``sleep``) that outlives its Ray processes, so that
after a node was killed its disk can still be listed; the node's processes are exactly those in that mount
namespace.  A driver runs on the head node: ``nsenter -t KEEPER -m`` puts it in the head's namespace (a
driver needs its node's raylet sockets).

Layout inside each namespace::

    /tmp/ray      Ray's --temp-dir (its session folders: logs, sockets, spilled objects)
    /tmp/home     HOME: an empty ray_bootstrap_config.yaml (no cloud-metadata probe)
    /tmp/cwd      the working directory of the node's processes and of drivers
    /tmp/harness  this harness's own files: started, ray-start.log, net.log (netguard), driver configs
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ray_multinode import HEAD_IP, WORKER_IP, cluster_env, free_port, wait_for_nodes, work_nodes

RAY_DIR, HOME, CWD, HARNESS = "/tmp/ray", "/tmp/home", "/tmp/cwd", "/tmp/harness"
VENV_BIN = Path(sys.executable).parent
#: environment variables that would point a node's caches or work at a folder outside its private /tmp
HOST_PATHS = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HOME", "TORCH_HOME", "TMPDIR",
              "CURATE_WORK_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "CURATE_NETGUARD_LOG")

def _kept() -> list[str]:
    """Folders under the host's /tmp that a node must still see, read-only: the checkout and the interpreter
    (a CI job may clone and build its virtualenv under /tmp); nested ones are covered by their parent."""
    from ray_multinode import REPO

    paths = {os.path.realpath(p) for p in (REPO, sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parents[1])}
    under = sorted(p for p in paths if p == "/tmp" or p.startswith("/tmp/"))
    return [p for p in under if not any(p != q and p.startswith(q + "/") for q in under)]


KEPT = _kept()

_NODE_SH = r"""
set -e
i=0
for p in {kept}; do  # bind them aside, cover /tmp, then put them back read-only
  i=$((i+1)); mkdir -p /dev/shm/curate-keep-$$-$i; mount --bind "$p" /dev/shm/curate-keep-$$-$i
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
i=0
for p in {kept}; do
  i=$((i+1)); mkdir -p "$p"; mount --move /dev/shm/curate-keep-$$-$i "$p"; rmdir /dev/shm/curate-keep-$$-$i
  mount -o remount,bind,ro "$p"
done
mkdir -p {ray} {home} {cwd} {harness}
printf '{{}}\n' > {home}/ray_bootstrap_config.yaml
cd {cwd}
if "$@" > {harness}/ray-start.log 2>&1; then echo ok > {harness}/started; else echo failed > {harness}/started; fi
exec sleep 100000
"""


def unshare_problem() -> str | None:
    """Why a private mount namespace cannot be made here (None: it can)."""
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return "util-linux's unshare/nsenter are not installed"
    try:
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp && touch /tmp/probe && test -f /tmp/probe"],
                           capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare -m failed: {e}"
    if p.returncode != 0:
        return (f"a private mount namespace with its own /tmp is not permitted here (needs root / CAP_SYS_ADMIN; "
                f"uid {os.getuid()}): {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return None


def mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class Node:
    """One Ray node in a private mount namespace (see the module docstring)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.log_dir = name, env, log_dir
        self.keeper: subprocess.Popen | None = None
        self.ns: str | None = None

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, ray_args: list[str]) -> None:
        script = _NODE_SH.format(ray=RAY_DIR, home=HOME, cwd=CWD, harness=HARNESS,
                                 kept=" ".join(shlex.quote(p) for p in KEPT))
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
               str(VENV_BIN / "ray"), "start", *ray_args, "--temp-dir", RAY_DIR]
        with open(self.log_dir / f"{self.name}.keeper.log", "w") as out:
            self.keeper = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        flag = self.path(f"{HARNESS}/started")
        while time.monotonic() < deadline:
            if self.keeper.poll() is not None:
                raise RuntimeError(f"{self.name}: the namespace shell exited ({self.keeper.returncode}): "
                                   f"{(self.log_dir / f'{self.name}.keeper.log').read_text()[-2000:]}")
            try:
                state = flag.read_text().strip()
            except OSError:
                state = ""
            if state:
                self.ns = mnt_ns(self.keeper.pid)
                if state != "ok":
                    raise RuntimeError(f"{self.name}: ray start failed:\n{self.read(f'{HARNESS}/ray-start.log')[-3000:]}"
                                       f"\n{self.ray_logs()}")
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: ray start did not finish in {timeout:.0f}s")

    def ray_logs(self, tail: int = 1500) -> str:
        """The ends of the node's raylet and GCS logs (what a failed start says)."""
        logs = self.path(f"{RAY_DIR}/session_latest/logs")
        out = []
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
            text = self.read(f"{RAY_DIR}/session_latest/logs/{name}") if logs.exists() else ""
            if text.strip():
                out.append(f"--- {self.name} {name} ---\n{text[-tail:]}")
        return "\n".join(out) or f"({self.name}: no Ray logs)"

    def path(self, inside: str) -> Path:
        """A path of this node's private file system, seen from outside."""
        return Path(f"/proc/{self.keeper.pid}/root") / inside.lstrip("/")

    def read(self, inside: str) -> str:
        try:
            return self.path(inside).read_text(errors="replace")
        except OSError:
            return ""

    def write(self, inside: str, text: str) -> None:
        self.path(inside).write_text(text)

    def processes(self, keeper: bool = True) -> list[int]:
        """PIDs of every process in this node's mount namespace (its whole process tree: raylet, GCS,
        agents, workers, drivers started by :meth:`popen`)."""
        if self.ns is None and self.keeper is not None:
            self.ns = mnt_ns(self.keeper.pid)
        if self.ns is None:
            return []
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid() and mnt_ns(int(d.name)) == self.ns \
                    and (keeper or int(d.name) != self.keeper.pid):
                pids.append(int(d.name))
        return pids

    def kill(self) -> list[dict]:
        """SIGKILL every process of the node but the keeper (the node is lost; its disk stays listable).
        Returns what was killed (pid, command)."""
        killed = []
        for pid in self.processes(keeper=False):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
                os.kill(pid, signal.SIGKILL)
                killed.append({"pid": pid, "cmd": cmd})
            except (ProcessLookupError, OSError):
                continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{k['pid']}").exists() for k in killed):
            time.sleep(0.1)
        return killed

    def stop(self, grace: float = 3.0) -> int:
        """Stop every process of the namespace (keeper last); returns how many were left running."""
        pids = self.processes()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in pids:
                if self.keeper is not None and pid == self.keeper.pid and sig == signal.SIGTERM:
                    continue  # the keeper holds the namespace until the rest is gone
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and p != self.keeper.pid
                                                      for p in pids):
                time.sleep(0.2)
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            if not pids or pids == [self.keeper.pid]:
                break
        if self.keeper is not None:
            self.keeper.kill()
            self.keeper.wait(timeout=10)
        return len([p for p in pids if p != (self.keeper.pid if self.keeper else None) and Path(f"/proc/{p}").exists()])

    # -- what is on the node ---------------------------------------------------------------------------
    def files(self) -> list[str]:
        """Every file (and symlink) on the node's private /tmp, as paths inside the node."""
        root = self.path("/tmp")
        out = []
        for dirpath, dirs, names in os.walk(root):
            rel = "/tmp/" + os.path.relpath(dirpath, root) if dirpath != str(root) else "/tmp"
            dirs[:] = [d for d in dirs if os.path.normpath(f"{rel}/{d}") not in KEPT]  # read-only: not the run's
            for n in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                out.append(os.path.normpath(f"{rel}/{n}"))
        return sorted(out)

    def foreign_files(self) -> list[str]:
        """Files on the node outside Ray's own folder and this harness's files: what a run left there."""
        own = {f"{HOME}/ray_bootstrap_config.yaml"}
        kept = tuple(p + "/" for p in KEPT)  # mounted read-only: nothing of the run can be there
        return [f for f in self.files() if not f.startswith((RAY_DIR + "/", HARNESS + "/") + kept) and f not in own]

    def netguard_lines(self) -> list[str]:
        return self.read(f"{HARNESS}/net.log").splitlines()

    # -- a process on this node ------------------------------------------------------------------------
    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """``argv`` run inside the node's namespace, in its working directory (nsenter execs: same PID)."""
        inner = f"cd {CWD} && exec " + " ".join(shlex.quote(a) for a in argv)
        return subprocess.Popen(["nsenter", "-t", str(self.keeper.pid), "-m", "--", "sh", "-c", inner],
                                env=env or self.env, **kw)


#: a driver whose tasks, one pinned to each node, write where curate's default caches would go (the control of
#: the "no file of the run" check: such a file must show up on exactly the node that wrote it)
PROBE = r"""
import os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
def write(tag):
    path = os.path.expanduser(f"~/.cache/curate/probe-{tag}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(tag)
    return path

nodes = [n for n in ray.nodes() if n["Alive"]]
print(ray.get([write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(n["NodeManagerAddress"]) for n in nodes]))
"""


class ShareNothingCluster:
    """A head node and a worker node, each in its own mount namespace; S3 (``endpoint``) shared by both."""

    def __init__(self, log_dir: Path, endpoint: str, cpus: tuple[int, int] = (1, 1),
                 extra_env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.endpoint = endpoint
        self.cpus = cpus
        env = cluster_env(Path(HOME), None)
        for k in HOST_PATHS:
            env.pop(k, None)
        env.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "netguard"),
                                                        env.get("PYTHONPATH")])),
            "CURATE_NETGUARD_LOG": f"{HARNESS}/net.log",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "curate-test"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "curate-test"),
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            # a lost node is declared dead within a few seconds (default: ~30 s of missed health checks)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000",
            **(extra_env or {}),
        })
        self.env = env
        self.head = Node("head", env, log_dir)
        self.worker = Node("worker", env, log_dir)
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.gcs = f"{HEAD_IP}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    @staticmethod
    def _node_ports() -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

    def start(self) -> None:
        """Start the head (returns at once); :meth:`wait` waits for both nodes."""
        common = ["--disable-usage-stats", "--object-store-memory", str(200 * 1024**2)]
        self.head.start(["--head", "--node-ip-address", HEAD_IP, "--port", str(self.gcs_port),
                         "--num-cpus", str(self.cpus[0]), "--include-dashboard", "true",
                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port),
                         "--ray-client-server-port", str(free_port()), *self._node_ports(), *common])
        self._common = common

    def wait(self, timeout: float = 150.0) -> list[str]:
        t0 = time.monotonic()
        self.head.wait_started(timeout)
        try:
            self._start_worker(max(10.0, timeout - (time.monotonic() - t0)))
        except RuntimeError as first:  # once more on a fresh namespace and fresh ports, then give up loudly
            self.worker.stop()
            self.worker = Node("worker", self.env, self.log_dir)
            try:
                self._start_worker(90.0)
            except RuntimeError as second:
                raise RuntimeError(f"{second}\n--- head ---\n{self.head.ray_logs()}\n--- first try ---\n{first}") \
                    from None
        return wait_for_nodes(self.dashboard, 2)

    def _start_worker(self, timeout: float) -> None:
        self.worker.start(["--address", self.gcs, "--node-ip-address", WORKER_IP, "--num-cpus", str(self.cpus[1]),
                           *self._node_ports(), *self._common])
        self.worker.wait_started(timeout)

    def ensure_worker(self, timeout: float = 90.0) -> list[str]:
        """A fresh worker node (new namespace, empty /tmp) if the worker node was lost; the alive nodes."""
        if WORKER_IP not in self.alive_nodes():
            self.worker.stop()
            self.worker = Node("worker", self.env, self.log_dir)
            self._start_worker(timeout)
            deadline = time.monotonic() + 30
            while WORKER_IP not in self.alive_nodes() and time.monotonic() < deadline:
                time.sleep(0.5)
        return self.alive_nodes()

    def stop(self) -> int:
        left = 0
        for node in (self.worker, self.head):
            if node.keeper is not None:
                left += node.stop()
        return left

    def alive_nodes(self) -> list[str]:
        from ray.util.state import list_nodes

        return sorted(n.node_ip for n in list_nodes(address=self.dashboard) if n.state == "ALIVE")

    # -- drivers -----------------------------------------------------------------------------------------
    def driver(self, name: str, config: dict, verbose: bool = False, **popen) -> subprocess.Popen:
        """``curate run`` of ``config`` on the head node, connected to this cluster (``popen``: stdout, stderr
        -- files opened outside the node, never pipes left undrained: Ray's log lines would fill them)."""
        import yaml

        cfg = json.loads(json.dumps(config))
        cfg.setdefault("runner", {}).update({"kind": "ray", "address": self.gcs})
        cfg.setdefault("storage", {})["endpoint_url"] = self.endpoint
        path = f"{HARNESS}/{name}.yaml"
        self.head.write(path, yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "curate.cli", *(["-v"] if verbose else []), "run", path]
        return self.head.popen(argv, stdin=subprocess.DEVNULL, **popen)

    def probe(self, timeout: float = 120.0) -> str:
        """Run :data:`PROBE` on the head node; its output."""
        p = self.head.popen([sys.executable, "-c", PROBE, self.gcs], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
        try:
            out = p.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[0] + f"\n[no answer in {timeout:.0f} s]"
        if p.returncode != 0:
            raise RuntimeError(f"the probe driver failed ({p.returncode}):\n{out[-3000:]}")
        return out

    def diagnose(self, job_id: str = "") -> str:
        """What a stuck run waits for: ``ray status`` (resources, pending demands) and the job's unfinished
        tasks and actors, by node."""
        from ray.util.state import list_actors, list_nodes, list_tasks

        lines = []
        p = self.head.popen([str(VENV_BIN / "ray"), "status", "--address", self.gcs], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
        try:
            lines.append(p.communicate(timeout=60)[0].strip())
        except subprocess.TimeoutExpired:
            p.kill()
            lines.append("ray status: no answer in 60 s")
        try:
            ips = {n.node_id: n.node_ip for n in list_nodes(address=self.dashboard)}
            filters = [("job_id", "=", job_id)] if job_id else []
            tasks = list_tasks(address=self.dashboard, filters=filters, limit=10_000, raise_on_missing_output=False)
            open_tasks: dict[tuple, int] = {}
            for t in tasks:
                if t.state not in ("FINISHED", "FAILED"):
                    key = (t.name, t.state, ips.get(t.node_id, t.node_id))
                    open_tasks[key] = open_tasks.get(key, 0) + 1
            lines.append("unfinished tasks (name, state, node): " + json.dumps(sorted(
                [[*k, n] for k, n in open_tasks.items()], key=str)))
            actors = list_actors(address=self.dashboard, limit=1000)
            lines.append("actors (class, state, node): " + json.dumps(sorted(
                [[a.class_name, a.state, ips.get(a.node_id, a.node_id)] for a in actors], key=str)))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            lines.append(f"state API: {exc}")
        return "\n".join(lines)

    def job_of(self, pid: int) -> str:
        """The Ray job id of the driver process ``pid``."""
        from ray.util.state import list_jobs

        jobs = [j for j in list_jobs(address=self.dashboard)
                if j.type == "DRIVER" and j.driver_info and int(j.driver_info.pid) == pid]
        return jobs[-1].job_id if jobs else ""

    def work_nodes(self, job_id: str) -> dict[str, int]:
        return work_nodes(self.dashboard, job_id)
