"""The transformers backend: model loading and cache (:mod:`~pj_core.backends.hf.models`,
:mod:`~pj_core.backends.hf.model_cache`), packed CPU linear layers
(:mod:`~pj_core.backends.hf.cpu_linear`) and KV-cache forwards (:mod:`~pj_core.backends.hf.kv`).
"""
