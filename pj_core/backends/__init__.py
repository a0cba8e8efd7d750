"""Model backends: loading a model and running its forwards with KV caches.

:mod:`pj_core.backends.protocol` says what the decoding needs of a model (``Backend`` and
``Rows``); :mod:`pj_core.backends.hf.backend` implements it over transformers and
:mod:`pj_core.backends.llamacpp.backend` over llama.cpp (GGUF files as they are).
"""

from __future__ import annotations

from typing import Literal

from pj_core.errors import InvalidModelOptionError

BackendName = Literal["transformers", "llama.cpp"]
BACKENDS: tuple[BackendName, ...] = ("transformers", "llama.cpp")
"""The backends a model can be loaded on (``load_model(spec, backend=...)``)."""

_SPELLINGS: dict[str, BackendName] = {
    "transformers": "transformers",
    "hf": "transformers",
    "torch": "transformers",
    "llama.cpp": "llama.cpp",
    "llamacpp": "llama.cpp",
    "llama-cpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
}


def backend_name(name: str | None) -> BackendName:
    """The canonical name of a backend (``None``: ``"transformers"``).

    Raises:
        InvalidModelOptionError: not a backend; the message lists them.

    Example:
        >>> backend_name("llamacpp"), backend_name(None)
        ('llama.cpp', 'transformers')
    """
    if name is None:
        return "transformers"
    found = _SPELLINGS.get(str(name).strip().lower()) if isinstance(name, str) else None
    if found is None:
        raise InvalidModelOptionError(
            f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}"
        )
    return found
