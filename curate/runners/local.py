"""The in-process runner: no Ray, shard after shard (notebooks, unit tests, laptops)."""

from __future__ import annotations

import logging

from curate.config import RunnerConfig
from curate.progress import progress
from curate.runners.base import Runner
from curate.runners.common import SegmentJob, finish_shard, read_shard, run_stage_local

log = logging.getLogger(__name__)


class LocalRunner(Runner):
    kind = "local"

    def __init__(self, cfg: RunnerConfig | None = None) -> None:
        self.cfg = cfg

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        """Seconds are recorded per shard in its done marker, so nothing is returned."""
        timing: dict[str, float] = {}
        for st in job.segment.stages:
            st.ensure_setup()
        names = " → ".join(s.id for s in job.segment.stages) or "write"
        with progress(f"segment {job.segment.index}: {names}", total=len(job.inputs), unit="shard") as bar:
            for shard, path in job.inputs.items():
                table = read_shard(path)
                shard_timing: dict[str, float] = {}
                for st in job.segment.stages:
                    table = run_stage_local(st, table, shard_timing)
                finish_shard(job, shard, table, shard_timing)
                for k, v in shard_timing.items():
                    timing[k] = timing.get(k, 0.0) + v
                bar.advance(1)
        log.debug("segment %d seconds: %s", job.segment.index, timing)
        return {}
