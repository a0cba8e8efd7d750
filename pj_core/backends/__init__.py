"""Model backends: loading a model and running its forwards with KV caches.

:mod:`pj_core.backends.protocol` says what the decoding needs of a model (``Backend`` and
``Rows``); :mod:`pj_core.backends.hf.backend` implements it over transformers and
:mod:`pj_core.backends.llamacpp.backend` over llama.cpp (GGUF files as they are).
"""
