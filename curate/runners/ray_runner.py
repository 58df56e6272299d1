"""The Ray Data runner: the same stage code, scheduled as a streaming Ray Data pipeline.

Each map stage becomes a ``map_batches`` over pyarrow batches: stages that
load models (``Resources.stateful``) run in an actor pool (GPUs per actor from
the config), the others as tasks.  Rows carry their work shard id; the last
operator writes each batch's rows as parts per shard, and once every row of
a shard is written the shard is finished (sorted, split into ``data/`` and
``rejected/``) by a Ray task -- the same ``finish_shard`` the local runner calls.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.config import RunnerConfig
from curate.io.files import write_parquet_atomic
from curate.runners.base import Runner
from curate.runners.common import Segment, SegmentJob, finish_shard
from curate.stage import Stage

log = logging.getLogger(__name__)

_STAGES: dict[str, Stage] = {}


def _build_stage(params: dict, state: Any) -> Stage:
    from curate import registry

    stage = registry.create(params)
    if state is not None:
        stage.set_state(state)
    stage.ensure_setup()
    return stage


class _StageActor:
    """Actor-pool worker: the stage is set up once per actor."""

    def __init__(self, params: dict, state: Any, timing: Any) -> None:
        self.stage = _build_stage(params, state)
        self.timing = timing

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        t0 = time.perf_counter()
        out = self.stage.run_batch(batch)
        ray.get(self.timing.add.remote(self.stage.id, time.perf_counter() - t0))
        return out


def _stage_task(batch: pa.Table, params: dict, state: Any, timing: Any) -> pa.Table:
    """Task worker for stateless stages; the stage object is cached per worker process."""
    import json

    import ray

    key = json.dumps(params, sort_keys=True, default=str) + str(id(state))
    stage = _STAGES.get(key)
    if stage is None:
        stage = _STAGES[key] = _build_stage(params, state)
    t0 = time.perf_counter()
    out = stage.run_batch(batch)
    ray.get(timing.add.remote(stage.id, time.perf_counter() - t0))
    return out


def _read_shards(batch: pa.Table) -> pa.Table:
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in batch["path"].to_pylist()], promote_options="permissive")


def _write_parts(batch: pa.Table, parts_dir: str, compression: str) -> pa.Table:
    shards, paths, rows = [], [], []
    for shard in pc.unique(batch[S.SHARD]).to_pylist():
        part = batch.filter(pc.equal(batch[S.SHARD], shard))
        path = Path(parts_dir) / shard / f"{uuid.uuid4().hex}.parquet"
        write_parquet_atomic(part, path, compression)
        shards.append(shard)
        paths.append(str(path))
        rows.append(part.num_rows)
    return pa.table({"shard": pa.array(shards, pa.string()), "path": pa.array(paths, pa.string()),
                     "rows": pa.array(rows, pa.int64())})


def _finish(job: SegmentJob, shard: str, paths: list[str]) -> dict:
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="permissive")
    info = finish_shard(job, shard, table)
    shutil.rmtree(Path(paths[0]).parent, ignore_errors=True)
    return info


class RayRunner(Runner):
    kind = "ray"

    def __init__(self, cfg: RunnerConfig) -> None:
        self.cfg = cfg
        self._session = None

    def __enter__(self) -> "RayRunner":
        from curate.raycluster import ray_session

        self._session = ray_session(self.cfg.address, self.cfg.num_cpus, self.cfg.num_gpus,
                                    self.cfg.object_store_memory)
        self._session.__enter__()
        import ray

        res = ray.cluster_resources()
        self.cpus = float(res.get("CPU", 1))
        self.gpus = float(res.get("GPU", 0))
        self.parallelism = max(1, int(self.cpus))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = os.environ.get("CURATE_RAY_PROGRESS", "1") == "1"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._session is not None:
            self._session.__exit__(*exc)
            self._session = None

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        import ray

        if len(items) <= 1:
            return [fn(x) for x in items]
        remote = ray.remote(num_cpus=1)(fn)
        return ray.get([remote.remote(x) for x in items])

    def _pool_size(self, stage: Stage) -> tuple[int, int]:
        res = stage.resources
        if res.concurrency:
            return res.concurrency, res.concurrency
        if res.num_gpus > 0 and self.gpus > 0:
            n = max(1, int(self.gpus / res.num_gpus))
            return n, n
        # leave room for the read/write tasks of the pipeline (2-core machines deadlock otherwise)
        return 1, max(1, int((self.cpus - 0.5) / max(res.num_cpus, 0.01)))

    def _fit_factors(self, stages: list[Stage]) -> tuple[float, float]:
        """Scale factors so one actor of every actor-pool stage fits the cluster at once.

        Ray Data starts at least one actor per pool; if their CPUs (or GPUs) add up to more than the
        cluster has, the pipeline deadlocks (a 2-core laptop with download + CLIP + LM stages).
        ``num_cpus`` is a scheduling hint, so scaling it down only allows co-location.
        """
        pools = [s.resources for s in stages if s.resources.stateful]
        cpu_need = sum(r.num_cpus for r in pools)
        gpu_need = sum(r.num_gpus for r in pools if r.num_gpus > 0)
        cpu_budget = max(self.cpus - 0.5, 0.1)  # room for the read and write tasks
        fc = min(1.0, cpu_budget / cpu_need) if cpu_need else 1.0
        fg = min(1.0, self.gpus / gpu_need) if gpu_need and self.gpus else 1.0
        if fc < 1 or fg < 1:
            log.info("scaling actor resources to fit the cluster: CPUs x%.2f, GPUs x%.2f", fc, fg)
        return fc, fg

    def _add_stage(self, ds: Any, stage: Stage, state: Any, timing: Any, factors=(1.0, 1.0),
                   max_rows: int | None = None) -> Any:
        import ray

        res = stage.resources
        params = stage.params.model_dump(mode="json")
        num_cpus = max(0.05, res.num_cpus * factors[0]) if res.stateful else res.num_cpus
        # a batch larger than a shard would merge shards into one block and serialise the stages after it
        batch_size = min(res.batch_size, max_rows) if max_rows else res.batch_size
        common = dict(batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus)
        if res.num_gpus > 0 and self.gpus == 0:
            log.warning("stage %r asks for %s GPU per worker but the cluster has none: running it on CPUs",
                        stage.id, res.num_gpus)
        elif res.num_gpus > 0:
            common["num_gpus"] = res.num_gpus * factors[1]
        if res.stateful:
            lo, hi = self._pool_size(stage)
            return ds.map_batches(_StageActor, fn_constructor_args=(params, state, timing),
                                  compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), **common)
        return ds.map_batches(_stage_task, fn_args=(params, state, timing), **common)

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        import ray

        timing = _timing_actor_class().remote()
        parts_dir = job.layout.parts(job.segment.index)
        shutil.rmtree(parts_dir, ignore_errors=True)
        # one item per shard file, read by light tasks (Ray's file listing operator takes a whole CPU
        # and starves actor pools on small machines)
        ds = ray.data.from_items([{"path": p} for p in sorted(job.inputs.values())],
                                 override_num_blocks=len(job.inputs))
        ds = ds.map_batches(_read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
        state = job.segment.head.state if job.segment.head is not None else None
        factors = self._fit_factors(job.segment.stages)
        for st in job.segment.stages:
            ds = self._add_stage(ds, st, state if st is job.segment.head else None, timing, factors,
                                 max(job.expected_rows.values(), default=None))
        ds = ds.map_batches(_write_parts, fn_args=(str(parts_dir), job.compression), batch_size=None,
                            batch_format="pyarrow", num_cpus=0.25)
        written = ds.take_all()
        by_shard: dict[str, list[str]] = defaultdict(list)
        for r in written:
            by_shard[r["shard"]].append(r["path"])
        missing = set(job.inputs) - set(by_shard)
        if missing:
            raise RuntimeError(f"segment {job.segment.index}: no rows came back for shards {sorted(missing)[:5]}")
        light = dataclasses.replace(job, segment=Segment(job.segment.index, None, []))
        finish = ray.remote(num_cpus=0.5)(_finish)
        ray.get([finish.remote(light, shard, paths) for shard, paths in sorted(by_shard.items())])
        shutil.rmtree(parts_dir, ignore_errors=True)
        return ray.get(timing.snapshot.remote())


@functools.lru_cache(maxsize=1)
def _timing_actor_class():
    """Per-stage seconds reported by the workers (defined lazily: ``ray`` is imported on use)."""
    import ray

    @ray.remote(num_cpus=0)
    class Timing:
        def __init__(self) -> None:
            self.t: dict[str, float] = {}

        def add(self, key: str, seconds: float) -> None:
            self.t[key] = self.t.get(key, 0.0) + seconds

        def snapshot(self) -> dict[str, float]:
            return dict(self.t)

    return Timing
