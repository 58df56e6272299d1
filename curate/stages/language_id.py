"""``language_id``: offline language identification of the caption (py3langid, model inside the package).

Writes ``language`` (ISO 639-1 code) and ``language_score`` (py3langid's normalised
probability, 0..1).  Empty or missing captions get nulls.  Optional ``candidates``
restricts the decision to a set of languages (py3langid ``set_languages``), which makes
short alt-text much less likely to be mistaken for a rare language.  The ``language``
filter thresholds these columns; this stage rejects nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)


class LanguageIdParams(StageParams):
    stage: Literal["language_id"] = "language_id"
    candidates: list[str] | None = Field(None, description="ISO 639-1 codes to choose from (default: all 97 "
                                         "languages of py3langid)")


_LOCK = threading.Lock()
_MODEL: list[Any] = []  # the decompressed py3langid model, loaded once per process


def _identifier() -> Any:
    """A py3langid identifier; the model is decompressed once per process (segments and Ray task
    workers set the stage up again).  py3langid streams its 65 MB model through a temporary file:
    it goes to /dev/shm (memory) when there is one, not to the disk."""
    import copy
    import tempfile

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    with _LOCK:
        if not _MODEL:
            old = tempfile.tempdir
            shm = "/dev/shm"
            if os.path.isdir(shm) and os.access(shm, os.W_OK):
                tempfile.tempdir = shm
            try:
                _MODEL.append(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True))
            finally:
                tempfile.tempdir = old
        return copy.copy(_MODEL[0])  # set_languages() changes an identifier: each stage gets its own


@register
class LanguageId(MapStage):
    name = "language_id"
    Params = LanguageIdParams
    needs = (S.CAPTION,)
    produces = (S.LANGUAGE, S.LANGUAGE_SCORE)
    default_resources = Resources(num_cpus=0.25, batch_size=8192)
    params: LanguageIdParams

    def setup(self) -> None:
        self._ident = _identifier()
        if self.params.candidates:
            unknown = sorted(set(self.params.candidates) - set(self._ident.nb_classes))
            if unknown:
                from curate.stage import StageError

                raise StageError(f"language_id: py3langid does not know {unknown}")
            self._ident.set_languages(self.params.candidates)

    def process(self, table: pa.Table) -> pa.Table:
        langs: list[str | None] = []
        scores: list[float | None] = []
        for caption in table[S.CAPTION].to_pylist():
            text = (caption or "").replace("\n", " ").strip()
            if not text:
                langs.append(None)
                scores.append(None)
                continue
            lang, prob = self._ident.classify(text)
            langs.append(lang)
            scores.append(float(prob))
        table = with_column(table, S.LANGUAGE, langs)
        return with_column(table, S.LANGUAGE_SCORE, scores)

    def describe(self) -> dict[str, Any]:
        return {"detector": "py3langid (normalised probabilities)", "candidates": self.params.candidates}
