"""Where things live under ``output.path``.

``root`` is a local ``Path`` or, for an output on object storage, a ``UPath`` (``s3://...``): the
deliverables (``data/``, ``rejected/``, ``stats.json``, the report, the resolved config) go there.
The work folder (intermediate shards, fit views, done markers, global states) is ``root/_work`` -- on object
storage too, so every node of a cluster that shares only a bucket sees the same work -- or ``work_dir``
(``output.work_path``: a local folder or a URI).  Its paths are local ``Path``s or ``UPath``s alike (read and
written through :mod:`curate.io.fs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    root: Any  # Path | UPath
    work_dir: Any = None  # Path | UPath | None
    #: the generation of each segment's column groups in this run (see curate.runners.flow): a segment redone
    #: for a changed fit, an append or a retry writes a new generation and reads the older one as its row cache
    gens: tuple[int, ...] = ()

    def gen(self, k: int) -> int:
        return self.gens[k] if k < len(self.gens) else 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def work(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.root / "_work"

    @property
    def run_file(self) -> Path:
        return self.work / "run.json"

    @property
    def input_manifest(self) -> Path:
        """The input files (path, size, mtime_ns) the run reads; see ``curate.io.manifest``."""
        return self.work / "input_manifest.json"

    @property
    def ingest(self) -> Path:
        return self.work / "ingest"

    @property
    def timing(self) -> Path:
        return self.work / "timing"

    def segment_out(self, k: int) -> Path:
        return self.work / f"seg-{k}"

    def parts(self, k: int) -> Path:
        return self.work / f"parts-{k}"

    def done(self, name: str) -> Path:
        return self.work / "done" / name

    def state(self, stage_id: str) -> Path:
        return self.work / "state" / stage_id

    def state_file(self, stage_id: str) -> Path:
        """A global stage's fitted state (pickled), the resume point of its fit."""
        return self.state(stage_id) / "state.pkl"
