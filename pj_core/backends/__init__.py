"""Model backends: loading a model and running its forwards with KV caches.

Today there is one, :mod:`pj_core.backends.hf` (transformers); a backend protocol in front
of it comes next, so decoding can run on llama.cpp too.
"""
