"""Shared fixtures: one demo corpus served on 127.0.0.1 and one Ray cluster per test session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("CURATE_RAY_PROGRESS", "0")
# object storage in tests is a moto S3 server on 127.0.0.1 (tests/test_s3.py): explicit dummy credentials, and
# no SDK may probe a cloud metadata address for others (set before any Ray worker inherits the environment)
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "curate-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "curate-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

REPO = Path(__file__).resolve().parents[1]

# The loopback-only network audit hook (tests/netguard/sitecustomize.py) is on for the whole suite: in
# this process and, through PYTHONPATH, in every Python process it starts (CLI runs, Ray workers).  Any
# connect or lookup outside 127.0.0.0/8 raises before it happens and is logged; the autouse fixture
# `_loopback_only` fails the test during which one was attempted.
NETGUARD_DIR = REPO / "tests" / "netguard"
_OWN_NETGUARD_LOG = not os.environ.get("CURATE_NETGUARD_LOG")
if _OWN_NETGUARD_LOG:
    os.environ["CURATE_NETGUARD_LOG"] = str(Path(tempfile.mkdtemp(prefix="curate-netguard-")) / "net.log")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(NETGUARD_DIR), os.environ.get("PYTHONPATH")) if p)
    _spec = importlib.util.spec_from_file_location("curate_netguard_hook", NETGUARD_DIR / "sitecustomize.py")
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
NETGUARD_LOG = Path(os.environ["CURATE_NETGUARD_LOG"])


def pytest_sessionfinish(session, exitstatus):
    """The audit log's temporary folder goes with the session that made it (kept when a test failed)."""
    if _OWN_NETGUARD_LOG and exitstatus == 0:
        shutil.rmtree(NETGUARD_LOG.parent, ignore_errors=True)


class NetLog:
    """The audit log's lines written since this object was made (or since ``mark()``)."""

    def __init__(self) -> None:
        self.mark()

    def mark(self) -> None:
        self.offset = NETGUARD_LOG.stat().st_size if NETGUARD_LOG.exists() else 0

    def lines(self) -> list[str]:
        if not NETGUARD_LOG.exists():
            return []
        with open(NETGUARD_LOG, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace").splitlines()

    def blocked(self) -> list[str]:
        return [x for x in self.lines() if x.startswith("BLOCKED")]


@pytest.fixture(autouse=True)
def _loopback_only():
    log = NetLog()
    yield log
    blocked = log.blocked()
    assert not blocked, "non-loopback network attempts during this test:\n" + "\n".join(blocked[:20])


@pytest.fixture
def netlog(_loopback_only) -> NetLog:
    """The audit log of this test (its lines so far: ``netlog.lines()``)."""
    return _loopback_only


@pytest.fixture(scope="session")
def hostile_server():
    """tests/hostile_server.py in its own process on 127.0.0.1: yields its base URL."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "hostile_server.py")], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


DEMO_ROWS = 240  # the session corpus; every kind of row appears at this size


@pytest.fixture(scope="session")
def demo_site(tmp_path_factory) -> Path:
    """The demo corpus (images, manifest.jsonl with the truth, routes.json), built once."""
    from curate.demo.corpus import build_site

    site = tmp_path_factory.mktemp("demo") / "site"
    build_site(site, n_rows=DEMO_ROWS, seed=0)
    return site


@pytest.fixture(scope="session")
def demo_server(demo_site):
    """The corpus served on 127.0.0.1 for the whole session (slow rows sleep 4 s)."""
    from curate.demo.server import DemoServer

    with DemoServer(demo_site, slow_seconds=4.0) as server:
        yield server


@pytest.fixture(scope="session")
def demo_input(demo_site, demo_server, tmp_path_factory) -> Path:
    """The pipeline input (parquet: uid, url, caption, source) pointing at the session server."""
    from curate.demo.corpus import write_input

    return write_input(demo_site, demo_server.base_url, tmp_path_factory.mktemp("input") / "demo.parquet")


def demo_config(input_path: Path, output: Path, **over) -> dict:
    """configs/demo.yaml with the input/output of a test (and a short download timeout)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["input"]["path"] = str(input_path)
    cfg["output"]["path"] = str(output)
    cfg["input"]["shard_size"] = 60
    for st in cfg["stages"]:
        if st["stage"] == "download":
            st["timeout"] = 2
    for k, v in over.items():
        from curate.config import apply_override

        apply_override(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the whole session (2 CPUs, small object store)."""
    import ray

    from curate.raycluster import start_local_ray

    temp_dir, home = start_local_ray(num_cpus=2, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_run_local(demo_input, tmp_path_factory):
    """configs/demo.yaml run once on the local runner over the session corpus."""
    import curate

    out = tmp_path_factory.mktemp("run-local") / "out"
    return curate.run(demo_config(demo_input, out))


@pytest.fixture(scope="session")
def indexed_demo(demo_run_local, tmp_path_factory) -> Path:
    """A copy of the session demo output with `curate index --text --rejected` built (the original stays as run)."""
    from curate.index import build_index

    out = tmp_path_factory.mktemp("indexed") / "out"
    shutil.copytree(demo_run_local.output, out, ignore=shutil.ignore_patterns("_work"))
    build_index(out, text=True, rejected=True)
    return out


@pytest.fixture(scope="session")
def real_web(tmp_path_factory):
    """Real server software for the whole session: nginx (http + https) and an HTTP/1.0 origin it proxies."""
    from curate.demo.nginx import nginx_binary
    from realweb import Http10Origin, NginxSite

    if nginx_binary() is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light; `apt-get install nginx-light`)")
    folder = tmp_path_factory.mktemp("realweb")
    origin = Http10Origin(folder / "origin")
    try:
        site = NginxSite(folder / "nginx", origin)
    except BaseException:
        origin.stop()
        raise
    yield site
    site.stop()
    origin.stop()
