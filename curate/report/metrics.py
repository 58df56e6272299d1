"""What the report charts, and which config values are thresholds on it.

A metric is an SQL expression over the ``samples`` view.  Thresholds are found by name,
so filters written later are picked up without changes here: a numeric parameter of a
stage in config.resolved.yaml (or a number in its stats.json ``info``, where global
filters report the threshold they computed) whose name starts with ``min_``/``max_``
or says ``threshold``/``cutoff`` belongs to the metric its name points at.  Generic
names (``min_score``, ``threshold``) count only for the metric the stage's name points at
(``clip_score.min_score`` -> CLIP score; ``language.min_score`` and
``caption_perplexity.max_length`` -> nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from curate import schema as S


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    #: (columns needed, SQL expression); the first variant whose columns exist is used
    variants: tuple[tuple[tuple[str, ...], str], ...]
    #: words in a parameter name that tie it to this metric on their own
    strong: tuple[str, ...]
    #: words that tie it only when the stage name holds a strong word (or `anchors`)
    weak: tuple[str, ...] = ()
    anchors: tuple[str, ...] = ()
    #: side of a threshold whose name does not say min or max
    default_side: str = "min"
    #: shown only when a threshold refers to it
    only_with_threshold: bool = False
    integer: bool = False

    def expr(self, columns: set[str]) -> str | None:
        for needs, sql in self.variants:
            if set(needs) <= columns:
                return sql
        return None


METRICS: tuple[Metric, ...] = (
    Metric("clip_score", "CLIP score (cosine of image and caption embeddings)",
           (((S.CLIP_SCORE,), S.CLIP_SCORE),), strong=("clip",), weak=("score", "similarity", "cosine"),
           anchors=("clip",)),
    Metric("caption_perplexity", "Caption perplexity (lower = more fluent)",
           (((S.CAPTION_PERPLEXITY,), S.CAPTION_PERPLEXITY),), strong=("perplexity", "ppl"),
           weak=("score",), anchors=("perplexity", "ppl", "kenlm"), default_side="max"),
    Metric("image_size", "Image size: shorter side of the downloaded image (px)",
           (((S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT), f"least({S.ORIGINAL_WIDTH}, {S.ORIGINAL_HEIGHT})"),
            ((S.WIDTH, S.HEIGHT), f"least({S.WIDTH}, {S.HEIGHT})")),
           strong=("image_size", "side", "resolution"), weak=("size", "width", "height"),
           anchors=("image_size", "size", "resolution"), integer=True),
    Metric("caption_length", "Caption length (characters)",
           (((S.CAPTION,), f"length({S.CAPTION})"),), strong=("chars", "characters", "caption_length", "caption_len"),
           weak=("length", "len"), anchors=("caption", "text"), integer=True),
    Metric("caption_words", "Caption length (words)",
           (((S.CAPTION,), f"len(string_split(trim({S.CAPTION}), ' '))"),), strong=("words",),
           anchors=("caption", "text"), only_with_threshold=True, integer=True),
)
BY_KEY = {m.key: m for m in METRICS}

_GENERIC = ("min", "max", "lower", "upper", "threshold", "cutoff", "value")
_THRESHOLD = re.compile(r"^(min|max|lower|upper)_|_(min|max)$|^(min|max)$|threshold|cutoff")


@dataclass(frozen=True)
class Threshold:
    metric: str
    value: float
    side: str  # "min": rows below are rejected; "max": rows above are
    stage_id: str
    name: str  # the parameter or info key

    @property
    def label(self) -> str:
        from curate.report.charts import fmt

        op = "≥" if self.side == "min" else "≤"
        return f"{self.stage_id}: keep {op} {fmt(self.value)}"


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def _has(name: str, words: tuple[str, ...]) -> bool:
    low = name.lower()
    toks = _words(name)
    return any(("_" in w and w in low) or w in toks for w in words)


def metric_of(param: str, stage_name: str, stage_id: str) -> Metric | None:
    """The metric a threshold-like parameter of a stage refers to, if any."""
    if not _THRESHOLD.search(param.lower()):
        return None
    for m in METRICS:
        if _has(param, m.strong):
            return m
    context = f"{stage_name} {stage_id}"
    ctx = next((m for m in METRICS if _has(context, m.strong)), None) or \
        next((m for m in METRICS if _has(context, m.anchors)), None)
    if ctx is None:
        return None
    generic = not [w for w in _words(param) if w not in _GENERIC]
    return ctx if generic or _has(param, ctx.weak) else None


def _side(param: str, metric: Metric) -> str:
    p = param.lower()
    if p.startswith(("min", "lower")) or p.endswith("_min"):
        return "min"
    if p.startswith(("max", "upper")) or p.endswith("_max"):
        return "max"
    return metric.default_side


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def find_thresholds(config: dict[str, Any], stats: dict[str, Any]) -> list[Threshold]:
    """Thresholds from the config's stage parameters and the stages' reported info, de-duplicated."""
    found: dict[tuple, Threshold] = {}
    sources: list[tuple[str, str, dict]] = []
    for st in config.get("stages") or []:
        if isinstance(st, dict) and st.get("stage"):
            sources.append((st["stage"], st.get("id") or st["stage"], st))
    for st in stats.get("stages") or []:
        sources.append((st.get("stage", st["id"]), st["id"], st.get("info") or {}))
    for stage_name, stage_id, params in sources:
        for key, value in params.items():
            if key in ("stage", "id") or not _numeric(value):
                continue
            m = metric_of(key, stage_name, stage_id)
            if m is None:
                continue
            t = Threshold(m.key, float(value), _side(key, m), stage_id, key)
            found.setdefault((t.metric, round(t.value, 9), t.side, t.stage_id), t)
    return list(found.values())
