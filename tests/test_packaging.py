"""The wheel: filters/, pipelines/ and configs/ install inside the curate package, nothing else at the top.

The full check (a fresh virtualenv, ``pip install dist/curate-*.whl[cpu]``, ``curate demo``) is
``make wheel-check``, run by CI after the suite; this test builds the wheel and imports from it.
The import contracts (pyproject.toml's ``[tool.importlinter]``: layers import downward only, no cycles)
are checked here too, as by ``make lint-imports``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # setuptools' build/ goes here, not into the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, cwd=build, capture_output=True)
    (whl,) = out.glob("curate-*.whl")
    return whl


def _tracked(folder: str, suffix: str) -> set[str]:
    files = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True)
    return {f for f in files.stdout.split() if f.endswith(suffix)}


def test_the_wheel_holds_every_module_under_the_curate_namespace(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.startswith("curate-")}
    assert tops == {"curate"}, f"top-level entries besides curate: {tops - {'curate'}}"
    want = _tracked("curate", ".py") | {f"curate/{f}" for f in _tracked("filters", ".py") | _tracked("pipelines", ".py")}
    assert want - names == set(), "modules of the checkout missing from the wheel (a folder without __init__.py?)"
    assert {f"curate/{f}" for f in _tracked("configs", ".yaml")} <= names
    assert "curate/clip_configs/curate-ViT-T-32.json" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: cpu" in meta and "Provides-Extra: gpu" in meta
    faiss_reqs = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: faiss")]
    assert faiss_reqs and all("extra ==" in ln for ln in faiss_reqs), f"faiss outside the extras: {faiss_reqs}"


def test_the_installed_layout_runs_without_the_checkout(wheel, tmp_path):
    """Unpacked (as pip would) and imported from elsewhere: pipelines find the packaged configs,
    the registry finds the filter stages, the demo finds its config."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import curate, curate.registry as r\n"
        "from curate import pipelines\n"
        "from curate.demo.run import demo_config_path\n"
        f"assert curate.__file__.startswith({str(site)!r}), curate.__file__\n"
        f"assert str(pipelines.CONFIG_DIR).startswith({str(site)!r}), pipelines.CONFIG_DIR\n"
        "cfg = pipelines.load('demo', input='x.parquet', output='out')\n"
        "assert cfg.stages[-1].stage == 'recaption', cfg.stages[-1]\n"
        "assert {'clip_score', 'perplexity', 'aspect_ratio', 'download'} <= set(r.names())\n"
        "assert demo_config_path().is_file()\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('filters') is None and importlib.util.find_spec('pipelines') is None\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_without_faiss_the_kmeans_path_names_the_install_line(monkeypatch):
    """A bare `pip install .` has no FAISS: a config that asks for k-means stops before any work, and
    the exact path (small corpora, the demo) does not need it."""
    import curate
    from curate.config import ConfigError
    from curate.dedup import vectors

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'curate\[cpu\]'"):
        curate.create_stage("dedup_semantic", method="kmeans")
    with pytest.raises(ConfigError, match="FAISS is not installed"):
        vectors.import_faiss()
    assert curate.create_stage("dedup_semantic").params.method == "auto"


def test_imports_follow_the_layer_contracts():
    """``lint-imports`` keeps every contract: an import that climbs a layer (a function-level one too) or
    closes a cycle fails here, naming the import chain."""
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports not found: pip install -e '.[dev]' (import-linter)"
    r = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "0 broken" in r.stdout, r.stdout[-6000:]
