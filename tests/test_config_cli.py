"""Config validation and overrides, the Python API and the CLI commands of the foundation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

import curate
from curate.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_validates_with_overrides():
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      {"output.path": "/tmp/x", "stages.download.image_size": 128, "runner.kind": "ray"})
    dl = next(p for p in cfg.stages if p.stage == "download")
    assert dl.image_size == 128 and cfg.runner.kind == "ray" and cfg.output.path == "/tmp/x"
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again.work_hash() == cfg.work_hash()


def test_every_config_in_configs_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path, {"output.path": "/tmp/x"})


@pytest.mark.parametrize("data, where", [
    ({"input": {"path": "x"}, "output": {"path": "y"}, "stages": [{"stage": "download", "timeout": -1}]}, "timeout"),
    ({"input": {"path": "x"}, "output": {"path": "y"}, "stages": [{"stage": "download", "bogus": 1}]}, "bogus"),
    ({"input": {"path": "x"}, "output": {"path": "y"}, "stages": [{"nope": 1}]}, "'stage:' key"),
    ({"input": {"path": "x"}, "output": {"path": "y"}, "extra": 1}, "extra"),
    ({"input": {"path": "x"}}, "output"),
    ({"input": {"path": "x"}, "output": {"path": "y"},
      "stages": [{"stage": "download"}, {"stage": "download"}]}, "unique"),
])
def test_bad_configs_name_the_key(data, where):
    with pytest.raises(ConfigError, match=where):
        load_config(data)


def test_import_curate_is_light():
    code = "import sys, curate, curate.cli, curate.pipeline, curate.config; " \
           "print(sorted(m for m in ('torch','ray','faiss','open_clip','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_stage_on_a_table_in_a_notebook():
    t = pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a photo of a cat"]})
    res = curate.create_stage("download", timeout=1)(t)  # loopback is refused by default
    assert res.kept.num_rows == 0 and res.rejected.num_rows == 1
    assert res.rejected["reject_reason"][0].as_py() == "blocked_address"
    res = curate.create_stage("download", timeout=1, allow_networks=["127.0.0.1/32"])(t)
    assert res.rejected["reject_reason"][0].as_py() == "download_failed"
    assert res.rejected["error_type"][0].as_py() == "connection_refused"


def test_cli_validate_run_stats(demo_input, tmp_path):
    from conftest import demo_config

    cfg = demo_config(demo_input, tmp_path / "out")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "curate.cli"]
    r = subprocess.run(cli + ["validate", str(path), "--set", "input.shard_size=500"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["input"]["shard_size"] == 500
    assert not (tmp_path / "out").exists()  # validate does no work
    r = subprocess.run(cli + ["-q", "run", str(path), "--set", "input.shard_size=500"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rows in: 240" in r.stdout
    resolved = yaml.safe_load((tmp_path / "out" / "config.resolved.yaml").read_text())
    assert resolved["input"]["shard_size"] == 500
    r = subprocess.run(cli + ["stats", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "download" in r.stdout and "http_404" in r.stdout
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["run"]["rows_in"] == 240


def test_curate_demo_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "curate.cli", "-q", "demo", str(tmp_path / "demo"), "--rows", "120"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rows in: 120" in r.stdout and "output:" in r.stdout
    assert list((tmp_path / "demo" / "data").glob("*.parquet"))
    stats = json.loads((tmp_path / "demo" / "stats.json").read_text())
    reasons = stats["run"]["rejected_by_reason"]
    for reason in ("download_failed", "decode_failed", "opted_out", "missing_url"):
        assert reasons.get(reason), reasons


def test_pipelines_presets(tmp_path):
    from curate import pipelines

    assert "demo" in pipelines.available()
    cfg = pipelines.load("demo", input="x.parquet", output=str(tmp_path), input__shard_size=7)
    assert cfg.input.path == "x.parquet" and cfg.input.shard_size == 7
    with pytest.raises(ConfigError, match="no pipeline"):
        pipelines.load("nope")


def test_runner_address_implies_ray():
    cfg = load_config(REPO / "configs" / "demo.yaml", {"runner.address": "auto"})
    assert cfg.runner.kind == "ray" and cfg.runner.address == "auto"
