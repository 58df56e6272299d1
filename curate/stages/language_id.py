"""``language_id``: offline language identification of the caption.

Backends:

* ``py3langid`` (default; its model is inside the package): ``language`` is the ISO 639-1 code,
  ``language_score`` py3langid's normalised probability (0..1).  Optional ``candidates`` restricts
  the decision to a set of languages (py3langid ``set_languages``), which makes short alt-text much
  less likely to be mistaken for a rare language.
* ``fasttext``: a fastText classifier file (``model_path``: ``lid.176.bin`` / ``lid.176.ftz``, as
  DataComp's basic filter uses it): the top-1 label without ``__label__`` and its probability, on
  the caption with newlines replaced by spaces (DataComp's rule).  Needs ``pip install
  fasttext-wheel`` (or ``fasttext``).

Empty or missing captions get nulls.  The ``language`` filter thresholds these columns; this stage
rejects nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageParams
from curate.table_ops import with_column

log = logging.getLogger(__name__)


class LanguageIdParams(StageParams):
    stage: Literal["language_id"] = "language_id"
    backend: Literal["py3langid", "fasttext"] = Field("py3langid", description="py3langid (built in) or fasttext "
                                                      "(model_path: lid.176.bin, DataComp's)")
    model_path: str | None = Field(None, description="fasttext: the classifier file (lid.176.bin / .ftz)")
    candidates: list[str] | None = Field(None, description="py3langid: ISO 639-1 codes to choose from (default: all "
                                         "97 languages of py3langid)")

    @model_validator(mode="after")
    def _backend(self) -> "LanguageIdParams":
        if self.backend == "fasttext" and not self.model_path:
            raise ValueError("backend fasttext needs model_path (lid.176.bin)")
        if self.backend == "fasttext" and self.candidates:
            raise ValueError("candidates is py3langid's: fastText decides over its own labels")
        return self


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
        if self.params.backend == "fasttext":
            self._ft = _fasttext(self.params.model_path)
            return
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
            if self.params.backend == "fasttext":
                ((prob, label),) = self._ft.f.predict(text, 1, 0.0, "replace")  # top-1, as DataComp
                lang = label.removeprefix("__label__")
            else:
                lang, prob = self._ident.classify(text)
            langs.append(lang)
            scores.append(float(prob))
        table = with_column(table, S.LANGUAGE, langs)
        return with_column(table, S.LANGUAGE_SCORE, scores)

    def describe(self) -> dict[str, Any]:
        if self.params.backend == "fasttext":
            return {"detector": f"fastText {self.params.model_path} (top-1 label)"}
        return {"detector": "py3langid (normalised probabilities)", "candidates": self.params.candidates}


def _fasttext(path: str) -> Any:
    """A fastText model (its C++ predict is called directly: the Python wrapper's predict breaks on numpy 2)."""
    from curate.stage import StageError

    try:
        import fasttext
    except ImportError:
        raise StageError("language_id backend fasttext: pip install fasttext-wheel (or fasttext)") from None
    if not os.path.isfile(path):
        raise StageError(f"language_id: fastText model {path}: no such file")
    return fasttext.FastText._FastText(model_path=path)  # load_model() minus its warning on stderr
