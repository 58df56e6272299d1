"""The runner interface and the per-file ingest task both runners use."""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any, Callable

from curate.config import InputConfig
from curate.ingest import ShardInfo, ingest_file
from curate.context import FitContext
from curate.io import fs
from curate.io.files import InputError, write_bytes_atomic, write_json_atomic
from curate.io.manifest import Entry, entry_change, file_entry, file_id, file_key
from curate.io.remote import input_path
from curate.layout import Layout
from curate.runners.carry import can_carry, carry_task
from curate.runners.common import SegmentJob
from curate.stage import GlobalStage

log = logging.getLogger(__name__)


def _check_unchanged(entry: Entry, when: str, storage: Any = None) -> None:
    now = file_entry(input_path(entry["path"], storage))
    if now != entry:
        raise InputError(f"{entry['path']} changed {when} ({entry_change(entry, now)}); "
                         "leave the input alone while a run reads it")


def ingest_task(args: tuple[int, Entry, InputConfig, Layout, str, Any]) -> list[dict]:
    """Ingest one input file unless a previous run already did.

    The done marker is named by the file's key (resolved path, size, mtime), not by its
    position, and holds the entry and file id it was made for (its shard ids ``FILE_ID-CCCCC``).
    """
    fid, entry, cfg, layout, compression, storage = args  # storage: the config's storage: section
    marker = layout.done("ingest") / f"{file_key(entry)}.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("file") == entry and done.get("file_id") == fid:
            return done["shards"]
        log.warning("%s: ingest marker %s was made for another file or shard naming; ingesting again",
                    entry["path"], marker.name)
    _check_unchanged(entry, "since the run started", storage)
    path = input_path(entry["path"], storage)
    shards = [s.__dict__ for s in ingest_file(fid, path, cfg, layout.ingest, compression)]
    _check_unchanged(entry, "while it was read", storage)
    write_json_atomic({"file": entry, "file_id": fid, "shards": shards}, marker)
    return shards


def restore_state(stage: GlobalStage, layout: Layout) -> bool:
    """Give ``stage`` the state a fit saved before (resume, or a segment done by an earlier run)."""
    state_file = layout.state_file(stage.id)
    if not state_file.exists():
        return False
    stage.set_state(pickle.loads(state_file.read_bytes()))
    return True


class Runner:
    kind = "base"
    parallelism = 1

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: list[Any], num_cpus: float = 1.0,
            num_gpus: float = 0.0) -> list[Any]:
        """``[fn(x) for x in items]``; a distributed runner runs them as tasks of these resources."""
        return [fn(x) for x in items]

    def ingest(self, files: list[Entry], cfg: InputConfig, layout: Layout, compression: str,
               storage: Any = None) -> list[ShardInfo]:
        """Ingest the input manifest's files (a digest of a file's path is its shard id prefix)."""
        ids = [file_id(f, cfg.path) for f in files]
        seen: dict[str, str] = {}
        for f, i in zip(files, ids):
            if seen.setdefault(i, f["path"]) != f["path"]:
                raise InputError(f"input files {seen[i]} and {f['path']} share the shard id prefix {i}: rename one")
        jobs = [(i, f, cfg, layout, compression, storage) for i, f in zip(ids, files)]
        out: list[ShardInfo] = []
        for shards in self.map(ingest_task, jobs):
            out.extend(ShardInfo(**s) for s in shards)
        return out

    def fit(self, stage: GlobalStage, inputs: dict[str, str], rows: int, layout: Layout) -> None:
        """Fit a global stage on its inputs (a view or ingest file per shard; ``rows`` live rows in all)
        with this runner's ``map``, and persist its state: a state already saved is loaded instead (resume)."""
        if restore_state(stage, layout):
            return
        state_file = layout.state_file(stage.id)
        fs.makedirs(state_file.parent)
        ctx = FitContext(sorted(inputs.values()), state_file.parent, self, self.parallelism, rows)
        t0 = time.perf_counter()
        stage.set_state(stage.fit(ctx))
        write_bytes_atomic(pickle.dumps(stage.state), state_file)
        write_json_atomic({stage.id: time.perf_counter() - t0}, layout.timing / f"fit-{stage.id}.json")

    def carry(self, job: SegmentJob) -> list[dict[str, Any]]:
        """Carry the shards of ``job.inputs`` whose group of a redone segment is the previous generation's
        unchanged (:mod:`curate.runners.carry`), in chunks run by this runner's ``map``; their done-marker infos."""
        shards = list(job.inputs)
        if not shards or not can_carry(job):  # no task is started for a segment done for the first time
            return []
        light = job.light()
        light.inputs, light.expected_rows = job.inputs, job.expected_rows
        n = max(1, min(len(shards), 4 * self.parallelism))
        chunks = [shards[i::n] for i in range(n)]
        done = self.map(carry_task, [(light, job.segment.head, chunk) for chunk in chunks])
        return [info for infos in done for info in infos]

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        """Run the segment's stages over ``job.inputs`` and finish every shard; returns seconds per stage."""
        raise NotImplementedError
