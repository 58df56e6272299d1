"""Starting or joining Ray without any traffic leaving 127.0.0.0/8.

A local Ray start launches a dashboard process that, unless it finds
``~/ray_bootstrap_config.yaml``, asks cloud metadata services
(169.254.169.254, metadata.google.internal) what cluster it runs on.  For a
*local* start curate therefore gives the Ray processes a private HOME that
holds an empty bootstrap config, turns usage stats off, and binds to
127.0.0.1.  Caches that normally live under HOME (Hugging Face, torch,
open_clip) keep pointing at the user's real directories.  Joining an existing
cluster (``runner.address``) changes nothing: that is the user's environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

SAFE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}

# A private local instance's session folder is deleted when the run ends: keep what Ray writes into
# it small.  By default Ray Data logs DEBUG lines to ray-data.log and the raylet rewrites
# debug_state.txt every 10 s: 4.3 MB and 1.1 MB of a 2,000-row demo run on 2 CPUs, a quarter of its
# final output.  Warnings and errors are still logged.  A value the user set wins.
LEAN_LOG_ENV = {
    "RAY_DATA_LOG_LEVEL": "INFO",
    "RAY_debug_dump_period_milliseconds": "0",
}
#: A local Ray start keeps an idle worker process for a minute instead of one second.  Ray kills idle
#: workers above its soft limit (one per CPU) after 1 s, and actor pools put every task worker above it:
#: each read, stage and finish task of a segment then started a fresh process (Ray, pyarrow and curate
#: imported again).  On the demo pipeline at 2,000 rows (bench/scale.py, 2 CPUs) that was 19 task-worker
#: processes and 124-152 CPU-s for the run; with this, 2-4 processes and ~105 CPU-s (local runner: 90).
WORKER_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def _cache_env(real_home: str) -> dict[str, str]:
    """Pin the cache locations to the real HOME before HOME is redirected."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(real_home, ".cache")
    return {
        "XDG_CACHE_HOME": xdg,
        "HF_HOME": os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"),
        "TORCH_HOME": os.environ.get("TORCH_HOME") or os.path.join(xdg, "torch"),
    }


def private_home(base: Path | None = None) -> Path:
    home = Path(tempfile.mkdtemp(prefix="curate-ray-home-", dir=base))
    (home / "ray_bootstrap_config.yaml").write_text("{}\n")
    return home


_PROCESS_HOME: list[Path] = []


def process_home() -> Path:
    """The private HOME of every local Ray instance this process starts, removed when the process exits.  One
    per process, not per instance: the first ``ray.init`` turns token authentication on for the process and
    keeps its token (``HOME/.ray/auth_token``); a later instance with another HOME finds no token and its GCS
    aborts (a notebook's second run)."""
    if not _PROCESS_HOME or not _PROCESS_HOME[0].exists():
        import atexit

        _PROCESS_HOME[:] = [private_home()]
        atexit.register(shutil.rmtree, _PROCESS_HOME[0], True)
    return _PROCESS_HOME[0]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                object_store_memory: int | None = None) -> Iterator[None]:
    """``ray.init`` for the duration of a run; reuse an already initialised Ray (tests, notebooks)."""
    import ray

    from curate.io import fs

    if ray.is_initialized():  # its workers may lack the run's storage settings: tasks carry them (fs.ray_env)
        yield
        return
    if address:
        storage_env = {fs.ENV: os.environ[fs.ENV]} if os.environ.get(fs.ENV) else {}
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 runtime_env={"env_vars": storage_env} if storage_env else None)
        fs.ray_env_inherited = True
        try:
            yield
        finally:
            fs.ray_env_inherited = False
            ray.shutdown()
        return
    temp_dir, home = start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus,
                                     object_store_memory=object_store_memory)
    fs.ray_env_inherited = True  # the workers inherit this process's environment
    try:
        yield
    finally:
        fs.ray_env_inherited = False
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


OWNER_FILE = "curate-owner.json"


def _record_owner(temp_dir: str, home: Path) -> None:
    """Write which processes this local Ray instance consists of, so a later start can clean up after us."""
    import json

    import psutil

    me = psutil.Process()
    procs = []
    for p in me.children(recursive=True):
        try:
            procs.append({"pid": p.pid, "created": p.create_time()})
        except psutil.Error:
            continue
    data = {"driver": {"pid": me.pid, "created": me.create_time()}, "home": str(home), "procs": procs}
    tmp = Path(temp_dir) / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(Path(temp_dir) / OWNER_FILE)


def _same_process(pid: int, created: float):
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 1e-3 else None
    except psutil.Error:
        return None


def cleanup_stale_instances(tmp_root: str | None = None) -> list[str]:
    """Remove what local Ray instances of dead curate drivers left behind; returns their temp dirs.

    Processes are found by PID (recorded with their start time, so a reused PID is never hit) and
    by their command line naming the dead instance's own temp dir -- never by process name.
    """
    import json

    import psutil

    cleaned = []
    root = Path(tmp_root or tempfile.gettempdir())
    for owner in root.glob(f"curate-ray-*/{OWNER_FILE}"):
        d = owner.parent
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        drv = info.get("driver") or {}
        if _same_process(int(drv.get("pid", -1)), float(drv.get("created", 0))) is not None:
            continue  # its driver still runs
        victims = [p for r in info.get("procs", []) if (p := _same_process(int(r["pid"]), float(r["created"])))]
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and any(str(d) in (a or "") for a in (p.info["cmdline"] or [])):
                    victims.append(p)
            except psutil.Error:
                continue
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=5)
        shutil.rmtree(info.get("home") or "/nonexistent", ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        log.warning("cleaned up a local Ray instance left by a killed curate driver (pid %s): %d processes, %s",
                    drv.get("pid"), len(victims), d)
        cleaned.append(str(d))
    return cleaned


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None,
                    object_store_memory: int | None = None) -> tuple[str, Path]:
    """Start a private single-node Ray on 127.0.0.1; returns (temp_dir, private_home)."""
    import ray

    for k, v in {**SAFE_ENV, **LEAN_LOG_ENV, **WORKER_ENV}.items():
        os.environ.setdefault(k, v)
    # ray.data configures its logger when first imported, possibly before the line above
    try:
        logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"].upper())
    except ValueError:  # not a level name: Ray Data's own parsing reports it
        pass
    real_home = os.path.expanduser("~")
    for k, v in _cache_env(real_home).items():
        os.environ.setdefault(k, v)
    try:
        cleanup_stale_instances()
    except Exception:  # noqa: BLE001 - cleaning up after others must never stop a run
        log.warning("could not clean up stale local Ray instances", exc_info=True)
    home = process_home()
    # Ray's unix sockets need a short path: keep the session dir directly under /tmp
    temp_dir = tempfile.mkdtemp(prefix="curate-ray-")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # inherited by raylet, dashboard and workers
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    finally:
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
    _record_owner(temp_dir, home)
    log.info("started a local Ray instance (%s CPUs) in %s", ray.cluster_resources().get("CPU"), temp_dir)
    return temp_dir, home
