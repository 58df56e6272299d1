"""The local and the Ray runner run the same stage code and give the same output."""

from __future__ import annotations

import pytest

from conftest import demo_config
from helpers import read_dir, rows_by_uid, stage_counts


@pytest.mark.ray
@pytest.mark.parametrize("pools", ["auto", "always"])
def test_local_and_ray_give_identical_output(demo_run_local, demo_input, ray_cluster, tmp_path, pools):
    """``auto`` on CPUs: every segment one task per shard (models loaded once per worker process); ``always``:
    the model segments stream through Ray Data's actor pools (as on GPUs)."""
    import curate

    ray_out = tmp_path / "ray"
    res = curate.run(demo_config(demo_input, ray_out, **{"runner.kind": "ray", "runner.actor_pools": pools}))
    assert res.stats["run"]["runner"] == "ray"
    local_out = demo_run_local.output
    for sub in ("data", "rejected"):
        a, b = read_dir(local_out / sub), read_dir(ray_out / sub)
        assert a.schema == b.schema
        assert a.num_rows == b.num_rows
        assert rows_by_uid(a) == rows_by_uid(b), f"{sub}/ differs between runners"
    assert stage_counts(local_out) == stage_counts(ray_out)
    # same shard files, byte-for-byte same content order (both sort rows by input order)
    assert sorted(p.name for p in (local_out / "data").glob("*.parquet")) == \
        sorted(p.name for p in (ray_out / "data").glob("*.parquet"))
    # the private local instance keeps its session folder small (curate.raycluster.LEAN_LOG_ENV): no
    # periodic raylet debug dump, no Ray Data DEBUG lines; its warnings and errors are still logged
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    assert not list(logs.rglob("debug_state*.txt"))
    if pools == "always":  # Ray Data ran (the session's Ray may not have run it before with ``auto``)
        assert (logs / "ray-data").is_dir() and list((logs / "ray-data").glob("*.log"))
        assert not [f for f in (logs / "ray-data").glob("*.log") if "\tDEBUG " in f.read_text(errors="replace")]
