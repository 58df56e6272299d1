"""The local and the Ray runner run the same stage code and give the same output."""

from __future__ import annotations

import pytest

from conftest import demo_config
from helpers import read_dir, rows_by_uid, stage_counts


@pytest.mark.ray
def test_local_and_ray_give_identical_output(demo_run_local, demo_input, ray_cluster, tmp_path):
    import curate

    ray_out = tmp_path / "ray"
    res = curate.run(demo_config(demo_input, ray_out, **{"runner.kind": "ray"}))
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
