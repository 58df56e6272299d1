"""Corpus-wide deduplication: the machinery behind the ``dedup_exact``, ``dedup_phash`` and
``dedup_semantic`` stages (``curate/stages/dedup_*.py``) and the ``phash`` scoring stage.

Design (the stage modules document their own parameters and defaults):

* **Global, bounded.**  Every dedup stage is a ``GlobalStage``.  ``fit`` never holds the
  corpus in one process: rows are hash-partitioned (a DuckDB shuffle for keys and hashes,
  k-means clusters for embeddings, connected components for the pHash graph) and every
  partition / cluster bucket is one ``ctx.map`` item, i.e. one Ray task
  under the Ray runner -- even a lone item, so the driver only coordinates -- and a loop on the
  local runner.  Partition counts grow with the corpus (``rows_per_partition``), so a task's
  memory does not.
* **Decisions on disk.**  What ``fit`` decides is written as small parquet files in the
  stage's ``work_dir``, one file per bucket of work shards, sorted by shard
  (:mod:`curate.dedup.store`).  ``fit`` returns only their location; ``process`` reads the
  one file holding its batch's shards.  Only removed rows are written.
* **One row kept per group** (:mod:`curate.dedup.greedy`).  Exact duplicates form true
  equivalence classes: the best row by the keep rule stays.  Near-duplicate relations are
  not transitive (A~B, B~C, A!~C), so connected components would chain unrelated images
  together; instead rows are visited best-first (keep rule: highest ``clip_score``, largest
  image, or smallest uid; ties always broken by the smallest uid) and a row is removed iff it
  is a near-duplicate of a better row that was *kept*.  ``duplicate_of`` names the most
  similar such kept row, so every removed row is a direct near-duplicate of the row it names
  and every group (a kept row and the rows naming it) keeps its best member.
  ``dedup_semantic`` also offers ``mode: semdedup``, the SemDeDup paper's rule.
* **Deterministic.**  Every order used is a function of the data (keep-rule values, uid,
  input position), never of shard layout, task count or thread count.  Float similarities
  are searched in bf16 or float32 (torch on the CPU, FAISS on a GPU) with a safety margin that
  bounds their rounding error, and every decision is then re-checked in float64 on the CPU, so
  CPU and GPU give the same decisions.

A row rejected by one dedup stage points at the row that stage kept; a later stage (or
filter) may reject that kept row in turn, in which case ``duplicate_of`` chains can be
followed through ``rejected/``.
"""
