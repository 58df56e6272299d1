"""The Ray runner: the same stage code, scheduled as Ray tasks or as a streaming Ray Data pipeline.

A segment runs as one Ray task per shard doing all of it -- read, stages, write, done marker -- at
most one per CPU, like the local runner's loop spread over the cluster; a worker process keeps the
segment's stage objects (models included) for every shard it runs.  A segment with a model stage that
holds a GPU (or every model segment, with ``runner.actor_pools: always``) streams through Ray Data
instead: each map stage becomes a ``map_batches`` over pyarrow batches: stages that load models
(``Resources.stateful``) run in an actor pool (GPUs per actor from the config), the others as
tasks.  The first operator reads the rows entering the segment per shard (live rows only, see
:mod:`curate.runners.flow`); the last writes each batch's column-group part per shard and
reports ``(shard, rows)``.  The driver consumes those reports as they stream in and finishes a
shard -- done marker included -- as soon as all its rows cleared the segment, while other
shards are still running: a killed run redoes only unfinished shards.  In the last segment a
shard whose rows arrive in one batch is finished by the writer itself (no part written and
read back).

Workers stay bounded: a task worker keeps one stage object (keyed by the segment's state
token, not by object identity), and per-stage seconds ride along with the rows as a column
summed by the write operator -- no round trip to a timing actor per batch.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from curate import schema as S
from curate.config import RunnerConfig
from curate.context import ray_map
from curate.io import fs
from curate.layout import Layout
from curate.progress import progress
from curate.runners.base import Runner
from curate.runners.common import Segment, SegmentJob, finish_shard, run_shard
from curate.runners.flow import RowCache, ShardRows, attach_cache, done_shards, remove_group, write_group
from curate.stage import COMPUTED, Stage, release_memory

log = logging.getLogger(__name__)

SECONDS = "__seconds_"  # + stage index: per-row share of the batch's seconds in that stage
RAN = "__ran_"  # + stage index: rows of a shard in a batch that the stage ran on (not taken from the row cache)
READ_CPUS = 0.25  # a shard read is light
MAX_FINISHING = 32  # shard finish tasks in flight (the driver's memory stays flat)

# this worker's stages of the current segment: {"key": segment token, index: stage}.  Consecutive task stages
# are fused into one task, so a worker holds one object per stage of the segment -- never one per batch.
_STAGES: dict[Any, Any] = {}


def _build_stage(params: dict, state: Any, setup: bool = True) -> Stage:
    """``setup=False``: the stage loads its model on the first batch with a row to run on (none when the row
    cache holds every result)."""
    from curate import registry

    stage = registry.create(params)
    if state is not None:
        stage.set_state(state)
    if setup:
        stage.ensure_setup()
    return stage


def _timed(stage: Stage, index: int, batch: pa.Table) -> pa.Table:
    t0 = time.perf_counter()
    out = stage.run_batch(batch)
    share = (time.perf_counter() - t0) / max(1, out.num_rows)
    return out.append_column(f"{SECONDS}{index}", pa.array([share] * out.num_rows, pa.float64()))


class _StageActor:
    """Actor-pool worker: the stage is set up once per actor (and freed with the actor)."""

    def __init__(self, params: dict, state: Any, index: int, write: tuple | None = None) -> None:
        import ray

        self.stage = _build_stage(params, ray.get(state[0]) if state else None)
        self.index = index
        self.write = write  # the segment's last stage writes its own output (no hop to a write task)
        final = write[-2] if write else None
        if final is not None:  # finishing a shard runs this stage on earlier rejects: the loaded one, not a copy
            final.segment.maps = [self.stage if st.id == self.stage.id else st for st in final.segment.maps]

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = _timed(self.stage, self.index, batch)
        return _write_parts(out, *self.write) if self.write else out


def _stage_task(batch: pa.Table, params: dict, state: list | None, key: str, index: int) -> pa.Table:
    """Task worker for stateless stages: one stage object per stage of the segment and worker process.

    ``key`` identifies the segment run; when it changes, the previous segment's stages are torn down.
    ``state`` is ``[ObjectRef]`` (nested, so Ray does not fetch it for every batch): it is read
    only when this worker builds the stage.
    """
    _switch(key)
    stage = _STAGES.get(index)
    if stage is None:
        value = None
        if state:
            import ray

            value = ray.get(state[0])
        stage = _STAGES[index] = _build_stage(params, value)
    return _timed(stage, index, batch)


def _switch(key: str) -> None:
    """Tear down this worker's stages of an earlier segment run when one of run ``key`` arrives."""
    if _STAGES.get("key") != key:
        was = []
        for i, old in list(_STAGES.items()):
            if i == "all":
                was += [st.ensure_teardown(release=False) for st in old]
            elif i != "key":
                was.append(old.ensure_teardown(release=False))
        if any(was):
            release_memory()  # once, not per stage
        _STAGES.clear()
        _STAGES["key"] = key


def _segment_stages(params: list[dict], state: list | None, key: str) -> list[Stage]:
    """This worker's stages of segment run ``key``, built once per worker process and set up on their first
    rows (a model segment's models are loaded once per worker, not per shard).  ``state``: ``[ObjectRef]`` of
    the head's fitted state, read only when building."""
    _switch(key)
    if "all" not in _STAGES:
        import ray

        value = ray.get(state[0]) if state else None
        _STAGES["all"] = [_build_stage(p, value if i == 0 else None, setup=False) for i, p in enumerate(params)]
    return _STAGES["all"]


def _shard_task(job: SegmentJob, params: list[dict], state: list | None, key: str, shard: str, base: str,
                expected: int) -> tuple[str, int]:
    """A whole segment on one shard, in one task: read the rows entering it, run every stage, write and
    finish the shard -- the local runner's loop body, for segments whose stages all run as tasks."""
    stages = _segment_stages(params, state, key)
    job.segment = Segment(job.segment.index, None, stages)  # the set-up objects (finish_shard annotates with them)
    job.inputs, job.expected_rows = {shard: base}, {shard: expected}
    return shard, run_shard(job, shard, stages)


def _read_entering(batch: pa.Table, layout: Layout, k: int, cache: RowCache | None) -> pa.Table:
    return pa.concat_tables([attach_cache(layout, k, shard, ShardRows(layout, shard, base).entering(k), cache)
                             for shard, base in zip(batch["shard"].to_pylist(), batch["base"].to_pylist())],
                            promote_options="permissive")


def _read_args() -> dict[str, Any]:
    return {"num_cpus": READ_CPUS, **fs.ray_env()}


def _write_parts(batch: pa.Table, layout: Layout, k: int, produced: list[str], stage_ids: list[str],
                 compression: str, final: SegmentJob | None, cache: RowCache | None = None) -> pa.Table:
    """Write the batch's column-group part of each shard in it; report rows and stage seconds per shard.

    ``final`` (the last segment: the light job with the bases and row counts of its shards): a shard
    whose rows all arrived in this batch is finished right here -- data/, rejected/, done marker --
    so its rows are not written as a part and read back by a finish task."""
    out: dict[str, list] = defaultdict(list)
    for shard in pc.unique(batch[S.SHARD]).to_pylist():
        part = batch.filter(pc.equal(batch[S.SHARD], shard))
        seconds = [pc.sum(part[f"{SECONDS}{i}"]).as_py() if f"{SECONDS}{i}" in part.column_names else 0.0
                   for i in range(len(stage_ids))]
        ran = [pc.sum(part[COMPUTED + sid]).as_py() or 0 if COMPUTED + sid in part.column_names else 0
               for sid in stage_ids]
        done = final is not None and part.num_rows == final.expected_rows.get(shard)
        if done:
            finish_shard(final, shard, part, dict(zip(stage_ids, seconds)))
        else:
            write_group(layout, k, shard, part, produced, compression, cache)
        out["shard"].append(shard)
        out["rows"].append(part.num_rows)
        out["finished"].append(done)
        for i, (sec, n) in enumerate(zip(seconds, ran)):
            out[f"{SECONDS}{i}"].append(sec)
            out[f"{RAN}{i}"].append(n)
    schema = [("shard", pa.string()), ("rows", pa.int64()), ("finished", pa.bool_())] + \
        [(f"{SECONDS}{i}", pa.float64()) for i in range(len(stage_ids))] + \
        [(f"{RAN}{i}", pa.int64()) for i in range(len(stage_ids))]
    return pa.table({name: pa.array(out[name], t) for name, t in schema})


def _finish(job: SegmentJob, shard: str, inputs: dict[str, str], expected: dict[str, int],
            seconds: dict[str, float], empty: bool) -> dict:
    job.inputs, job.expected_rows = inputs, expected
    if not empty:
        return finish_shard(job, shard, None, seconds)
    rows = job.rows(shard)  # no row entered this segment: nothing ran, the (empty) entering table is its output
    return finish_shard(job, shard, rows.entering(job.segment.index), seconds, rows)


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

        self._size_up()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = os.environ.get("CURATE_RAY_PROGRESS", "1") == "1"
        return self

    def _size_up(self) -> None:
        """What the cluster holds now (its live nodes): a segment is planned for the nodes that are there.
        After a node is lost, the next segment's pools and tasks fit the nodes that remain."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        cpus = [float(r.get("CPU", 0)) for r in nodes]
        self.cpus = sum(cpus) or float(ray.cluster_resources().get("CPU", 1))
        self.gpus = sum(float(r.get("GPU", 0)) for r in nodes)
        self.parallelism = max(1, int(self.cpus))
        self.node_cpus = max(cpus or [1.0])
        #: the smallest node with CPUs: an actor restarted there (its node lost) must leave room for a read
        self.min_node_cpus = min([c for c in cpus if c > 0] or [1.0])
        self._largest_actor = 0.0  # CPUs of the largest actor of the segment being built

    def fit(self, stage: Any, inputs: dict[str, str], rows: int, layout: Layout) -> None:
        self._size_up()  # the fit's tasks are spread over the nodes there are now
        super().fit(stage, inputs, rows, layout)

    def __exit__(self, *exc: Any) -> None:
        if self._session is not None:
            self._session.__exit__(*exc)
            self._session = None

    def map(self, fn: Callable[[Any], Any], items: list[Any], num_cpus: float = 1.0,
            num_gpus: float = 0.0) -> list[Any]:
        return ray_map(fn, items, num_cpus=num_cpus, num_gpus=num_gpus)

    def _pool_size(self, stage: Stage) -> tuple[int, int]:
        res = stage.resources
        if res.concurrency:
            return res.concurrency, res.concurrency
        if res.num_gpus > 0 and self.gpus > 0:
            n = max(1, int(self.gpus / res.num_gpus))
            return n, n
        # leave room for the read/write tasks of the pipeline (2-core machines deadlock otherwise)
        return 1, max(1, int((self.cpus - 0.5) / max(res.num_cpus, 0.01)))

    def _light_tasks(self, stages: list[Stage], factors: tuple[float, float]) -> int:
        """Tasks of one kind (shard reads, a stateless stage, part writes, shard finishes) that may run at
        once: one per CPU the actor pools leave free.  Every task running at the same time is a worker
        process of its own (Python, Ray, pyarrow and curate imported: ~1.5 CPU-s each), and at 0.25 CPU a
        task the free CPUs of a 2-core machine started 7 of them for a 10,000-row download (10.7 CPU-s, a
        seventh of the run's CPU; with one per free CPU the run took 57 CPU-s instead of 76,
        bench/download.py)."""
        # the pools' minimum sizes: an autoscaling pool (1..n actors) on a large cluster leaves its CPUs to tasks
        busy = sum(self._pool_size(s)[0] * s.resources.num_cpus * factors[0] for s in stages if s.resources.stateful)
        return max(1, int(self.cpus - busy))

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

    def _actor_cpus(self, res: Any, factors: tuple[float, float]) -> float:
        """CPUs of one actor of a pool: scaled to fit the cluster, and leaving a shard read room on the
        smallest node (where Ray may restart it when its node is lost)."""
        return max(0.05, min(res.num_cpus * factors[0], self.min_node_cpus - READ_CPUS))

    def _warn_without_gpus(self, stages: list[Stage]) -> None:
        for st in stages:
            if st.resources.num_gpus > 0 and self.gpus == 0:
                log.warning("stage %r asks for %s GPU per worker but the cluster has none: running it on CPUs",
                            st.id, st.resources.num_gpus)

    def _add_stage(self, ds: Any, stage: Stage, index: int, state: list | None, key: str,
                   factors=(1.0, 1.0), max_rows: int | None = None, write: tuple | None = None,
                   tasks: int | None = None) -> Any:
        import ray

        res = stage.resources
        params = stage.params.model_dump(mode="json")
        if res.stateful:  # wherever an actor lands (a restart after a node loss too), a shard read fits beside it
            num_cpus = self._actor_cpus(res, factors)
        else:  # and a task of every other kind fits beside the largest actor of the segment, on any node
            num_cpus = min(res.num_cpus, max(READ_CPUS, self.min_node_cpus - self._largest_actor))
        # a batch larger than a shard would merge shards into one block and serialise the stages after it
        batch_size = min(res.batch_size, max_rows) if max_rows else res.batch_size
        common = dict(batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus, **fs.ray_env())
        self._warn_without_gpus([stage])
        if res.num_gpus > 0 and self.gpus > 0:
            common["num_gpus"] = res.num_gpus * factors[1]
        if res.stateful:
            lo, hi = self._pool_size(stage)
            # a class per stage: Ray names the operator and the actor processes after it (ray::MapWorker(...))
            actor_cls = type(f"Stage_{stage.id}", (_StageActor,), {"__module__": __name__})
            return ds.map_batches(actor_cls, fn_constructor_args=(params, state, index, write),
                                  compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), **common)
        if tasks is not None:  # one task per free CPU at most (see _light_tasks)
            common["compute"] = ray.data.TaskPoolStrategy(size=tasks)
        return ds.map_batches(_stage_task, fn_args=(params, state, key, index), **common)

    def _run_by_shard(self, job: SegmentJob) -> None:
        """A segment without actor pools (see :meth:`streams`): one task per shard runs all of it (read, stages,
        write, done marker), at most one task per CPU at a time.

        Streamed through Ray Data instead, such a segment costs a read task, a stage task, a write task
        and a finish task per shard, their blocks copied through the object store, and a worker process
        for each of them running at once (each one imports Ray, pyarrow and curate): on 2 CPUs the light
        pipeline of bench/scale.py spent four times the local runner's CPU seconds that way.  Task
        workers are reused across segments, and the fitted state of the head is fetched once per worker.
        """
        import ray

        stages = job.segment.stages
        head = job.segment.head
        self._warn_without_gpus(stages)
        params = [st.params.model_dump(mode="json") for st in stages]
        state = [ray.put(head.state)] if head is not None else None
        res = [st.resources for st in stages]
        cpus = max([1.0] + [r.num_cpus for r in res])
        gpus = max([0.0] + [r.num_gpus for r in res]) if self.gpus > 0 else 0.0
        cpus = min(cpus, self.cpus)
        slots = max(1, int(self.cpus // cpus))
        caps = [r.concurrency for r in res if r.concurrency]
        window = 2 * slots  # as many queued behind the running ones: no CPU idles between two shards
        if caps and min(caps) < slots:  # a stage's `concurrency`: at most that many shard tasks run at once
            slots = min(caps)
            if self.cpus / slots <= self.node_cpus:  # Ray itself keeps the rest queued
                cpus, window = self.cpus / slots, 2 * slots
            else:  # so many CPUs fit no node: no queue
                window = slots
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=3, **fs.ray_env())(_shard_task)
        light = ray.put(job.light())
        key = uuid.uuid4().hex
        todo = iter(sorted(job.inputs))
        running: list[Any] = []
        names = " → ".join(st.id for st in stages) or "write"
        log.debug("segment %d: %d shards, one task each (%.2f CPU per task, %d in flight)", job.segment.index,
                  len(job.inputs), cpus, window)
        with progress(f"segment {job.segment.index}: {names}", total=len(job.inputs), unit="shard") as bar:
            while True:
                while len(running) < window and (shard := next(todo, None)) is not None:
                    running.append(task.remote(light, params, state, key, shard, job.inputs[shard],
                                               job.expected_rows.get(shard, 0)))
                if not running:
                    break
                done, running = ray.wait(running, num_returns=1)
                ray.get(done)
                bar.advance(1)

    def streams(self, stages: list[Stage]) -> bool:
        """Whether a segment runs through Ray Data's actor pools (``runner.actor_pools``).

        An actor pool pays off where a model holds a GPU: one model copy per GPU, fed by reads and writes that
        run beside it.  On CPUs it only adds cost: on the demo pipeline (10,000 rows, 2 CPUs) the pools started new
        actor processes for every model segment (torch imported and the model built again), a read, a write part
        and a finish task per shard with their blocks copied through the object store, and Ray Data's executor
        and helper actors; ``bench/scale.py`` measured the Ray runner at 1.23-1.31x the local runner's CPU
        seconds that way, and at 0.96-1.05x with a task per shard.  So on CPUs a model segment runs one task per
        shard like any other, the worker processes (reused across segments) loading its models once each."""
        pools = [st for st in stages if st.resources.stateful]
        if not pools:
            return False
        if self.cfg.actor_pools == "always":
            return True
        return self.gpus > 0 and any(st.resources.num_gpus > 0 for st in pools)

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        import ray

        self._size_up()
        if not self.streams(job.segment.stages):
            self._run_by_shard(job)
            missing = sorted(set(job.inputs) - done_shards(job.layout, job.segment.index))
            if missing:
                raise RuntimeError(f"segment {job.segment.index}: shards {missing[:5]} were not finished")
            return {}
        k = job.segment.index
        stages = job.segment.stages
        todo = sorted(s for s in job.inputs if job.expected_rows.get(s, 0) > 0)
        empty = sorted(s for s in job.inputs if job.expected_rows.get(s, 0) == 0)
        for shard in todo:  # parts an interrupted run left for unfinished shards
            remove_group(job.layout, k, shard)
        finish = ray.remote(num_cpus=0.25, **fs.ray_env())(_finish)
        light = job.light()
        pending: list[Any] = []
        factors = self._fit_factors(stages)
        tasks = self._light_tasks(stages, factors)
        in_flight = min(MAX_FINISHING, tasks)
        self._largest_actor = max(self._actor_cpus(st.resources, factors) for st in stages if st.resources.stateful)

        def start(shard: str, seconds: dict[str, float], is_empty: bool) -> None:
            pending.append(finish.remote(light, shard, {shard: job.inputs[shard]},
                                         {shard: job.expected_rows.get(shard, 0)}, seconds, is_empty))
            while len(pending) > in_flight:
                done, rest = ray.wait(pending, num_returns=1)
                ray.get(done)
                pending[:] = rest

        for shard in empty:
            start(shard, {}, True)
        if todo:
            ds = ray.data.from_items([{"shard": s, "base": job.inputs[s]} for s in todo],
                                     override_num_blocks=len(todo))
            # light tasks read one shard each (Ray's file listing operator takes a whole CPU and starves
            # actor pools on small machines).  A ``ray_remote_args_fn`` keeps Ray Data from fusing the read
            # into the first stage: fused, the stage's batch size (in rows) would bundle that many *shards*
            # into one task, and one worker would run the whole segment while the others wait.
            ds = ds.map_batches(_read_entering, fn_args=(job.layout, k, job.cache), batch_size=1, **fs.ray_env(),
                                batch_format="pyarrow", num_cpus=READ_CPUS, ray_remote_args_fn=_read_args,
                                compute=ray.data.TaskPoolStrategy(size=tasks))
            head_state = [ray.put(job.segment.head.state)] if job.segment.head is not None else None
            key = uuid.uuid4().hex
            max_rows = max((job.expected_rows[s] for s in todo), default=None)
            final = None
            if job.final:
                final = job.light()
                final.inputs = {s: job.inputs[s] for s in todo}
                final.expected_rows = {s: job.expected_rows[s] for s in todo}
            write = (job.layout, k, job.segment.produces, [st.id for st in stages], job.compression, final, job.cache)
            # an actor-pool last stage writes its batches itself: its output (image bytes, embeddings) is not
            # shipped through the object store to a write task
            own_write = bool(stages) and stages[-1].resources.stateful
            for i, st in enumerate(stages):
                ds = self._add_stage(ds, st, i, head_state if st is job.segment.head else None, key, factors,
                                     max_rows, write if own_write and i == len(stages) - 1 else None, tasks)
            if not own_write:
                ds = ds.map_batches(_write_parts, fn_args=write, batch_size=None, batch_format="pyarrow",
                                    num_cpus=0.25, **fs.ray_env(), compute=ray.data.TaskPoolStrategy(size=tasks))
            got: dict[str, int] = defaultdict(int)
            secs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    shard = row["shard"]
                    got[shard] += row["rows"]
                    for i, st in enumerate(stages):
                        secs[shard][st.id] += row.get(f"{SECONDS}{i}") or 0.0
                        secs[shard][COMPUTED + st.id] += row.get(f"{RAN}{i}") or 0
                    if row.get("finished"):  # finished by the writer (final segment, rows in one batch)
                        secs.pop(shard, None)
                        del got[shard]
                    elif got[shard] >= job.expected_rows[shard]:  # every row of the shard cleared the segment
                        start(shard, dict(secs.pop(shard)), False)
                        del got[shard]
            if log.isEnabledFor(logging.DEBUG):
                log.debug("segment %d, Ray Data stats:\n%s", k, ds.stats())
            if got:
                raise RuntimeError(f"segment {k}: rows of shards {sorted(got)[:5]} did not all come back")
        ray.get(pending)
        missing = sorted(set(job.inputs) - done_shards(job.layout, job.segment.index))
        if missing:
            raise RuntimeError(f"segment {k}: shards {missing[:5]} were not finished")
        return {}  # seconds are in each shard's done marker
