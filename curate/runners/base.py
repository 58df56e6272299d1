"""The runner interface and the per-file ingest task both runners use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from curate.config import InputConfig
from curate.ingest import ShardInfo, ingest_file
from curate.io.files import write_json_atomic
from curate.layout import Layout
from curate.runners.common import SegmentJob


def ingest_task(args: tuple[int, str, InputConfig, str, str]) -> list[dict]:
    """Ingest one input file unless a previous run already did (its done marker)."""
    index, path, cfg, root, compression = args
    layout = Layout(Path(root))
    marker = layout.done("ingest") / f"{index:05d}.json"
    if marker.exists():
        return json.loads(marker.read_text())["shards"]
    shards = [s.__dict__ for s in ingest_file(index, Path(path), cfg, layout.ingest, compression)]
    write_json_atomic({"file": path, "shards": shards}, marker)
    return shards


class Runner:
    kind = "base"
    parallelism = 1

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        return [fn(x) for x in items]

    def ingest(self, files: list[Path], cfg: InputConfig, layout: Layout, compression: str) -> list[ShardInfo]:
        jobs = [(i, str(f), cfg, str(layout.root), compression) for i, f in enumerate(files)]
        out: list[ShardInfo] = []
        for shards in self.map(ingest_task, jobs):
            out.extend(ShardInfo(**s) for s in shards)
        return out

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        """Run the segment's stages over ``job.inputs`` and finish every shard; returns seconds per stage."""
        raise NotImplementedError
