"""The in-process runner: no Ray, shard after shard (notebooks, unit tests, laptops)."""

from __future__ import annotations

from curate.config import RunnerConfig
from curate.progress import progress
from curate.runners.base import Runner
from curate.runners.common import SegmentJob, run_shard
from curate.stage import release_memory


class LocalRunner(Runner):
    kind = "local"

    def __init__(self, cfg: RunnerConfig | None = None) -> None:
        self.cfg = cfg

    def run_segment(self, job: SegmentJob) -> dict[str, float]:
        """Seconds are recorded per shard in its done marker (stats add them up), so nothing is returned.

        A stage is set up on the first rows it runs on (not at all when the row cache holds every result)
        and torn down when the segment ends, so the models of different segments (CLIP, the language model,
        the captioner) are never loaded together.
        """
        stages = job.segment.stages
        names = " → ".join(s.id for s in stages) or "write"
        try:
            with progress(f"segment {job.segment.index}: {names}", total=len(job.inputs), unit="shard") as bar:
                for shard in job.inputs:
                    run_shard(job, shard, stages)
                    bar.advance(1)
        finally:
            torn = [st for st in stages if st.ensure_teardown(release=False)]
            if any(st.resources.stateful for st in torn):  # a model was loaded: free it (once for the segment;
                release_memory()  # a full collection costs ~0.3 s, not worth it for hashes and filters)
        return {}
