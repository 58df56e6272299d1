"""What a rows page of ``curate serve`` shows and how it is filtered: the views, the card columns, :class:`Filter`.

A page shows one view (``kept``: ``data/``, or ``rejected``: ``rejected/``), up to PAGE_MAX rows, each as a
card of CARD_COLUMNS (those the files have).  A :class:`Filter` is what the page's form asks for (reject
reason, stage, a range of a numeric column, an SQL condition), rendered as SQL with bound parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curate import schema as S
from curate.io.files import InputError
from curate.io.sql import sql_string

VIEWS = ("kept", "rejected")
PAGE_MAX = 200
NUMERIC = ("FLOAT", "DOUBLE", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "UINTEGER", "UBIGINT", "DECIMAL")
CARD_COLUMNS = (S.UID, S.CAPTION, S.URL, S.CLIP_SCORE, S.CAPTION_PERPLEXITY, S.WIDTH, S.HEIGHT, S.REJECT_REASON,
                S.REJECT_STAGE, S.REJECT_DETAIL, S.DUPLICATE_OF, S.DUPLICATE_KIND, S.LANGUAGE, S.RECAPTION)


@dataclass
class Filter:
    """The filters of a rows page; ``where()`` renders them as SQL (values bound or quoted)."""
    reason: str = ""
    stage: str = ""
    metric: str = ""
    lo: float | None = None
    hi: float | None = None
    where: str = ""
    columns: list[str] = field(default_factory=list)

    def parts(self) -> tuple[list[str], dict[str, Any]]:
        sql, params = [], {}
        if self.reason:
            sql.append(f"{S.REJECT_REASON} = $reason")
            params["reason"] = self.reason
        if self.stage:
            sql.append(f"{S.REJECT_STAGE} = $stage")
            params["stage"] = self.stage
        if self.metric and (self.lo is not None or self.hi is not None):
            if self.metric not in self.columns:
                raise InputError(f"no numeric column {self.metric[:80]!r}")
            if self.lo is not None:
                sql.append(f'"{self.metric}" >= $lo')
                params["lo"] = float(self.lo)
            if self.hi is not None:
                sql.append(f'"{self.metric}" <= $hi')
                params["hi"] = float(self.hi)
        if self.where.strip():
            sql.append(f"({self.where})")
        return sql, params

    def literal(self) -> str:
        """The same condition with literal values (for refilter/export, which take an SQL string)."""
        sql, params = self.parts()
        text = " AND ".join(sql) or "true"
        for k, v in params.items():
            text = text.replace(f"${k}", repr(float(v)) if isinstance(v, float) else sql_string(v))
        return text
