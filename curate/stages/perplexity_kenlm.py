"""KenLM backend of ``caption_perplexity``: perplexity exactly as CCNet computes it.

CCNet (Wenzek et al. 2020, ``cc_net/mine.py`` + ``cc_net/perplexity.py``) scores a
document in three steps, reproduced here:

1. ``normalize`` the whole text (``cc_net/text_normalizer.normalize`` with its
   defaults): strip, lower-case, strip accents (NFD, drop category ``Mn``), every
   Unicode digit -> ``0``, map Unicode punctuation to ASCII (``UNICODE_PUNCT``),
   delete control characters U+0000-U+001F and U+007F-U+009F.  Note that the newline
   is one of them, so a multi-line text becomes one line (words either side of a
   newline are joined, as in CCNet).
2. Tokenise with the language's SentencePiece model (``{lang}.sp.model``) when one
   is given, joining the pieces with single spaces; otherwise the LM's tokens are
   the whitespace-separated words of the normalised text.
3. For each line of the result (CCNet splits on ``\\n``; after step 1 there is one):
   ``log_score += model.score(line)`` -- KenLM's total **log10** probability of the
   line with ``<s>`` and ``</s>`` (bos=True, eos=True) -- and
   ``length += len(line.split()) + 1`` (the ``+ 1`` counts ``</s>``).

   perplexity = 10 ** (-log_score / length)

CCNet stores ``round(perplexity, 1)``; curate keeps the unrounded value (float32).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# cc_net/text_normalizer.py: UNICODE_PUNCT (same table, same order)
UNICODE_PUNCT = {
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"', "」": '"',
    "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!", "（": "(",
    "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'", "…": "...", "━": "-",
    "〈": "<", "〉": ">", "【": "[", "】": "]", "％": "%", "►": "-",
}
_NON_PRINTING = re.compile("[" + "".join(map(chr, list(range(0, 32)) + list(range(127, 160)))) + "]")
_DIGIT = re.compile(r"\d")


def ccnet_normalize(line: str, accent: bool = True, case: bool = True, numbers: bool = True) -> str:
    """``cc_net.text_normalizer.normalize(line)`` with ``punct=1`` (its default)."""
    line = line.strip()
    if not line:
        return line
    if case:
        line = line.lower()
    if accent:
        nfd = unicodedata.normalize("NFD", line)
        line = "".join(c for c in nfd if unicodedata.category(c) != "Mn")
    if numbers:
        line = _DIGIT.sub("0", line)
    line = "".join(UNICODE_PUNCT.get(c, c) for c in line)
    return _NON_PRINTING.sub("", line)


def ccnet_perplexity(log10_score: float, length: int) -> float:
    """``cc_net.perplexity.pp``: 10 ** (-sum of log10 probabilities / (tokens + end-of-line markers))."""
    return 10.0 ** (-log10_score / length)


class KenLMScorer:
    """Scores texts with a KenLM model (ARPA or binary) the CCNet way."""

    def __init__(self, model_path: str, sp_model: str | None = None, normalize: bool = True) -> None:
        try:
            import kenlm
        except ImportError as e:  # pragma: no cover - kenlm is a dependency
            raise RuntimeError("backend kenlm needs the `kenlm` package (pip install kenlm)") from e
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"KenLM model {model_path!r} does not exist (ARPA or KenLM binary file)")
        self.model_path = str(path)
        self.model = kenlm.Model(self.model_path)
        self.normalize = normalize
        self.sp = None
        self.sp_model = sp_model
        if sp_model:
            try:
                import sentencepiece
            except ImportError as e:  # pragma: no cover - sentencepiece is a dependency
                raise RuntimeError("sp_model needs the `sentencepiece` package") from e
            if not Path(sp_model).expanduser().is_file():
                raise FileNotFoundError(f"SentencePiece model {sp_model!r} does not exist")
            self.sp = sentencepiece.SentencePieceProcessor()
            self.sp.load(str(Path(sp_model).expanduser()))
        log.info("KenLM %d-gram model %s loaded%s", self.model.order, self.model_path,
                 f" with SentencePiece {sp_model}" if sp_model else "")

    def prepare(self, text: str) -> str:
        """Steps 1-2: the exact string whose lines KenLM scores."""
        if self.normalize:
            text = ccnet_normalize(text)
        if self.sp is not None:
            text = " ".join(self.sp.encode_as_pieces(text))
        return text

    def score_one(self, text: str) -> float | None:
        """CCNet perplexity of ``text``; None when nothing is left to score."""
        prepared = self.prepare(text)
        if not prepared.strip():
            return None
        log_score, length = 0.0, 0
        for line in prepared.split("\n"):
            log_score += self.model.score(line, bos=True, eos=True)
            length += len(line.split()) + 1
        return ccnet_perplexity(log_score, length)

    def score(self, texts: list[str]) -> list[float | None]:
        return [self.score_one(t) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"order": self.model.order}
