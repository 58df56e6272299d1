"""The stage contract.

A stage is configured by a pydantic ``Params`` model, declares the columns it
``needs`` and ``produces`` and its resources, loads heavy things in
``setup()`` and transforms a ``pyarrow.Table`` batch in ``process()``.

``process`` returns every row it was given (same count): kept rows untouched
apart from the produced columns, rejected rows marked with
:meth:`Stage.reject`.  Rows are never dropped, which is how the runners
guarantee that every input row ends up in ``data/`` or ``rejected/``.

Two kinds:

* ``MapStage`` -- row-wise, runs batch by batch, in any order, anywhere.
* ``GlobalStage`` -- needs the whole corpus first (dedup, top-fraction
  filters).  ``fit(ctx)`` sees every shard of the stage's input (it may use
  Ray or DuckDB and must stay bounded in memory), returns a small picklable
  state, then ``process`` is run batch by batch with that state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from curate import schema as S
from curate.context import FitContext
from curate.table_ops import add_missing, mark_rejected, prepare_for_stages

log = logging.getLogger(__name__)


class StageParams(BaseModel):
    """Parameters every stage accepts, besides its own."""

    model_config = ConfigDict(extra="forbid")
    #: parameters that change how fast a stage runs, never what it outputs (left out of fingerprints)
    execution_params: ClassVar[tuple[str, ...]] = ("num_cpus", "num_gpus", "concurrency")

    stage: str = Field(description="registered stage name")
    id: str | None = Field(None, description="stage id in stats and reject_stage (default: the name)")
    batch_size: int | None = Field(None, ge=1, description="rows per batch handed to process()")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per worker (Ray runner)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per worker (Ray runner)")
    concurrency: int | None = Field(None, ge=1, description="workers for this stage (Ray runner)")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 1024
    concurrency: int | None = None
    #: True when the stage keeps state across batches (models): Ray runs it in an actor pool.
    stateful: bool = False


class StageError(RuntimeError):
    """A stage cannot run at all (bad model path, missing column...)."""


@dataclass
class StageResult:
    """What calling a stage on a table in a notebook gives back."""

    table: pa.Table
    stage_id: str
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> pa.Table:
        return self.table.filter(pc.is_null(self.table[S.REJECT_REASON]))

    @property
    def rejected(self) -> pa.Table:
        mask = pc.equal(self.table[S.REJECT_STAGE], self.stage_id)
        return self.table.filter(pc.fill_null(mask, False))


class Stage:
    name: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = StageParams
    needs: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "map"
    #: error types of this stage's rejections that may pass on another try (``--retry-failed``'s default;
    #: ``*`` matches any characters, e.g. ``http_5*``)
    transient_errors: ClassVar[tuple[str, ...]] = ()
    #: defaults for Resources; params (num_cpus, batch_size...) override them
    default_resources: ClassVar[Resources] = Resources()

    def __init__(self, params: StageParams | dict | None = None, **kwargs: Any) -> None:
        if params is None or isinstance(params, dict):
            data = {"stage": self.name, **(params or {}), **kwargs}
            params = self.Params.model_validate(data)
        self.params = params
        self.id = params.id or self.name
        self._ready = False

    # -- declared properties ----------------------------------------------------
    @property
    def resources(self) -> Resources:
        d = self.default_resources
        p = self.params
        return Resources(
            num_cpus=p.num_cpus if p.num_cpus is not None else d.num_cpus,
            num_gpus=p.num_gpus if p.num_gpus is not None else d.num_gpus,
            batch_size=p.batch_size or d.batch_size,
            concurrency=p.concurrency or d.concurrency,
            stateful=d.stateful,
        )

    def output_fields(self) -> list[pa.Field]:
        """Arrow fields of the columns this stage adds."""
        return [S.field(c) for c in self.produces]

    def describe(self) -> dict[str, Any]:
        """Facts for stats.json and the report (model names, random-weight warnings)."""
        return {}

    def thresholds(self) -> list[dict[str, Any]]:
        """The cut-offs this stage applies to a charted metric, for stats.json and the report's
        histograms: ``{"metric", "value", "side", "name"}`` items (:func:`threshold`); a global filter
        gives the value its ``fit`` computed.  Metrics: the keys of ``curate.report.metrics.METRICS``."""
        return []

    # -- lifecycle ---------------------------------------------------------------
    def setup(self) -> None:
        """Load models and other heavy things (called once per worker)."""

    def teardown(self) -> None:
        """Release what ``setup`` loaded beyond its attributes (open files, clients); optional."""

    def ensure_setup(self) -> None:
        if not self._ready:
            before = set(vars(self))
            self.setup()
            self._setup_attrs = set(vars(self)) - before - {"_setup_attrs"}
            self._ready = True

    def ensure_teardown(self, release: bool = True) -> bool:
        """Tear down and drop every attribute ``setup`` created (models, tokenizers), freeing their memory
        -- GPU memory included -- so the stages of different segments are never resident together.
        ``release=False``: the caller collects garbage once after tearing down several stages (a full
        collection costs ~0.3 s with models loaded).  Returns whether the stage was set up."""
        if not self._ready:
            return False
        try:
            self.teardown()
        finally:
            for name in getattr(self, "_setup_attrs", ()):
                self.__dict__.pop(name, None)
            self._ready = False
            if release:
                release_memory()
        return True

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    # -- helpers for process() ---------------------------------------------------
    def reject(
        self,
        table: pa.Table,
        mask: pa.Array | list[bool],
        reason: str | pa.Array | list[str | None],
        detail: str | pa.Array | list[str | None] | None = None,
        error_type: str | pa.Array | list[str | None] | None = None,
    ) -> pa.Table:
        """Mark rows where ``mask`` is true (and not already rejected) as rejected."""
        return mark_rejected(table, mask, reason, self.id, detail, error_type)

    @property
    def applies_to(self) -> str:
        """Which rows ``process`` is given: ``"live"`` (not rejected yet; the default) or ``"all"``: rows
        rejected by earlier stages too, which get the produced columns while their rejection stays as it
        was (``recaption`` with ``only_kept: false``).  In a pipeline an ``"all"`` stage also sees the rows
        rejected in earlier segments, when the last segment writes ``rejected/``; so it must come after
        the last global stage (checked before the run starts)."""
        return "live"

    @property
    def needs_fit(self) -> bool:
        """Whether the stage needs a corpus-wide pass (``fit``) before ``process``: such a stage opens a
        segment.  It follows from the parameters (``clip_score`` with ``min_score`` is a map)."""
        return False

    # -- running -----------------------------------------------------------------
    def run_batch(self, table: pa.Table) -> pa.Table:
        """Apply the stage to a batch that may hold already-rejected rows.

        Only rows not yet rejected are given to ``process`` (unless the stage ``applies_to`` all rows);
        the others pass through with null output columns.  The row count is checked.  The stage is set up
        (its model loaded) on the first batch with a row to run on: not for rows whose result is cached.
        """
        return apply_to_active(self, table)

    def __call__(self, table: pa.Table) -> StageResult:
        """Notebook entry point: ``clip_filter(table).kept``."""
        t0 = time.perf_counter()
        out = self.run_batch(prepare_for_stages(table))
        return StageResult(out, self.id, time.perf_counter() - t0)


#: column prefixes of the row cache (see curate.runners.flow.attach_cache): ``__rc:SID`` a cached result is
#: attached, ``__rv:SID:COL`` / ``__rr:SID`` / ``__rd:SID`` / ``__re:SID`` its values and rejection;
#: ``__rn:SID``: the stage ran on the row in this run (counted, then dropped when the shard is written)
HIT, VALUE, REASON, DETAIL, ERROR, COMPUTED = "__rc:", "__rv:", "__rr:", "__rd:", "__re:", "__rn:"


def _cache_columns(table: pa.Table, sid: str) -> list[str]:
    exact = {HIT + sid, REASON + sid, DETAIL + sid, ERROR + sid}
    return [c for c in table.column_names if c in exact or c.startswith(VALUE + sid + ":")]


def _from_cache(stage: "Stage", part: pa.Table) -> pa.Table:
    """Rows whose result for ``stage`` is cached: its columns and rejection set from the cache."""
    sid = stage.id
    for f in stage.output_fields():
        src = VALUE + sid + ":" + f.name
        col = part[src].cast(f.type) if src in part.column_names else pa.nulls(part.num_rows, f.type)
        i = part.schema.get_field_index(f.name)
        part = part.set_column(i, f, col) if i >= 0 else part.append_column(f, col)
    reason = part[REASON + sid]
    mask = pc.is_valid(reason)
    if pc.any(mask).as_py():
        part = mark_rejected(part, mask, reason.combine_chunks(), sid, part[DETAIL + sid].combine_chunks(),
                             part[ERROR + sid].combine_chunks())
    return part


def apply_to_active(stage: "Stage", table: pa.Table) -> pa.Table:
    """Run ``stage.process`` on the rows of ``table`` not yet rejected; keep order and count.

    A row that carries the stage's cached result (an older generation of the segment ran the stage on it
    with the same row fingerprint) takes it instead of running the stage again.  The rows the stage ran on
    are flagged in ``__rn:SID`` (counted per shard)."""
    missing = [c for c in stage.needs if c not in table.column_names]
    if missing and table.num_rows:  # no row: nothing to run (a shard whose rows were all rejected before a
        # segment of actor pools gets no column of it on the Ray runner)
        raise StageError(f"stage {stage.id!r} needs column(s) {missing} that no earlier stage produced")
    fields = stage.output_fields()
    active = pc.is_null(table[S.REJECT_REASON])
    cached = _cache_columns(table, stage.id)
    if HIT + stage.id in table.column_names and stage.applies_to != "all":
        hit = pc.and_(active, pc.fill_null(table[HIT + stage.id], False))
        run = pc.and_(active, pc.invert(hit))
    else:
        hit, run = None, active
    n_run = pc.sum(run).as_py() or 0
    if n_run or (stage.applies_to == "all" and table.num_rows):
        stage.ensure_setup()
    if table.num_rows == 0 or (n_run == 0 and hit is None):
        out = annotate_rejected(stage, table.drop_columns(cached))
    elif n_run == table.num_rows:
        out = stage.process(table.drop_columns(cached))
        _check_same_rows(stage, table, out)
        out = add_missing(out, fields)
    else:
        pieces, order = [], []
        idx_run = pc.indices_nonzero(run)
        if n_run:
            part = table.take(idx_run).drop_columns(cached)
            done = stage.process(part)
            _check_same_rows(stage, part, done)
            pieces.append(add_missing(done, fields))
            order.append(idx_run.to_numpy())
        if hit is not None and pc.any(hit).as_py():
            idx_hit = pc.indices_nonzero(hit)
            pieces.append(_from_cache(stage, table.take(idx_hit)).drop_columns(cached))
            order.append(idx_hit.to_numpy())
        idx_passive = pc.indices_nonzero(pc.invert(active))
        if len(idx_passive):
            pieces.append(annotate_rejected(stage, table.take(idx_passive).drop_columns(cached)))
            order.append(idx_passive.to_numpy())
        names = pieces[0].column_names
        merged = pa.concat_tables([p.select(names) for p in pieces], promote_options="permissive")
        out = merged.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
    if stage.applies_to != "all":
        flag = pc.fill_null(run, False)
        i = out.schema.get_field_index(COMPUTED + stage.id)
        out = out.set_column(i, COMPUTED + stage.id, flag) if i >= 0 else out.append_column(COMPUTED + stage.id, flag)
    return out


def threshold(metric: str, value: float, side: str, name: str) -> dict[str, Any]:
    """One item of :meth:`Stage.thresholds`: rows with ``metric`` below (``side="min"``) or above
    (``"max"``) ``value`` are rejected; ``name`` is the parameter (or state key) it comes from."""
    return {"metric": metric, "value": float(value), "side": side, "name": name}


def annotate_rejected(stage: "Stage", table: pa.Table) -> pa.Table:
    """Rows rejected before ``stage``: null output columns, or -- for a stage that ``applies_to`` all rows
    -- the columns ``process`` makes for them, their rejection left as it was."""
    fields = stage.output_fields()
    if stage.applies_to != "all" or table.num_rows == 0:
        return add_missing(table, fields)
    given = add_missing(table, [S.field(c) for c in stage.needs])  # e.g. no image: rejected before download
    out = add_missing(stage.process(given), fields)
    _check_same_rows(stage, given, out)
    table = add_missing(table, fields)
    for f in fields:
        table = table.set_column(table.schema.get_field_index(f.name), f, out[f.name].cast(f.type))
    return table


def _check_same_rows(stage: "Stage", before: pa.Table, after: pa.Table) -> None:
    if after.num_rows != before.num_rows or not after[S.UID].equals(before[S.UID]):
        raise StageError(
            f"stage {stage.id!r} returned {after.num_rows} rows for {before.num_rows}: "
            "a stage must return every row it is given, in order (reject, never drop)"
        )


def worker_cpus() -> int:
    """The CPUs this worker may use: its ``CPU`` allocation inside a Ray task or actor, else the CPUs
    the process may run on (its affinity mask)."""
    import os
    import sys

    ray = sys.modules.get("ray")  # only where ray is already loaded: an in-process run never imports it
    if ray is not None and ray.is_initialized():
        try:
            ctx = ray.get_runtime_context()
            if ctx.worker.mode == ray.WORKER_MODE:
                cpus = ctx.get_assigned_resources().get("CPU")
                if cpus:
                    return max(1, int(cpus))
        except Exception:  # noqa: BLE001 - an API change must not stop a stage: fall back to the affinity
            log.debug("no CPU allocation from Ray's runtime context", exc_info=True)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def release_memory() -> None:
    """Collect garbage and return cached GPU memory to the driver (when torch is already loaded)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class MapStage(Stage):
    kind: ClassVar[str] = "map"


class GlobalStage(Stage):
    """A stage that must see the whole corpus before it can decide on any row."""

    kind: ClassVar[str] = "global"

    @property
    def needs_fit(self) -> bool:
        return True

    def fit(self, ctx: FitContext) -> Any:
        """Compute the global state (bounded memory; may use ``ctx.map`` for parallelism)."""
        raise NotImplementedError

    state: Any = None

    def fit_columns(self, schema: pa.Schema) -> list[str]:
        """Columns ``fit`` reads, among the pipeline's ``schema``: the runners give ``fit`` per-shard views
        holding only these (no image bytes).  Default: the bookkeeping columns, ``needs``, every numeric
        column (scores, sizes, hashes) and columns named by a string parameter (e.g. ``column:``)."""
        named = set(self.needs) | {v for v in self.params.model_dump().values() if isinstance(v, str)}
        always = [S.UID, S.SHARD, S.SOURCE_FILE, S.SOURCE_ROW, S.REJECT_REASON, *self.needs]
        return always + [f.name for f in schema if f.name in named
                         or pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]

    def set_state(self, state: Any) -> None:
        self.state = state

    def __call__(self, table: pa.Table) -> StageResult:
        """Notebook entry point: fit on this table alone, then apply."""
        if not self.needs_fit:
            return super().__call__(table)
        t0 = time.perf_counter()
        table = prepare_for_stages(table)
        ctx = FitContext.from_table(table)
        self.set_state(self.fit(ctx))
        import pyarrow.parquet as pq

        out = self.run_batch(pq.read_table(ctx.paths[0]))  # the table as fit saw it (with a shard id)
        out = out.drop_columns([c for c in out.column_names if S.is_internal(c)])
        return StageResult(out, self.id, time.perf_counter() - t0)
