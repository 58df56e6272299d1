"""What a global stage's ``fit`` gets: where its input shards are, and how to run things in parallel."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa

log = logging.getLogger(__name__)


def ray_map(fn: Callable[[Any], Any], items: list[Any], num_cpus: float = 1.0, num_gpus: float = 0.0) -> list[Any]:
    """``[fn(x) for x in items]`` as Ray tasks (order kept; Ray already initialised).  Even a lone item
    runs as a task: the driver only coordinates, so its memory does not grow with the corpus.  The Ray
    runner's ``map``, and ``FitContext.map`` of a context made with ``runner="ray"``."""
    import ray

    if not items:
        return []
    from curate.io import fs

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, **fs.ray_env())(fn)
    return ray.get([remote.remote(x) for x in items])


@dataclass
class FitContext:
    #: parquet files holding every row (rejected ones too) that reaches the stage
    paths: list[str]
    #: a directory private to this stage where it may write its state (kept for resume): a local ``Path`` or
    #: a ``UPath`` on object storage (read and write it with :mod:`curate.io.fs`; tasks get ``str(path)``
    #: and turn it back with ``fs.as_path``)
    work_dir: Any
    #: the runner that runs ``map`` (a ``Runner``: the runners pass themselves), or its kind for a context
    #: made without one (notebooks, tests): "local" (in this process) / "ray" (Ray already initialised)
    runner: Any = "local"
    #: how many tasks the runner can run at once
    parallelism: int = 1
    #: total rows in ``paths``
    total_rows: int | None = None
    _keep: list[Any] = field(default_factory=list, repr=False)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], num_cpus: float = 1.0,
            num_gpus: float = 0.0) -> list[Any]:
        """``[fn(x) for x in items]`` by the runner's ``map``: Ray tasks under the Ray runner (order kept).

        Under Ray even a lone item runs as a task: the driver only coordinates, so its memory does
        not grow with the corpus."""
        items = list(items)
        if not isinstance(self.runner, str):
            return self.runner.map(fn, items, num_cpus=num_cpus, num_gpus=num_gpus)
        if self.runner != "ray":
            return [fn(x) for x in items]
        return ray_map(fn, items, num_cpus=num_cpus, num_gpus=num_gpus)

    @property
    def kind(self) -> str:
        """The runner's kind: "local" or "ray"."""
        return self.runner if isinstance(self.runner, str) else self.runner.kind

    @classmethod
    def from_table(cls, table: pa.Table) -> "FitContext":
        """For notebooks: a context over one in-memory table (written to a temp file)."""
        import pyarrow.parquet as pq

        from curate import schema as S

        tmp = tempfile.TemporaryDirectory(prefix="curate-fit-")
        if S.SHARD not in table.column_names:
            table = table.append_column(S.SHARD, pa.array(["notebook"] * table.num_rows, pa.string()))
        path = Path(tmp.name) / "table.parquet"
        pq.write_table(table, path)
        ctx = cls([str(path)], Path(tmp.name) / "state", total_rows=table.num_rows)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        ctx._keep.append(tmp)
        return ctx
