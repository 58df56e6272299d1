"""The in-process runner: no Ray, shard after shard (notebooks, unit tests, laptops)."""

from __future__ import annotations

from curate.config import RunnerConfig
from curate.progress import progress
from curate.runners.base import Runner
from curate.runners.common import SegmentJob, run_shard


class LocalRunner(Runner):
    kind = "local"

    def __init__(self, cfg: RunnerConfig | None = None) -> None:
        self.cfg = cfg

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        """Seconds are recorded per shard in its done marker (stats add them up), so nothing is returned.

        The segment's stages are set up when it starts and torn down when it ends, so the models
        of different segments (CLIP, the language model, the captioner) are never loaded together.
        """
        stages = job.segment.stages
        names = " → ".join(s.id for s in stages) or "write"
        try:
            for st in stages:
                st.ensure_setup()
            with progress(f"segment {job.segment.index}: {names}", total=len(job.inputs), unit="shard") as bar:
                for shard in job.inputs:
                    run_shard(job, shard, stages)
                    bar.advance(1)
        finally:
            for st in stages:
                st.ensure_teardown()
        return {}
