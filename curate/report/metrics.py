"""What the report charts, and the thresholds drawn on it.

A metric is an SQL expression over the ``samples`` view.  The thresholds are the ones the stages
declare (``Stage.thresholds()``: metric key, value, side), saved per stage in stats.json; a stats.json
without them (written by hand, or by an older curate) gets them from the stages of
config.resolved.yaml, by parameters only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate import schema as S


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    #: (columns needed, SQL expression); the first variant whose columns exist is used
    variants: tuple[tuple[tuple[str, ...], str], ...]
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
           (((S.CLIP_SCORE,), S.CLIP_SCORE),)),
    Metric("caption_perplexity", "Caption perplexity (lower = more fluent)",
           (((S.CAPTION_PERPLEXITY,), S.CAPTION_PERPLEXITY),)),
    Metric("image_size", "Image size: shorter side of the downloaded image (px)",
           (((S.ORIGINAL_WIDTH, S.ORIGINAL_HEIGHT), f"least({S.ORIGINAL_WIDTH}, {S.ORIGINAL_HEIGHT})"),
            ((S.WIDTH, S.HEIGHT), f"least({S.WIDTH}, {S.HEIGHT})")), integer=True),
    Metric("caption_length", "Caption length (characters)",
           (((S.CAPTION,), f"length({S.CAPTION})"),), integer=True),
    Metric("aesthetic_score", "Aesthetic score (LAION aesthetic predictor)",
           (((S.AESTHETIC_SCORE,), S.AESTHETIC_SCORE),)),
    Metric("punsafe", "punsafe: probability the image is unsafe", (((S.PUNSAFE,), S.PUNSAFE),)),
    Metric("pwatermark", "pwatermark: probability of a watermark", (((S.PWATERMARK,), S.PWATERMARK),)),
    Metric("caption_words", "Caption length (words)",
           (((S.CAPTION,), f"len(string_split(trim({S.CAPTION}), ' '))"),), only_with_threshold=True, integer=True),
)
BY_KEY = {m.key: m for m in METRICS}


def score_metrics(stats: dict[str, Any], thresholds: list["Threshold"], columns: set[str]) -> list[Metric]:
    """Charts of score columns METRICS does not name: the columns of embedding_head stages (stats
    ``info.column``) and of declared thresholds, when the output holds them."""
    names = {(st.get("info") or {}).get("column") for st in stats.get("stages") or [] if st.get("stage") == "embedding_head"}
    names |= {t.metric for t in thresholds}
    return [Metric(c, c, (((c,), '"' + c + '"'),)) for c in sorted(n for n in names if n and n not in BY_KEY and n in columns)]


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


def find_thresholds(config: dict[str, Any], stats: dict[str, Any]) -> list[Threshold]:
    """The thresholds the stages declared (stats.json), else those of the config's stages."""
    from curate import registry

    declared: dict[str, list[dict[str, Any]]] = {st["id"]: st["thresholds"] for st in stats.get("stages") or []
                                                 if "thresholds" in st}
    for params in config.get("stages") or []:
        if not isinstance(params, dict) or not params.get("stage"):
            continue
        sid = params.get("id") or params["stage"]
        if sid not in declared:
            try:
                declared[sid] = registry.create(params).thresholds()
            except Exception:  # noqa: BLE001 - an unknown or invalid stage in an old config: nothing to draw
                declared[sid] = []
    found: dict[tuple, Threshold] = {}
    for sid, items in declared.items():
        for t in items:
            th = Threshold(t["metric"], float(t["value"]), t["side"], sid, t["name"])
            found.setdefault((th.metric, round(th.value, 9), th.side, th.stage_id), th)
    return list(found.values())
