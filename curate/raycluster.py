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


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                object_store_memory: int | None = None) -> Iterator[None]:
    """``ray.init`` for the duration of a run; reuse an already initialised Ray (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    temp_dir, home = start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus,
                                     object_store_memory=object_store_memory)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None,
                    object_store_memory: int | None = None) -> tuple[str, Path]:
    """Start a private single-node Ray on 127.0.0.1; returns (temp_dir, private_home)."""
    import ray

    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    real_home = os.path.expanduser("~")
    for k, v in _cache_env(real_home).items():
        os.environ.setdefault(k, v)
    home = private_home()
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
    log.info("started a local Ray instance (%s CPUs) in %s", ray.cluster_resources().get("CPU"), temp_dir)
    return temp_dir, home
