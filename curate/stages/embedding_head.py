"""``embedding_head``: a small trained head (linear or MLP) on the CLIP embeddings, one score column.

The head reads ``image_embedding`` (``input: image``), ``text_embedding`` (``text``) or both
concatenated (``image+text``), L2-normalised first (``normalize``, as the heads below were trained),
and writes one float32 column (``column``).  Rows without the embedding get a null score.  Weights
come from a ``.safetensors`` file or a ``torch.save``'d state dict (read with
``torch.load(weights_only=True)``; a Lightning checkpoint's ``state_dict`` is unwrapped).

Architectures (``preset``):

* ``laion_aesthetic``: the LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
  ``simple_inference.py``): ``nn.Sequential`` of Linear(d, 1024), Dropout(0.2), Linear(1024, 128),
  Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) under ``layers``, no
  activation between the linear layers, raw output (a 1-10 rating), on L2-normalised ViT-L/14 image
  embeddings (d = 768).  Its released ``sac+logos+ava1-l14-linearMSE.pth`` loads as is; the
  LAION-Aesthetics subsets keep ``aesthetic_score`` >= 4.5, 5, 6 or 6.5.
* ``mlp`` / ``linear``: ``layers`` = Linear(d, h1), act, [Dropout], Linear(h1, h2), act, ...,
  Linear(hk, 1) (``hidden: [h1, ..., hk]``; ``linear``: none), ``activation`` relu / gelu / none,
  ``dropout`` one rate per hidden layer (a Dropout module only where the rate is > 0, so the keys
  match a training code that had one), ``output`` sigmoid (a probability: ``punsafe``,
  ``pwatermark`` as in LAION-5B) or raw.

The input size comes from the weights.  Dropout layers do nothing at inference; they are kept so that
the state dict's keys (``layers.N.weight``) are those of the training code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import schema as S
from curate.registry import register
from curate.stage import MapStage, Resources, StageError, StageParams

log = logging.getLogger(__name__)

#: preset -> (hidden sizes, dropout after each hidden linear layer, activation, output, default column)
PRESETS: dict[str, tuple[list[int], list[float], str, str, str]] = {
    "laion_aesthetic": ([1024, 128, 64, 16], [0.2, 0.2, 0.1, 0.0], "none", "raw", S.AESTHETIC_SCORE),
}
_INPUTS = {"image": (S.IMAGE_EMBEDDING,), "text": (S.TEXT_EMBEDDING,),
           "image+text": (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING)}


class EmbeddingHeadParams(StageParams):
    stage: Literal["embedding_head"] = "embedding_head"
    weights: str = Field(description="the head's weights: .safetensors, or a torch.save'd state dict (.pt/.pth)")
    preset: Literal["laion_aesthetic", "mlp", "linear"] = Field(
        "mlp", description="laion_aesthetic: LAION's aesthetic predictor; mlp/linear: described by hidden, "
                           "activation, output")
    column: str | None = Field(None, description="the score column (default: aesthetic_score for laion_aesthetic)")
    input: Literal["image", "text", "image+text"] = Field("image", description="which embedding(s) the head reads")
    hidden: list[int] = Field(default_factory=list, description="mlp: hidden layer sizes")
    activation: Literal["relu", "gelu", "none"] = Field("relu", description="mlp: between the linear layers")
    dropout: list[float] = Field(default_factory=list, description="mlp: dropout rate after each hidden layer "
                                 "(inactive at inference; places the modules as the training code did)")
    output: Literal["raw", "sigmoid"] = Field("raw", description="sigmoid: a probability")
    normalize: bool = Field(True, description="L2-normalise the embedding before the head")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingHeadParams":
        if self.preset in PRESETS and (self.hidden or self.dropout or self.output != "raw" or self.activation != "relu"):
            raise ValueError(f"preset {self.preset} fixes the architecture: leave hidden, dropout, activation, "
                             "output out")
        if self.dropout and len(self.dropout) != len(self.hidden):
            raise ValueError("dropout: one rate per hidden layer")
        if self.preset == "linear" and self.hidden:
            raise ValueError("preset linear has no hidden layers")
        if self.column is None and self.preset not in PRESETS:
            raise ValueError("name the score column (column: punsafe, pwatermark, ...)")
        name = self.score_column
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
            raise ValueError(f"column {name!r}: lower-case letters, digits and _ only")
        known = S.COLUMNS.get(name)
        if known is not None and known.type != pa.float32():
            raise ValueError(f"column {name!r} is curate's {known.type} column, not a score")
        return self

    @property
    def score_column(self) -> str:
        return self.column or PRESETS[self.preset][4]


def build_head(preset: str, in_dim: int, hidden: list[int], activation: str,
               dropout: list[float] | None = None) -> Any:
    """The head as a torch module whose ``layers`` match the training code's state-dict keys."""
    import torch.nn as nn

    if preset in PRESETS:
        sizes, dropouts, activation, _, _ = PRESETS[preset]
    else:
        sizes, dropouts = list(hidden), list(dropout or [0.0] * len(hidden))
    act = {"relu": nn.ReLU, "gelu": nn.GELU}.get(activation)
    mods: list[Any] = []
    prev = in_dim
    for h, p in zip(sizes, dropouts):
        mods.append(nn.Linear(prev, h))
        if act is not None:
            mods.append(act())
        if p:
            mods.append(nn.Dropout(p))
        prev = h
    mods.append(nn.Linear(prev, 1))
    head = nn.Module()
    head.layers = nn.Sequential(*mods)
    return head


def load_state(path: str) -> dict[str, Any]:
    """A state dict from .safetensors or a torch.save'd file (weights only, never pickled code)."""
    p = Path(path)
    if not p.is_file():
        raise StageError(f"embedding_head: weights {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    import torch

    import pickle

    save = "save the weights alone: torch.save(model.state_dict(), PATH) or safetensors"
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's multi-line message: a class a weights-only load refuses
        raise StageError(f"embedding_head: {path} is a pickled object (a whole module?), not a state dict: "
                         f"{save}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise StageError(f"embedding_head: {path} is not a torch.save file ({' '.join(str(e).split())[:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StageError(f"embedding_head: {path} holds a {type(state).__name__}, not a state dict: {save}")
    return state


def _linear_shapes(in_dim: int, sizes: list[int]) -> str:
    dims = [in_dim, *sizes, 1]
    return " -> ".join(f"{a}x{b}" for a, b in zip(dims, dims[1:]))


def _found_shapes(state: dict[str, Any]) -> str:
    """The file's 2-d weights in layer order, as in x out (what a Linear layer of that key would be)."""
    import re

    found = []
    for key, v in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.weight", key)
        if m and getattr(v, "ndim", 0) == 2:
            found.append((int(m.group(1)), f"{int(v.shape[1])}x{int(v.shape[0])}"))
    other = [k for k in state if not re.fullmatch(r"layers\.\d+\.(weight|bias)", k)]
    text = " -> ".join(shape for _, shape in sorted(found)) or "no layers.N.weight"
    return text + (f" (and keys {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})" if other else "")


@register
class EmbeddingHead(MapStage):
    name = "embedding_head"
    Params = EmbeddingHeadParams
    default_resources = Resources(num_cpus=1.0, batch_size=16384, stateful=True)
    params: EmbeddingHeadParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs = _INPUTS[self.params.input]

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.params.score_column, pa.float32())]

    def setup(self) -> None:
        import torch

        p = self.params
        state = load_state(p.weights)
        first = state.get("layers.0.weight")
        if first is None or first.ndim != 2:
            raise StageError(f"embedding_head: {p.weights} has no layers.0.weight (keys: {sorted(state)[:6]})")
        head = build_head(p.preset, int(first.shape[1]), p.hidden, p.activation, p.dropout)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError:
            sizes = PRESETS[p.preset][0] if p.preset in PRESETS else p.hidden
            raise StageError(f"embedding_head: {p.weights} does not fit preset {p.preset}: expected Linear layers "
                             f"{_linear_shapes(int(first.shape[1]), sizes)} (in x out), found "
                             f"{_found_shapes(state)}") from None
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        self.head = head.to(self.device).eval()
        self.in_dim = int(first.shape[1])
        self.sigmoid = PRESETS[p.preset][3] == "sigmoid" if p.preset in PRESETS else p.output == "sigmoid"

    def _inputs(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(float32 input matrix of the rows that have every embedding, their positions)."""
        from curate.dedup.vectors import matrix

        cols = [table[c] for c in self.needs]
        ok = pc.and_kleene(*(pc.is_valid(c) for c in cols)) if len(cols) > 1 else pc.is_valid(cols[0])
        idx = pc.indices_nonzero(ok)
        parts = []
        for c in cols:
            x = matrix(c.take(idx)).astype(np.float32) if len(idx) else np.zeros((0, 0), np.float32)
            if self.params.normalize and len(x):
                n = np.linalg.norm(x, axis=1, keepdims=True)
                x = np.divide(x, n, out=np.zeros_like(x), where=n > 0)
            parts.append(x)
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return x, idx.to_numpy()

    def process(self, table: pa.Table) -> pa.Table:
        import torch

        x, idx = self._inputs(table)
        scores = np.full(table.num_rows, np.nan, np.float32)
        if len(idx):
            if x.shape[1] != self.in_dim:
                raise StageError(f"embedding_head: the head takes {self.in_dim} inputs, the {self.params.input} "
                                 f"embedding has {x.shape[1]} (a head for another CLIP model?)")
            with torch.inference_mode():
                y = self.head.layers(torch.from_numpy(x).to(self.device)).squeeze(1)
                if self.sigmoid:
                    y = torch.sigmoid(y)
            scores[idx] = y.float().cpu().numpy()
        col = pa.array(scores, pa.float32(), mask=np.isnan(scores))
        name = self.params.score_column
        if name in table.column_names:
            return table.set_column(table.schema.get_field_index(name), pa.field(name, pa.float32()), col)
        return table.append_column(pa.field(name, pa.float32()), col)

    def describe(self) -> dict[str, Any]:
        p = self.params
        return {"weights": p.weights, "preset": p.preset, "input": p.input, "column": p.score_column,
                **({"device": self.device} if getattr(self, "device", None) else {})}
