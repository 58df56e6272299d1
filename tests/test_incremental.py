"""Incremental re-runs: a changed config on an existing output redoes only the segments that changed."""

from __future__ import annotations

import json
import logging
import shutil

from conftest import demo_config
from helpers import read_dir, rows_by_uid, stage_counts


def _copy_of(demo_run_local, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_run_local.output, out)
    return out


def _with(cfg: dict, stage: str, **params) -> dict:
    for st in cfg["stages"]:
        if st["stage"] == stage:
            st.update(params)
    return cfg


def _same_output(a, b) -> None:
    for sub in ("data", "rejected"):
        assert rows_by_uid(read_dir(a / sub)) == rows_by_uid(read_dir(b / sub)), f"{sub}/ differs"
    assert stage_counts(a) == stage_counts(b)


def _every_row_once(out, n_rows: int) -> None:
    uids = read_dir(out / "data")["uid"].to_pylist() + read_dir(out / "rejected")["uid"].to_pylist()
    assert len(uids) == n_rows
    assert json.loads((out / "stats.json").read_text())["run"]["rows_in"] == n_rows


def test_a_new_recaption_prompt_redoes_only_the_last_segment(demo_run_local, demo_input, demo_server, tmp_path,
                                                             caplog):
    import curate

    out = _copy_of(demo_run_local, tmp_path)
    cfg = _with(demo_config(demo_input, out), "recaption", prompt="a photograph showing")
    before = demo_server.hits
    with caplog.at_level(logging.INFO, logger="curate"):
        res = curate.run(cfg)
    assert demo_server.hits == before, "a re-run after a recaption change must not download again"
    reused = [s["reused"] for s in res.segments]
    assert reused == [True] * (len(reused) - 1) + [False]
    assert "recaption" in res.segments[-1]["stages"]
    log = caplog.text
    assert "segment 0 (unique_uid → download): reused from the previous run" in log
    assert "redone -- parameters of recaption changed" in log

    fresh = tmp_path / "fresh"
    curate.run(_with(demo_config(demo_input, fresh), "recaption", prompt="a photograph showing"))
    _same_output(out, fresh)
    captions = read_dir(out / "data")["training_caption"].to_pylist()
    assert captions != read_dir(demo_run_local.output / "data")["training_caption"].to_pylist()


def test_a_changed_middle_stage_redoes_from_its_segment_on(demo_run_local, demo_input, demo_server, tmp_path):
    import curate

    out = _copy_of(demo_run_local, tmp_path)
    cfg = _with(demo_config(demo_input, out), "clip_score", top_fraction=0.8)
    before = demo_server.hits
    res = curate.run(cfg)
    assert demo_server.hits == before
    first = next(s["index"] for s in res.segments if "clip_score" in s["stages"])
    assert [s["reused"] for s in res.segments] == [s["index"] < first for s in res.segments]
    _every_row_once(out, 240)
    stats = json.loads((out / "stats.json").read_text())
    clip = next(s for s in stats["stages"] if s["id"] == "clip_score")
    assert abs(clip["rejected"]["clip_score_too_low"] - clip["rows_in"] * 0.2) <= 1  # top 80% now, not 95%
    # the run after it, with the same config, is a plain resume of a finished run: nothing is redone
    res2 = curate.run(cfg)
    assert demo_server.hits == before
    assert all(s["reused"] for s in res2.segments)
    _every_row_once(out, 240)


def test_appending_a_global_stage_keeps_every_segment_before_it(demo_run_local, demo_input, demo_server, tmp_path):
    import curate

    out = _copy_of(demo_run_local, tmp_path)
    cfg = demo_config(demo_input, out)
    cfg["stages"].append({"stage": "dedup_exact", "id": "caption_dups", "key": ["caption"]})
    before = demo_server.hits
    res = curate.run(cfg)
    assert demo_server.hits == before
    n_old = len(demo_run_local.segments)
    assert len(res.segments) == n_old + 1
    # the old last segment now hands its rows to a new global stage instead of writing data/: redone
    assert [s["reused"] for s in res.segments] == [True] * (n_old - 1) + [False, False]
    _every_row_once(out, 240)
    assert "caption_dups" in [s["id"] for s in json.loads((out / "stats.json").read_text())["stages"]]


def _small_input(demo_input, tmp_path, rows: int = 60):
    import pyarrow.parquet as pq

    small = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(demo_input).slice(0, rows), small)
    return small


def test_other_input_settings_redo_everything(demo_input, demo_server, tmp_path):
    import curate

    out = tmp_path / "out"
    small = _small_input(demo_input, tmp_path)
    curate.run(demo_config(small, out))
    before = demo_server.hits
    res = curate.run(demo_config(small, out, **{"input.shard_size": 25}))  # other shards: nothing to reuse
    assert demo_server.hits > before
    assert not any(s["reused"] for s in res.segments)
    _every_row_once(out, 60)
    assert json.loads((out / "stats.json").read_text())["run"]["shards"] == 3


def test_without_kept_work_a_re_run_redoes_everything(demo_input, demo_server, tmp_path):
    import curate

    small = _small_input(demo_input, tmp_path)
    out = tmp_path / "out"
    cfg = demo_config(small, out, **{"output.keep_work": False})
    curate.run(cfg)
    assert not (out / "_work" / "seg-0").exists()
    before = demo_server.hits
    res = curate.run(_with(cfg, "recaption", prompt="another prompt"))
    assert demo_server.hits > before
    assert not any(s["reused"] for s in res.segments)
    _every_row_once(out, 60)


def test_incremental_re_run_on_ray_equals_a_fresh_local_run(demo_input, demo_server, tmp_path, ray_cluster):
    import curate

    small = _small_input(demo_input, tmp_path, rows=120)

    def light(out, **over):  # image stages and one global filter: the flow, not the models
        cfg = demo_config(small, out, **over)
        cfg["stages"] = [st for st in cfg["stages"] if st["stage"] in
                         ("download", "dedup_exact", "phash", "dedup_phash", "caption", "image_size")]
        return cfg

    out = tmp_path / "ray"
    curate.run(light(out, **{"runner.kind": "ray"}))
    before = demo_server.hits
    res = curate.run(_with(light(out, **{"runner.kind": "ray"}), "dedup_phash", radius=2))
    assert demo_server.hits == before
    first = next(s["index"] for s in res.segments if "dedup_phash" in s["stages"])
    assert [s["reused"] for s in res.segments] == [s["index"] < first for s in res.segments]
    fresh = tmp_path / "fresh"
    curate.run(_with(light(fresh), "dedup_phash", radius=2))
    _same_output(out, fresh)
